"""Step cost: `cogfun train`'s step vs a bare LoRA step vs online (CogVideoX-Fun-style) training.

Same tiny InP model (a 4-layer, width-128 transformer; --small: cogfun.tiny's own), same clips,
same batches, in one process,
side by side, round after round:
  cogfun  `stages.train.train` itself for N steps; step_time from its train_log.jsonl (loader,
          batch_inputs, accelerate, fwd/bwd/clip/AdamW, logging), first steps left out; with the
          default 2 loader threads and again with 0 (to separate the reading threads)
  bare    fwd + MSE + bwd + clip + AdamW on the same batches' inputs already in memory
  online  per step: decode the clip, VAE-encode it and a masked copy, T5-encode the caption, then
          the same batch_inputs + bare step (CogVideoX-Fun's work per step; its decode runs in
          DataLoader workers, so "online" is reported with and without decode on the critical path)
Goals: cogfun / bare <= 1.05; online / cogfun >= 3. Also prints the split of the online step and
what CogVideoX-Fun's per-clip gc.collect() costs in this process (DESIGN §8).
"""

from __future__ import annotations

import gc
import time

import common as C


def add_args(p):
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="steps per side per round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--skip", type=int, default=2, help="first steps of each cogfun run left out")
    p.add_argument("--workers", type=int, default=2,
                   help="cogfun train --dataloader_num_workers, its reading threads (default 2); a second cogfun side uses 0")
    p.add_argument("--small", action="store_true",
                   help="cogfun.tiny's own 2-layer, width-32 transformer (DESIGN §8's anchor measurement)")
    p.add_argument("--profile", action="store_true", help="cProfile one cogfun run, print the top entries")


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    steps = args.steps or (8 if args.quick else 20)
    rounds = args.rounds or (2 if args.quick else 4)

    from cogfun.stages.train import train

    model = C.tiny_model(None if args.small else C.BIG_TINY)
    meta = C.clip_dataset(C.n_clips(args.quick))  # one epoch covers a run: no epoch restarts
    shard_dir = C.shards_for(model, meta, size=args.size, frames=args.frames)
    out = C.scratch("step_cost")
    cfg = C.train_config(model, shard_dir, out / "run", steps=steps + args.skip,
                         dataloader_num_workers=args.workers)
    cfg0 = C.train_config(model, shard_dir, out / "run0", steps=steps + args.skip, dataloader_num_workers=0)
    pcfg = C.precompute_config(model, meta, shard_dir, size=args.size, frames=args.frames)

    setup = C.TrainSetup(cfg)
    batches = setup.batches(steps + args.skip)
    inputs = [setup.inputs(b) for b in batches]
    t_load = C.interleave({"load": lambda: setup.batches(len(batches))}, repeat=3)["load"]
    t_inputs = C.interleave({"inputs": lambda: [setup.inputs(b) for b in batches]}, repeat=3)["inputs"]
    host = {"loader (read, decode, collate)": C.median(t_load) / len(batches),
            "batch_inputs": C.median(t_inputs) / len(batches)}
    step = C.LoraStep(cfg)
    online = C.OnlineEncoder(pcfg)
    split: dict[str, list[float]] = {k: [] for k in (*online.PARTS, "lora")}
    gc_times: list[float] = []

    def cogfun_side(cfg=cfg):
        import shutil

        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        C.quiet(train, cfg)
        return C.median(C.read_step_times(cfg.output_dir, args.skip))

    def bare_side():
        times = []
        for x in inputs:
            t0 = time.perf_counter()
            step(*x)
            times.append(time.perf_counter() - t0)
        return C.median(times[args.skip:])

    def online_side():
        totals = []
        for i, batch in enumerate(batches[args.skip:]):
            enc, parts = online(batch, i)
            t0 = time.perf_counter()
            step(*setup.inputs(enc))
            parts["lora"] = time.perf_counter() - t0
            for k, v in parts.items():
                split[k].append(v)
            t0 = time.perf_counter()
            gc.collect()  # CogVideoX-Fun's train_lora.py calls this once per clip
            gc_times.append(time.perf_counter() - t0)
            totals.append(parts["vae"] + parts["t5"] + parts["lora"])
        return C.median(totals)

    if args.profile:
        profile_once(cogfun_side)
    t = C.interleave({"cogfun": cogfun_side, "cogfun, 0 threads": lambda: cogfun_side(cfg0), "bare": bare_side,
                      "online": online_side}, repeat=rounds, warmup=1)
    report(args, t, split, gc_times, steps, rounds, host)


