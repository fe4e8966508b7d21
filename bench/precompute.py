"""Precompute throughput vs the VAE-encode-only bound, and scaling from 1 to 2 ranks.

Same tiny InP model, same clips (one 17x128x128 bucket, inpaint with i2v + first_last cached,
so 3 VAE encodes per clip, + 1 per bucket for the all -1 clip), fp32, side by side round after round:
  precompute  `stages.precompute.precompute` in this process, fresh shard dir: probe, T5,
              decode (DataLoader worker), VAE encodes, tar writing, index + manifest
  bound       the same encodes on clips decoded beforehand: `models.encode_clips` on the clip and
              on each masked clip, nothing else
Ratio = precompute clips/s / bound clips/s, end to end and for the encode loop alone (first encode
to last, from a wrapper around `models.encode_clips`: the fixed start-up costs left out). Goal
>= 0.9. Then `cli.py precompute` under `accelerate launch` with 1 and with 2 ranks
(ACCELERATE_USE_CPU=true --multi_gpu, a free --main_process_port each): speed-up. This machine
has 2 cores, so 2 ranks (each with a decode worker) is the most it can show.
"""

from __future__ import annotations

import re
import shutil
import time

import common as C


def add_args(p):
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=None, help="default 128 (96 with --quick)")
    p.add_argument("--clips", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-ranks", action="store_true", help="skip the 1 -> 2 ranks launches")


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    size = args.size or (96 if args.quick else 128)
    n = args.clips or (8 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 3)

    import torch

    from cogfun import models
    from cogfun.buckets import Sampling
    from cogfun.config import mask_policy_list
    from cogfun.dataset import load_sources, probe_and_plan
    from cogfun.masks import black_clip, draw_geometries, masked_clip
    from cogfun.video import decode_video, frames_to_tensor
    from cogfun.stages.precompute import precompute

    model = C.tiny_model(C.BIG_TINY)
    meta = C.clip_dataset(n)
    out = C.scratch("precompute")
    cfg = C.precompute_config(model, meta, out / "shards", size=size, frames=args.frames, overwrite=True)
    sources, _ = load_sources(cfg.train_data_meta, cfg.train_data_dir)
    plans, _, by_key = probe_and_plan(sources, Sampling.from_config(cfg), workers=1, progress=False)
    geometries = [draw_geometries(mask_policy_list(cfg), p.frames, p.height, p.width, seed=cfg.seed, key=p.key)
                  for p in plans]
    policies = list(geometries[0])
    clips = [frames_to_tensor(decode_video(by_key[p.key].path, p.frame_indices, p.resize_hw, p.crop_box,
                                           media=by_key[p.key].media))[None]
             for p in plans]
    inputs = [x for px, g in zip(clips, geometries) for x in (px, *(masked_clip(px, pol, geo) for pol, geo in g.items()))]
    inputs += [black_clip(p.frames, p.height, p.width) for p in {p.bucket: p for p in plans}.values()]
    vae = models.load_vae(cfg.pretrained_model_name_or_path, torch.float32, "cpu")
    C.quiet(models.load_text_encoder, cfg.pretrained_model_name_or_path, torch.float32, "cpu")  # its imports too

    calls: list[tuple[float, float]] = []
    real_encode = models.encode_clips

    def timed_encode(*a, **k):
        t0 = time.perf_counter()
        r = real_encode(*a, **k)
        calls.append((t0, time.perf_counter()))
        return r

    loop: list[float] = []

    def precompute_side():
        shutil.rmtree(cfg.shard_dir, ignore_errors=True)
        calls.clear()
        models.encode_clips = timed_encode
        try:
            summary = C.quiet(precompute, cfg, progress=False)
        finally:
            models.encode_clips = real_encode
        assert summary["encoded"] == len(plans) and len(calls) == len(inputs), (summary, len(calls))
        loop.append(calls[-1][1] - calls[0][0])

    def bound_side():
        for x in inputs:
            real_encode(vae, x)

    t = C.interleave({"bound": bound_side, "precompute": precompute_side}, repeat=rounds, warmup=0)
    per_clip_bound = C.median(t["bound"]) / len(plans)
    e2e = C.per_round_ratio(t["bound"], t["precompute"])
    steady = C.per_round_ratio(t["bound"], loop)
    print(f"\n{len(plans)} clips {args.frames}x{size}x{size}, {1 + len(policies)} encodes per clip, {rounds} round(s):")
    rows = [["bound (encodes only)", C.spread(t["bound"]), f"{1 / per_clip_bound:.3g}"],
            ["precompute end to end", C.spread(t["precompute"]), f"{len(plans) / C.median(t['precompute']):.3g}"],
            ["precompute encode loop", C.spread(loop), f"{len(plans) / C.median(loop):.3g}"]]
    print(C.table(rows, ["side", "seconds median (min-max)", "clips/s"]))
    print(f"  precompute / bound throughput, end to end:  {C.spread(e2e)}")
    print(f"  precompute / bound throughput, encode loop: {C.spread(steady)}")
    fixed = C.median(t["precompute"]) - C.median(loop)
    print(f"  fixed cost of a precompute call (probe, T5, model loads, index, manifest): {fixed:.2f} s "
          f"= {fixed / per_clip_bound:.1f} clips' worth of encoding")
    C.goal("precompute / VAE-encode bound (encode loop)", C.median(steady), ">=", 0.9)
    C.goal("precompute / VAE-encode bound (end to end)", C.median(e2e), ">=", 0.9)
    if not args.no_ranks:
        ranks(cfg, out, rounds)


def ranks(cfg, out, rounds: int) -> None:
    """`accelerate launch cli.py precompute` with 1 and 2 CPU ranks, alternating."""
    wall: dict[int, list[float]] = {1: [], 2: []}
    rate: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for world in (1, 2):
            shard_dir = out / f"shards-{world}"
            shutil.rmtree(shard_dir, ignore_errors=True)
            launch = ["-m", "accelerate.commands.launch", "--num_processes", str(world),
                      "--main_process_port", str(C.free_port()), *(["--multi_gpu"] if world > 1 else []),
                      "cli.py", "precompute", *C.cli_flags(cfg), "--shard_dir", str(shard_dir)]
            res = C.measure_process([C.PYTHON, *launch], env={"ACCELERATE_USE_CPU": "true"})
            found = re.search(r"encoded (\d+) now \(([\d.]+) clips/s\)", res["output"])
            if res["rc"] != 0 or not found:
                raise RuntimeError(f"precompute with {world} rank(s) failed:\n{res['output'][-3000:]}")
            wall[world].append(res["wall"])
            rate[world].append(float(found.group(2)))
    print(f"\n`accelerate launch cli.py precompute`, {rounds} round(s), 1 vs 2 ranks (2 cores):")
    rows = [[w, C.spread(wall[w]), C.spread(rate[w])] for w in (1, 2)]
    print(C.table(rows, ["ranks", "launch wall s", "clips/s (stage's own timer)"]))
    print(f"  speed-up 1 -> 2 ranks: {C.spread(C.per_round_ratio(rate[2], rate[1]))} (clips/s), "
          f"{C.spread(C.per_round_ratio(wall[1], wall[2]))} (launch wall time incl. imports)")


if __name__ == "__main__":
    main()
