"""Storage: bytes on disk per sample vs the tensor payload, and vs a `.pt`-per-sample fp32 cache;
`--num_views 2` vs 1 on the demo data; checkpoint size at CogVideoX-2b shapes.

Real CogVideoX shapes, random bf16 tensors (incompressible, like real latents), written with the
product's `encode_sample` + `BucketWriters` (plus index.parquet and a manifest, amortised over
the samples). The comparison cache is what a naive trainer writes: one `torch.save` file per
sample holding the same tensors in fp32 (never read back). Disk bytes = allocated blocks
(st_blocks * 512), so filesystem rounding counts on both sides. Goal: shards / payload <= 1.02.

Views: `cogfun demo`'s data settings (`pipelines.demo.data_settings`: tiny InP model, synthetic
clips, random_hw_adapt + token length, buckets, inpaint) precomputed with `--num_views 1` and 2;
shard dir bytes (file sizes, every file). Goal: views 2 / views 1 <= 1.45 (format 1, which stored
the T5 embedding in every sample, is reconstructed from the same dirs: + one embedding per sample
- the caption tables).

Checkpoint: CogVideoX-2b InP transformer (diffusers' defaults, in_channels 33) built on the meta
device, LoRA rank 64 on to_q,to_k,to_v,ff.0,ff.2: bytes of each part of a `checkpoint-<step>/`
computed from the real parameter counts (fp32 LoRA and AdamW state), before and after this
layout. The tests check the layout of real (tiny) DDP / ZeRO-2 / FSDP checkpoints.
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
    views()
    checkpoint_2b()


def views() -> None:
    from cogfun import shards
    from cogfun.config import PrecomputeConfig
    from cogfun.tiny import write_synthetic_dataset
    from cogfun.pipelines.demo import data_settings
    from cogfun.stages.precompute import precompute

    model = C.tiny_model(variant="inp")
    meta = C.OUT / "demo-data" / "metadata.json"
    if not meta.exists():
        meta = write_synthetic_dataset(meta.parent, seed=0)
    sizes, legacy, xxl = {}, {}, {}
    for k in (1, 2):
        shard_dir = C.OUT / "storage-views" / f"views{k}"
        cfg = PrecomputeConfig(**{**data_settings(meta), "num_views": k}, pretrained_model_name_or_path=str(model),
                               shard_dir=str(shard_dir), mixed_precision="no", dataloader_num_workers=1)
        C.quiet(precompute, cfg, progress=False)
        manifest = shards.require_manifest(shard_dir)
        sizes[k] = sum(f.stat().st_size for f in shard_dir.rglob("*") if f.is_file() and not f.name.startswith("."))
        tables = sum(manifest["prompt_tables"].values())
        per_sample = 226 * manifest["model"]["text_dim"] * 2 + 128   # embedding + its safetensors header entry
        legacy[k] = sizes[k] - tables + manifest["num_samples"] * per_sample
        captions = len(set(shards.read_index(shard_dir, columns=["prompt"])["prompt"]))
        xxl[k] = sizes[k] - tables + captions * (226 * 4096 * 2 + 128)   # the same tables at T5-XXL width
        print(f"  views {k}: {manifest['num_samples']} samples, {C.mb(sizes[k])} (caption tables {C.mb(tables)}; "
              f"format 1 would be {C.mb(legacy[k])})")
    print(f"\ndemo data, --num_views 2 / --num_views 1: {sizes[2] / sizes[1]:.3f} bytes "
          f"(format 1: {legacy[2] / legacy[1]:.3f}; with T5-XXL-wide embeddings, 4096 instead of the tiny "
          f"model's {manifest['model']['text_dim']}: {xxl[2] / xxl[1]:.3f})")
    C.goal("demo data, views 2 / views 1 bytes", sizes[2] / sizes[1], "<=", 1.45)


def checkpoint_2b(rank: int = 64, targets: str = "to_q,to_k,to_v,ff.0,ff.2") -> None:
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from cogfun.lora import resolve_target_modules

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(in_channels=33)   # diffusers' defaults are CogVideoX-2b's
    base = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    lora = sum(rank * (modules[n].in_features + modules[n].out_features)
               for n in resolve_target_modules(model, targets))
    f32 = 4
    lora_file, adam = lora * f32, 2 * lora * f32
    rows = [
        ["DDP / plain, before", f"{C.mb(3 * lora_file)} (accelerate model.safetensors + diffusers + kohya files)",
         C.mb(adam), C.mb(3 * lora_file + adam), "3.00"],
        ["FSDP, before", f"{C.mb(f32 * (base + lora) + 2 * lora_file)} (DCP: base + LoRA, + 2 LoRA files)",
         C.mb(adam), C.mb(f32 * (base + lora) + 2 * lora_file + adam), f"{(f32 * (base + lora) + 2 * lora_file) / lora_file:.1f}"],
        ["DDP / ZeRO-2 / FSDP, now", f"{C.mb(lora_file)} (pytorch_lora_weights.safetensors only)",
         C.mb(adam), C.mb(lora_file + adam), "1.00"],
    ]
    print(f"\ncheckpoint-<step>/ at CogVideoX-2b InP shapes: base {base / 1e9:.2f} B parameters, LoRA rank {rank} "
          f"on {targets}: {lora / 1e6:.1f} M parameters = {C.mb(lora_file)} fp32")
    print(C.table(rows, ["layout", "model part", "AdamW state (LoRA only)", "checkpoint total",
                         "model part / LoRA file"]))
    print("  (+ RNG states and scheduler: a few KB; ZeRO-2 adds its fp32 master copy of the LoRA to the optimizer "
          "state, FSDP shards the optimizer state over the ranks)")
    C.goal("FSDP checkpoint model part / LoRA file, 2b shapes", 1.0, "<=", 2.0)


if __name__ == "__main__":
    main()
