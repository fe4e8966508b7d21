"""Memory: peak RSS of a `cogfun train` process vs a transformer-only process vs an online one.

Each side runs in its own subprocess (this script with --child), same tiny InP model + LoRA, same
batches, N steps:
  imports   python + torch/diffusers/transformers/peft/accelerate imported, nothing else (floor)
  cogfun    `stages.train.train` (dataloader_num_workers 0, so one process holds everything)
  bare      transformer + LoRA + AdamW, the same batches read beforehand, fwd/bwd/step
  online    the bare step plus VAE + T5 resident, decoding and encoding every step
Peak RSS = the child's VmHWM (ru_maxrss is useless here: a child inherits its parent's
high-water mark across fork+exec); the tree peak (workers included) is sampled with psutil. Inside each
child a census (taken during the loop for cogfun, through a wrapper around
`stages.train.batch_inputs`) counts the parameter bytes of live AutoencoderKLCogVideoX /
T5EncoderModel / transformer instances and whether their code is imported. Goal: 0 VAE/T5 bytes
in the cogfun process. The tiny encoders are ~1 MB, so the parent also reports, from meta-device
instances (no memory), the weight bytes the real CogVideoX VAE and T5-XXL would add.
"""

from __future__ import annotations

import json
import sys

import common as C

ENCODERS = ("AutoencoderKLCogVideoX", "T5EncoderModel")
TRANSFORMER = "CogVideoXTransformer3DModel"


def add_args(p):
    p.add_argument("--child", choices=("imports", "cogfun", "bare", "online"))
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)


def census() -> dict:
    """Parameter bytes of live encoder / transformer instances; encoder (and deepspeed) modules
    imported or not."""
    import gc

    import torch

    alive: dict[str, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module) and type(obj).__name__ in (*ENCODERS, TRANSFORMER):
            n = sum(p.numel() * p.element_size() for p in obj.parameters())
            alive[type(obj).__name__] = alive.get(type(obj).__name__, 0) + n
    imported = [m for m in ("transformers.models.t5.modeling_t5",
                            "diffusers.models.autoencoders.autoencoder_kl_cogvideox", "deepspeed") if m in sys.modules]
    return {"param_bytes": alive, "encoder_param_bytes": sum(alive.get(k, 0) for k in ENCODERS),
            "modules_imported": imported, "peak_rss_at_census": C.self_peak_rss()}


def child(args) -> None:
    steps = args.steps
    report: dict = {}
    if args.child == "imports":
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        report = census()
    else:
        model = C.tiny_model(C.BIG_TINY)
        meta = C.clip_dataset(C.n_clips(args.quick))
        shard_dir = C.shards_for(model, meta, size=args.size, frames=args.frames)
        cfg = C.train_config(model, shard_dir, C.scratch(f"memory-{args.child}"), steps=steps,
                             dataloader_num_workers=0)
        if args.child == "cogfun":
            import cogfun.stages.train as st

            real = st.batch_inputs

            def batch_inputs(*a, **k):  # census once, mid-run, while the stage's objects are alive
                if not report:
                    report.update(census())
                return real(*a, **k)

            st.batch_inputs = batch_inputs
            C.quiet(st.train, cfg)
        else:
            setup = C.TrainSetup(cfg)
            batches = setup.batches(steps)
            step = C.LoraStep(cfg)
            online = C.OnlineEncoder(C.precompute_config(model, meta, shard_dir, size=args.size,
                                                         frames=args.frames)) if args.child == "online" else None
            for i, batch in enumerate(batches):
                if online is not None:
                    batch = online(batch, i)[0]
                step(*setup.inputs(batch))
            report = census()
    report["self_peak_rss"] = C.self_peak_rss()
    print(json.dumps(report))


def real_encoder_bytes() -> dict[str, int]:
    """bf16 weight bytes of the real CogVideoX VAE, T5-XXL encoder and CogVideoX-2b transformer
    (built on the meta device: shapes only)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    t5xxl = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        models = {"VAE (CogVideoX)": AutoencoderKLCogVideoX(), "T5-XXL encoder": T5EncoderModel(t5xxl),
                  "transformer (2b-InP)": CogVideoXTransformer3DModel(in_channels=33)}
    return {k: sum(p.numel() for p in m.parameters()) * 2 for k, m in models.items()}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    args.steps = args.steps or (4 if args.quick else 10)
    if args.child:
        return child(args)
    rounds = args.rounds or (1 if args.quick else 3)
    model = C.tiny_model(C.BIG_TINY)
    # the shards exist before any child is measured
    C.shards_for(model, C.clip_dataset(C.n_clips(args.quick)), size=args.size, frames=args.frames)
    sides = ("imports", "cogfun", "bare", "online")
    common_args = ["--steps", str(args.steps), "--frames", str(args.frames), "--size", str(args.size),
                   "--threads", str(args.threads), *(["--quick"] if args.quick else [])]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(rounds):
        for side in sides:
            runs[side].append(C.run_child([__file__, "--child", side, *common_args]))
    peak = {s: C.median([r["self_peak_rss"] for r in runs[s]]) for s in sides}
    tree = {s: C.median([r["tree_peak_rss"] for r in runs[s]]) for s in sides}
    last = {s: runs[s][-1] for s in sides}
    print(f"\n{args.steps} steps at {args.frames}x{args.size}x{args.size}, {rounds} round(s), median peak RSS:")
    rows = []
    for s in sides:
        pb = last[s]["param_bytes"]
        rows.append([s, C.mb(peak[s]), C.mb(tree[s]), f"{peak[s] / peak['bare']:.3f}",
                     C.mb(peak[s] - peak["imports"]), f"{last[s]['encoder_param_bytes']:,}",
                     f"{pb.get(TRANSFORMER, 0):,}", ", ".join(m.split(".")[-1] for m in last[s]["modules_imported"])
                     or "-"])
    print(C.table(rows, ["process", "peak RSS", "tree peak", "/ bare", "above imports",
                         "VAE+T5 param bytes alive", "transformer param bytes", "modules imported"]))
    print("\nratios (same run):")
    print(f"  cogfun / bare  = {peak['cogfun'] / peak['bare']:.3f}   (above the import floor: "
          f"{(peak['cogfun'] - peak['imports']) / (peak['bare'] - peak['imports']):.3f})")
    print(f"  online / cogfun = {peak['online'] / peak['cogfun']:.3f}   (above the import floor: "
          f"{(peak['online'] - peak['imports']) / (peak['cogfun'] - peak['imports']):.3f})")
    real = real_encoder_bytes()
    print("\nreal-size weights (bf16) an online process keeps resident besides the transformer:")
    for k, v in real.items():
        print(f"  {k:22s} {v / 1e9:6.2f} GB")
    enc = real["VAE (CogVideoX)"] + real["T5-XXL encoder"]
    print(f"  -> online holds {enc / 1e9:.2f} GB of encoder weights = {enc / real['transformer (2b-InP)']:.2f}x "
          f"the 2b transformer's; cogfun train holds none of it")
    C.goal("VAE+T5 parameter bytes alive in cogfun train (every round)",
           max(r["encoder_param_bytes"] for r in runs["cogfun"]), "<=", 0)
    print(f"cogfun train's peak RSS above the transformer-only process: {C.mb(peak['cogfun'] - peak['bare'])}")


if __name__ == "__main__":
    main()
