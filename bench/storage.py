"""Storage: bytes on disk per sample vs the tensor payload, and vs a `.pt`-per-sample fp32 cache.

Real CogVideoX shapes, random bf16 tensors (incompressible, like real latents), written with the
product's `encode_sample` + `BucketWriters` (plus index.parquet and a manifest, amortised over
the samples). The comparison cache is what a naive trainer writes: one `torch.save` file per
sample holding the same tensors in fp32 (never read back). Disk bytes = allocated blocks
(st_blocks * 512), so filesystem rounding counts on both sides. Goal: shards / payload <= 1.02.
"""

from __future__ import annotations

import common as C

SHAPES = [  # (frames, height, width, mask policies)
    (49, 480, 720, C.REAL_POLICIES),   # CogVideoX 2b/5b native size, inpaint
    (49, 480, 720, ()),                # same, normal (text-to-video): no masked latents
    (49, 512, 512, C.REAL_POLICIES),   # the doc's token budget at 512
    (9, 1024, 1024, C.REAL_POLICIES),  # the doc's 1024 x 9 frames
    (1, 512, 512, ("block", "ellipse")),  # an image sample (its default policies)
]


def add_args(p):
    p.add_argument("--samples", type=int, default=None, help="samples per shape")


def disk(path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    n = args.samples or (4 if args.quick else 16)
    import torch

    rows = []
    worst = 0.0
    for frames, h, w, policies in SHAPES:
        out = C.scratch("storage")
        C.write_real_shards(out / "shards", n, frames=frames, height=h, width=w, policies=policies)
        sample = C.real_sample(frames, h, w, policies=policies)
        payload = C.payload_bytes(sample)
        for i in range(n):
            torch.save({k: v.float() for k, v in sample.items()}, out / f"pt-{i}.pt")
        tars = sum(f.stat().st_blocks * 512 for f in (out / "shards").rglob("*.tar"))
        shard_total = disk(out / "shards")
        pt = sum(f.stat().st_blocks * 512 for f in out.glob("pt-*.pt"))
        ratio = shard_total / n / payload
        worst = max(worst, ratio)
        prompt_share = sample["prompt_embeds"].nbytes / payload
        rows.append([f"{frames}x{h}x{w}", "+".join(policies) or "none", C.mb(payload),
                     f"{tars / n / payload:.4f}", f"{ratio:.4f}", f"{pt / n / payload:.3f}",
                     f"{pt / shard_total:.2f}", f"{100 * prompt_share:.0f} %"])
    print(f"\n{n} samples per shape, bytes on disk per sample:")
    print(C.table(rows, ["shape FxHxW", "mask policies", "payload", "tars / payload",
                         "shard dir / payload", ".pt fp32 / payload", ".pt / shard dir", "T5 share"]))
    C.goal("shard dir bytes / tensor payload (worst shape)", worst, "<=", 1.02)


if __name__ == "__main__":
    main()
