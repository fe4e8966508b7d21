"""Mask policy sets: coverage of CogVideoX-Fun's masks, bytes per sample and precompute time.

For each cached set of mask policies (`before`: i2v,first_last, cogfun's default before issue 13,
under today's rules: its images cache nothing where the old code stored two copies of the clean
latent; `default`: first_n,first_last_n,block,block_range,ellipse; `all`: every policy):
  coverage  share of CogVideoX-Fun's mask draws the set (+ t2v) reproduces (`cogfun.masks.coverage`;
            `before` counted as the old code trained: t2v always zeroed, 90 % of the all-masked mass)
  encodes   VAE encodes per video / image sample (`inspect-buckets`' count), without / with
            reference noise (V1.1 / V1.5 InP)
  bytes     bytes per sample at real shapes, as `inspect-buckets` estimates them: a 49x480x720
            video and a 512x512 image, T5-XXL (4096), without / with reference noise
  time      the real precompute stage (`stages.precompute.precompute`, tiny InP model, fp32, one
            17x128x128 bucket of clips), the sets interleaved round after round; seconds, ratio to
            `before`, and the bytes per sample of those tiny shards on disk
and, for --masks_per_policy K = 1, 2, 4 with the default set (issue 17):
  encodes / bytes  per video / image sample at the real shapes above, as `inspect-buckets` estimates
            them (without reference noise)
  time      the real precompute stage on the same tiny bucket, K interleaved round after round;
            seconds, ratio to K = 1, bytes per sample on disk
"""

from __future__ import annotations

import shutil
import time

import common as C
from cogfun.config import DEFAULT_MASK_POLICIES

SETS = {"before": "i2v,first_last", "default": DEFAULT_MASK_POLICIES, "all": "all"}


def add_args(p):
    p.add_argument("--clips", type=int, default=None, help="clips precomputed per set (8; quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (3; quick 1)")
    p.add_argument("--part", choices=("sets", "k", "all"), default="all",
                   help="sets: the policy sets; k: --masks_per_policy 1, 2, 4 with the default set")


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    n = args.clips or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)

    from cogfun import masks
    from cogfun.buckets import sample_bytes
    from cogfun.config import PrecomputeConfig, mask_policy_list
    from cogfun.inspect import SAMPLE_OVERHEAD, conditioning_latents

    if args.part in ("k", "all"):
        masks_per_policy(n, rounds)
    if args.part == "k":
        return
    policies = {name: mask_policy_list(PrecomputeConfig(train_mode="inpaint", mask_policies=spec))
                for name, spec in SETS.items()}
    rows = []
    for name, pols in policies.items():
        video, image = masks.coverage(pols, 49), masks.coverage(pols, 1)
        if name == "before":  # t2v was always zeroed: the black-clip 10 % of all-masked draws were not trained
            video, image = video - 0.1 * 0.20, image - 0.1 * 0.70
        cells = [name, ",".join(pols) if name != "all" else "all 11", f"{video:.0%}", f"{image:.0%}"]
        for noise in (False, True):
            v, i = (1 + conditioning_latents(pols, f, noise) for f in (49, 1))
            cells.append(f"{v} / {i}")
        for noise in (False, True):
            vb = sample_bytes(49, 480, 720, text_dim=4096, n_mask_policies=conditioning_latents(pols, 49, noise))
            ib = sample_bytes(1, 512, 512, text_dim=4096, n_mask_policies=conditioning_latents(pols, 1, noise))
            cells.append(f"{C.mb(vb + SAMPLE_OVERHEAD)} / {C.mb(ib + SAMPLE_OVERHEAD)}")
        rows.append(cells)
    print("\nCoverage, encodes and bytes per sample (video 49x480x720 / image 512x512):")
    print(C.table(rows, ["set", "policies", "video cov.", "image cov.", "encodes", "encodes +noise",
                         "bytes", "bytes +noise"]))

    timed_precompute("mask_policies", n, rounds, {name: {"mask_policies": spec} for name, spec in SETS.items()},
                     base="before", what="set", label="")
    C.goal("default set: video coverage", masks.coverage(policies["default"], 49), ">=", 0.8)
    C.goal("default set: image coverage", masks.coverage(policies["default"], 1), ">=", 0.8)


KS = (1, 2, 4)


def masks_per_policy(n: int, rounds: int) -> None:
    """--masks_per_policy K: encodes and bytes at real shapes, precompute time on the tiny bucket."""
    from cogfun.buckets import sample_bytes
    from cogfun.config import PrecomputeConfig, mask_policy_list
    from cogfun.inspect import SAMPLE_OVERHEAD, conditioning_latents

    pols = mask_policy_list(PrecomputeConfig(train_mode="inpaint"))
    rows = []
    for k in KS:
        v, i = (conditioning_latents(pols, f, False) * k for f in (49, 1))
        vb = sample_bytes(49, 480, 720, text_dim=4096, n_mask_policies=v) + SAMPLE_OVERHEAD
        ib = sample_bytes(1, 512, 512, text_dim=4096, n_mask_policies=i) + SAMPLE_OVERHEAD
        rows.append([k, f"{1 + v} / {1 + i}", f"{C.mb(vb)} / {C.mb(ib)}"])
    print(f"\n--masks_per_policy K with the default set ({','.join(pols)}): per video 49x480x720 / image 512x512")
    print(C.table(rows, ["K", "encodes", "bytes"]))

    timed_precompute("masks_per_policy", n, rounds,
                     {k: {"masks_per_policy": k, "mask_policies": DEFAULT_MASK_POLICIES} for k in KS},
                     base=1, what="K", label=", default set")


def timed_precompute(scratch: str, n: int, rounds: int, sides: dict, *, base, what: str, label: str) -> None:
    """The real precompute stage on n clips 17x128x128 per side (`sides`: name -> precompute flags),
    interleaved round after round: seconds, ratio to `base`, bytes per sample on disk."""
    from cogfun.stages.precompute import precompute

    model = C.tiny_model()
    meta = C.clip_dataset(n)
    out = C.scratch(scratch)
    cfgs = {name: C.precompute_config(model, meta, out / str(name), size=128, frames=17, overwrite=True,
                                      dataloader_num_workers=0, **flags) for name, flags in sides.items()}
    per_sample: dict = {}

    def side(name):
        def run():
            shutil.rmtree(cfgs[name].shard_dir, ignore_errors=True)
            summary = C.quiet(precompute, cfgs[name], progress=False)
            per_sample[name] = summary["bytes_written"] / summary["samples"]
        return run

    t0 = time.time()
    t = C.interleave({name: side(name) for name in sides}, repeat=rounds, warmup=0)
    print(f"\nprecompute of {n} clips 17x128x128 (tiny InP model, fp32{label}), {rounds} round(s), "
          f"{time.time() - t0:.0f} s in all:")
    rows = [[name, C.spread(t[name]), f"{C.median(t[name]) / n:.2f}", C.spread(C.per_round_ratio(t[name], t[base])),
             f"{per_sample[name] / 1e3:.1f} KB"] for name in sides]
    ratio = f"time / {base}" if what == "set" else f"time / {what}={base}"
    print(C.table(rows, [what, "seconds median (min-max)", "s per clip", ratio, "bytes per sample (disk)"]))


if __name__ == "__main__":
    main()
