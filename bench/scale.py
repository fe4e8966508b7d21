"""Scale: how precompute time, shard bytes and the train step grow with clip length, resolution
and dataset size (tiny InP model with the 4-layer transformer, fp32, 1 thread).

Each point: `stages.precompute.precompute` into a fresh dir (seconds per clip, bytes per sample
from its summary), then `stages.train.train` for a few steps (median step_time, first 2 left out;
no loader workers, so that the many short epochs of a 4-clip dataset do not respawn them).
Everything is printed relative to the first point of its series, next to the growth of the pixel
volume (what the VAE pays) and of the transformer's sequence (video tokens + 226 text tokens: what
the step pays; at these tiny sizes the text tokens dominate it).
"""

from __future__ import annotations

import common as C


def add_args(p):
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)


def series(quick: bool) -> dict[str, list[tuple[int, int, int]]]:
    """axis -> points (clips, frames, size)."""
    if quick:
        return {"frames": [(4, f, 64) for f in (9, 17, 33)], "resolution": [(4, 9, s) for s in (64, 128)],
                "clips": [(n, 9, 64) for n in (4, 8)]}
    return {"frames": [(4, f, 64) for f in (9, 17, 33, 49)],
            "resolution": [(4, 9, s) for s in (64, 96, 128, 192)],
            "clips": [(n, 9, 64) for n in (4, 8, 16, 32)]}


def measure(model, clips: int, frames: int, size: int, steps: int) -> dict:
    import time

    from cogfun.stages.precompute import precompute
    from cogfun.stages.train import train

    meta = C.clip_dataset(clips, frames=56)
    out = C.scratch("scale")
    t0 = time.perf_counter()
    summary = C.quiet(precompute, C.precompute_config(model, meta, out / "shards", size=size, frames=frames),
                      progress=False)
    seconds = time.perf_counter() - t0
    cfg = C.train_config(model, out / "shards", out / "run", steps=steps + 2, dataloader_num_workers=0)
    C.quiet(train, cfg)
    return {"s_per_clip": seconds / clips, "bytes": summary["bytes_written"] / summary["samples"],
            "step": C.median(C.read_step_times(cfg.output_dir, 2)),
            "pixels": frames * size * size, "tokens": ((frames - 1) // 4 + 1) * (size // 16) ** 2 + 226}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    steps = args.steps or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    model = C.tiny_model(C.BIG_TINY)
    axes = series(args.quick)
    points = sorted({p for pts in axes.values() for p in pts})
    measure(model, *points[0], steps)  # warm-up: first-call imports and caches
    runs: dict[tuple, list[dict]] = {p: [] for p in points}
    for _ in range(rounds):  # every point once per round, so machine load spreads over all
        for p in points:
            runs[p].append(measure(model, *p, steps))
    med = {p: {k: C.median([r[k] for r in rs]) for k in rs[0]} for p, rs in runs.items()}
    results = {axis: [(p, med[p]) for p in pts] for axis, pts in axes.items()}
    rows = []
    for axis, pts in results.items():
        base = pts[0][1]
        for (clips, frames, size), r in pts:
            rel = lambda k: f"{r[k] / base[k]:.2f}"  # noqa: E731
            rows.append([axis, f"{clips} clips {frames}x{size}x{size}", rel("pixels"), rel("tokens"),
                         f"{r['s_per_clip']:.3f}", rel("s_per_clip"), f"{r['bytes'] / 1e3:.1f}", rel("bytes"),
                         f"{r['step'] * 1e3:.1f}", rel("step")])
    print(f"\nmedian of {rounds} round(s), each point once per round:")
    print(C.table(rows, ["axis", "point", "pixels x", "seq tokens x", "precompute s/clip", "x",
                         "KB/sample", "x", "step ms", "x"]))
    plot(results)


def plot(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(11, 3.2))
    for ax, (axis, pts) in zip(axes, results.items()):
        (c0, f0, s0), b = pts[0]
        xs = [{"frames": f, "resolution": s, "clips": c}[axis] for (c, f, s), _ in pts]
        for key, label, style in (("s_per_clip", "precompute s/clip", "o-"), ("bytes", "bytes/sample", "s-"),
                                  ("step", "train step", "^-"), ("pixels", "pixel volume", "k:"),
                                  ("tokens", "sequence (video + text tokens)", "k--")):
            ax.plot(xs, [r[key] / b[key] for _, r in pts], style, label=label, ms=4)
        ax.set_xlabel({"frames": "frames (64 px)", "resolution": "side px (9 frames)",
                       "clips": "clips (9x64x64)"}[axis])
        ax.set_xticks(xs)
        if axis == "clips":
            ax.set_ylim(0.5, 1.5)  # per clip: flat is the point; do not zoom into the noise
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative to the first point")
    axes[0].legend(fontsize=7)
    fig.suptitle("cogfun scaling, tiny InP model, 2-core CPU", fontsize=9)
    C.save_figure(fig, "scale")


if __name__ == "__main__":
    main()