def report(args, t, split, gc_times, steps, rounds, host) -> None:
    med = {k: C.median(v) for k, v in split.items()}
    online_serial = sum(med.values())
    online = med["vae"] + med["t5"] + med["lora"]
    with_gc = online_serial + C.median(gc_times)
    cog, bare = C.median(t["cogfun"]), C.median(t["bare"])
    r_bare = C.per_round_ratio(t["cogfun"], t["bare"])
    r_online = C.per_round_ratio(t["online"], t["cogfun"])
    print(f"\nshape {args.frames}x{args.size}x{args.size}, {steps} steps x {rounds} rounds (+1 warm-up), "
          f"median step seconds per round:")
    rows = [[k if k != "cogfun" else f"cogfun, {args.workers} threads", " ".join(f"{x * 1e3:.1f}" for x in v),
             f"{C.median(v) * 1e3:.1f}"] for k, v in t.items()]
    print(C.table(rows, ["side", "per round (ms)", "median (ms)"]))
    print("\nratios (per round, median (min-max)):")
    print(f"  cogfun / bare                     {C.spread(r_bare)}   ({args.workers} loader threads)")
    print(f"  cogfun, 0 threads / bare          {C.spread(C.per_round_ratio(t['cogfun, 0 threads'], t['bare']))}")
    over0 = C.median(t["cogfun, 0 threads"]) - bare
    print(f"  cogfun - bare                     {(cog - bare) * 1e3:.1f} ms per step (0 threads: {over0 * 1e3:.1f} ms = "
          + " + ".join(f"{k} {v * 1e3:.1f}" for k, v in host.items())
          + f" + the rest {(over0 - sum(host.values())) * 1e3:.1f}: accelerate wrappers, loss/norm syncs, log, tqdm)")
    print(f"  online / cogfun                   {C.spread(r_online)}   (decode in workers, off the critical path)")
    print(f"  online incl. decode / cogfun      {online_serial / cog:.3g}")
    print(f"  online incl. decode + gc / cogfun {with_gc / cog:.3g}   (CogVideoX-Fun's per-clip gc.collect())")
    print("\nonline step split (median ms, share of decode+VAE+T5+LoRA+gc):")
    parts = {**med, "gc.collect": C.median(gc_times)}
    rows = [[k, f"{v * 1e3:.1f}", f"{100 * v / with_gc:.0f} %"] for k, v in parts.items()]
    print(C.table(rows, ["part", "ms", "share"]))
    print(f"  (online without decode on the critical path: {online * 1e3:.1f} ms)")
    C.goal("cogfun step / bare step", C.median(r_bare), "<=", 1.05)
    C.goal("online step / cogfun step", C.median(r_online), ">=", 3.0)
    plot(args, cog, bare, parts)


def plot(args, cog, bare, parts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    bars = [("cogfun train", {"step (cached)": cog}), ("bare step", {"fwd+bwd+AdamW": bare}),
            ("online (CogVideoX-Fun)", parts)]
    colors = {"decode": "#999999", "vae": "#d62728", "t5": "#ff7f0e", "lora": "#1f77b4",
              "gc.collect": "#bbbbbb", "step (cached)": "#2ca02c", "fwd+bwd+AdamW": "#1f77b4"}
    for y, (name, segs) in enumerate(bars):
        left = 0.0
        for k, v in segs.items():
            ax.barh(y, v * 1e3, left=left, color=colors[k], label=k)
            left += v * 1e3
        ax.text(left, y, f" {left:.0f} ms ({left / (cog * 1e3):.2g}x cogfun)", va="center", fontsize=7)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median)")
    ax.set_title(f"step cost, tiny InP model{' (small)' if args.small else ''}, "
                 f"{args.frames}x{args.size}x{args.size}, 2-core CPU", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlim(0, ax.get_xlim()[1] * 1.25)
    default = (args.frames, args.size, args.small) == (17, 128, False)
    C.save_figure(fig, "step_cost" if default else f"step_cost_{args.frames}x{args.size}{'_small' * args.small}")


def profile_once(fn) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
