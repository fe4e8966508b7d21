"""GPU step: a CogVideoX-2b-shaped LoRA step at 49x480x720 - time, MFU, peak memory - and what
online encoding (VAE + T5-XXL resident, encoding every step) would add.

Random weights, bf16 base, fp32 LoRA (rank 64, alpha 32, to_q,to_k,to_v,ff.0,ff.2 - the seed's
flags), AdamW, clip 0.05, autocast bf16: what `cogfun train --mixed_precision bf16` runs.
Transformer = `CogVideoXTransformer3DModel(in_channels=33)` (diffusers' defaults are 2b's: 30
layers, 30 heads x 64 = 1920 wide, text dim 4096); input latents 13x16x60x90 + 226 T5 tokens =
17,776 tokens. Side by side, step after step:
  bare    the step on inputs already on the device
  cogfun  `stages.train.batch_inputs` on a cached-format batch (bf16 in pinned host memory, as the
          loader yields it) + the step + the per-step host syncs `cogfun train` makes (loss, grad norm)
  online  (--online) VAE-encode the clip and an i2v-masked copy (real-size random
          AutoencoderKLCogVideoX), T5-XXL-encode 226 tokens (random T5EncoderModel), then as cogfun
MFU = model FLOPs of one step (counted with FlopCounterMode on meta tensors: fwd + bwd, no
checkpoint recompute) / step time / a measured bf16 matmul peak.

  python bench/gpu_step.py --online --threads 8      # on a GPU machine
  python bench/gpu_step.py --tiny --online           # CPU smoke check with the tiny configs
  python bench/gpu_step.py --meta                    # FLOPs per step only (no device needed)
  python bench/gpu_step.py --base_weight_dtype float8_e4m3fn --offload_blocks 30   # cogfun train's memory options
"""

from __future__ import annotations

import json
import time

import common as C

TARGETS = "to_q,to_k,to_v,ff.0,ff.2"
POLICIES = ["i2v", "first_last"]


def add_args(p):
    p.add_argument("--tiny", action="store_true", help="tiny configs from cogfun.tiny (CPU smoke check)")
    p.add_argument("--meta", action="store_true", help="only count the FLOPs of one step, on meta tensors")
    p.add_argument("--online", action="store_true", help="also build the VAE + T5 and time online encoding")
    p.add_argument("--frames", type=int, default=None, help="pixel frames (49; tiny: 9)")
    p.add_argument("--height", type=int, default=None, help="480; tiny: 64")
    p.add_argument("--width", type=int, default=None, help="720; tiny: 64")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                   help="gradient checkpointing (the seed's launch lines use it)")
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("--base_weight_dtype", default=None, choices=("bf16", "float8_e4m3fn", "float8_e5m2"),
                   help="as cogfun train's flag: storage dtype of the frozen transformer weights")
    p.add_argument("--offload_blocks", type=int, default=0,
                   help="as cogfun train's flag: transformer blocks whose frozen weights stay in CPU memory")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")


# ------------------------------------------------------------------ building


def configs(tiny: bool) -> dict:
    """Constructor kwargs of transformer / VAE / T5 config: tiny (cogfun.tiny) or real size."""
    if tiny:
        from cogfun.tiny import t5_config, transformer_config, vae_config

        return {"transformer": transformer_config("inp"), "vae": vae_config(), "t5": t5_config(400)}
    return {"transformer": {"in_channels": 33},  # diffusers' defaults are CogVideoX-2b's
            "vae": {},                             # ... and CogVideoX's VAE
            "t5": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                   "num_heads": 64, "feed_forward_proj": "gated-gelu"}}  # T5 v1.1 XXL encoder


def train_cfg(args, checkpointing: bool):
    from cogfun.config import TrainConfig

    return TrainConfig(train_mode="inpaint", mixed_precision="bf16", rank=args.rank, network_alpha=args.rank / 2,
                       target_name=TARGETS, max_grad_norm=0.05, adam_weight_decay=3e-2,
                       adam_epsilon=1e-10, gradient_checkpointing=checkpointing, seed=42)


def build(cls, kwargs: dict, device, dtype):
    import torch

    with torch.device(device):
        model = cls(**kwargs)
    return model.to(dtype)


def cached_batch(args, text_dim: int, i: int) -> dict:
    """A batch as `cogfun.loader` yields it: bf16 tensors [1, ...] on the host."""
    t = C.real_sample(args.frames, args.height, args.width, policies=POLICIES, seed=i % 2, text=(226, text_dim))
    return {"tensors": {k: v[None] for k, v in t.items()}, "metas": [{"frames": args.frames, "bucket": "gpu", "masks": {}}], "batch_id": i}


# ------------------------------------------------------------------ measuring


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device) -> float:
    """Measured bf16 matmul FLOP/s (median of 10 timed products)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / C.median(times)


def step_flops(args, cfgs) -> float:
    """FLOPs of one LoRA step (fwd + bwd, no recompute), counted on meta tensors."""
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    model = build(CogVideoXTransformer3DModel, cfgs["transformer"], "meta", torch.bfloat16)
    step = C.LoraStep(train_cfg(args, False), model=model, device="meta")
    lat = ((args.frames - 1) // 4 + 1, 16, args.height // 8, args.width // 8)
    x = torch.empty(1, lat[0], 33, *lat[2:], device="meta", dtype=torch.bfloat16)
    e = torch.empty(1, 226, model.config.text_embed_dim, device="meta", dtype=torch.bfloat16)
    t = torch.zeros(1, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        pred = model(hidden_states=x, encoder_hidden_states=e, timestep=t, return_dict=False)[0]
        pred.float().square().mean().backward()
    return counter.get_total_flops()


def host_prep_seconds(args, text_dim: int, repeat: int = 5) -> float:
    """Median seconds of `batch_inputs` with device=cpu at this shape (noise, posterior sample,
    add_noise / velocity, mask channel): what these draws cost when they run on a host CPU."""
    import torch
    from diffusers import DDPMScheduler

    from cogfun.tiny import SCHEDULER_CONFIG, VAE_SCALING_FACTOR
    from cogfun.stages.train import batch_inputs

    cfg = train_cfg(args, False)
    scheduler = DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k != "snr_shift_scale"})
    batch = cached_batch(args, text_dim, 0)
    null = torch.zeros(226, text_dim)
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        batch_inputs({**batch, "batch_id": i}, epoch=0, cfg=cfg, scheduler=scheduler, scaling=VAE_SCALING_FACTOR,
                     policies=POLICIES, null_prompt=null, device="cpu", dtype=torch.bfloat16)
        times.append(time.perf_counter() - t0)
    return C.median(times[1:])


def peak_memory(device) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device.type == "cuda" else C.self_peak_rss()


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_sides(args, cfgs, device, checkpointing: bool, encoders=None) -> dict:
    """Time bare + cogfun steps (no encoders) or cogfun + online steps (encoders given),
    interleaved step by step; peak memory of this phase."""
    import torch
    from diffusers import CogVideoXTransformer3DModel, DDPMScheduler

    from cogfun import models
    from cogfun.masks import masked_clip
    from cogfun.tiny import SCHEDULER_CONFIG, VAE_SCALING_FACTOR
    from cogfun.stages.train import batch_inputs

    cfg = train_cfg(args, checkpointing)
    reset_peak(device)
    model = build(CogVideoXTransformer3DModel, cfgs["transformer"], device, torch.bfloat16)
    step = C.LoraStep(cfg, model=model, device=device, autocast=torch.bfloat16)
    if args.base_weight_dtype or args.offload_blocks:   # cogfun train's --base_weight_dtype / --offload_blocks
        from cogfun import lowmem

        lowmem.apply_base_weight_dtype(model, lowmem.storage_dtype(args.base_weight_dtype, torch.bfloat16),
                                       torch.bfloat16)
        lowmem.offload_blocks(model, args.offload_blocks, device)
        reset_peak(device)   # the model was built in bf16 on the device: measure the step from here
    text_dim = model.config.text_embed_dim
    scheduler = DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k != "snr_shift_scale"})
    null = torch.zeros(226, text_dim)
    batches = [cached_batch(args, text_dim, i) for i in range(2)]
    if device.type == "cuda":
        batches = [{**b, "tensors": {k: v.pin_memory() for k, v in b["tensors"].items()}} for b in batches]

    def inputs(batch, i):
        return batch_inputs({**batch, "batch_id": i}, epoch=0, cfg=cfg, scheduler=scheduler,
                            scaling=VAE_SCALING_FACTOR, policies=POLICIES, null_prompt=null, device=device,
                            dtype=torch.bfloat16)

    ready = inputs(batches[0], 0)
    split: dict[str, list[float]] = {"vae": [], "t5": [], "step": []}

    def bare(i):
        step.run(*ready)

    def cogfun(i):
        loss, norm = step.run(*inputs(batches[i % 2], i))
        loss.item(), float(norm)   # cogfun train logs both every step

    def online(i):
        vae, tokenizer_ids, t5, pixels = encoders
        t0 = time.perf_counter()
        mean, logvar = models.encode_clips(vae, pixels)
        masked = models.encode_clips(vae, masked_clip(pixels, "i2v"))[0]
        sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            prompt = t5(tokenizer_ids)[0]
        sync(device)
        t2 = time.perf_counter()
        encoded = {"latent_mean": mean, "latent_logvar": logvar, "prompt_embeds": prompt,
                   **{f"masked_latents.{p}": masked for p in POLICIES}}  # stays on the device
        batch = {"tensors": {k: v.to(torch.bfloat16) for k, v in encoded.items()},
                 "metas": [{"frames": args.frames, "bucket": "gpu", "masks": {}}], "batch_id": i}
        loss, norm = step.run(*inputs(batch, i))
        loss.item(), float(norm)
        t3 = time.perf_counter()
        for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2)):
            split[k].append(v)

    sides = {"cogfun": cogfun, "online": online} if encoders else {"bare": bare, "cogfun": cogfun}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.warmup + args.steps):
        for name, fn in sides.items():
            sync(device)
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            if i == args.warmup - 1:
                for v in split.values():
                    v.clear()
    med = {k: C.median(v) for k, v in times.items()}
    if encoders:
        out = {"online_s": med["online"], "online_peak_memory": peak_memory(device),
               "online_over_cogfun": C.median(C.per_round_ratio(times["online"], times["cogfun"])),
               "online_split_s": {k: C.median(v) for k, v in split.items()}}
    else:
        out = {"checkpointing": checkpointing, "peak_memory": peak_memory(device), "bare_s": med["bare"],
               "cogfun_s": med["cogfun"],
               "cogfun_over_bare": C.median(C.per_round_ratio(times["cogfun"], times["bare"]))}
    del step, model
    return out


def make_encoders(args, cfgs, device):
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    vae = build(AutoencoderKLCogVideoX, cfgs["vae"], device, torch.bfloat16).eval().requires_grad_(False)
    if args.vae_tiling:
        vae.enable_tiling()
    t5 = build(T5EncoderModel, {"config": T5Config(**cfgs["t5"])}, device, torch.bfloat16).eval()
    t5.requires_grad_(False)
    ids = torch.randint(2, cfgs["t5"]["vocab_size"], (1, 226), device=device)
    pixels = (torch.rand(1, 3, args.frames, args.height, args.width, device=device) * 2 - 1).to(torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for m in (vae, t5) for p in m.parameters())
    return (vae, ids, t5, pixels), nbytes


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    import torch
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()

    args.frames = args.frames or (9 if args.tiny else 49)
    args.height = args.height or (64 if args.tiny else 480)
    args.width = args.width or (64 if args.tiny else 720)
    args.steps = args.steps or (3 if args.tiny else 10)
    cfgs = configs(args.tiny)
    flops = step_flops(args, cfgs)
    tokens = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16) + 226
    result = {"machine": C.machine(args.threads), "shape": [args.frames, args.height, args.width], "tokens": tokens,
              "base_weight_dtype": args.base_weight_dtype, "offload_blocks": args.offload_blocks,
              "tiny": args.tiny, "rank": args.rank, "step_tflop": flops / 1e12}
    print(f"{'tiny' if args.tiny else 'CogVideoX-2b-InP-shaped'} transformer, {args.frames}x{args.height}x"
          f"{args.width} ({tokens} tokens), LoRA rank {args.rank}: {flops / 1e12:.4g} TFLOP per step (fwd+bwd)")
    result["host_prep_s"] = host_prep_seconds(args, cfgs["transformer"].get("text_embed_dim", 4096))
    print(f"batch_inputs on this host's CPU at this shape: {result['host_prep_s'] * 1e3:.1f} ms per step "
          f"({args.threads} thread(s))")
    if args.meta:
        return finish(args, result)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no GPU here: use --tiny for a CPU smoke check, or --meta for the FLOP count")
    peak = matmul_peak(device)
    result["matmul_peak_tflops"] = peak / 1e12
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]

    def attempt(ckpt, encoders=None) -> dict:
        try:
            return run_sides(args, cfgs, device, ckpt, encoders)
        except torch.OutOfMemoryError as exc:
            return {"error": f"out of memory: {str(exc).splitlines()[0][:80]}"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    runs = [{"checkpointing": c, **attempt(c)} for c in settings]  # transformer only: no encoders yet
    for r in runs:
        if "cogfun_s" in r:
            r["mfu"] = flops / r["cogfun_s"] / peak
    result["encoder_weight_bytes"] = 0
    if args.online:
        encoders, result["encoder_weight_bytes"] = make_encoders(args, cfgs, device)
        for r in runs:
            r.update(attempt(r["checkpointing"], encoders))
    result["runs"] = runs
    report(result)
    finish(args, result)


def report(result) -> None:
    print(f"measured bf16 matmul peak: {result['matmul_peak_tflops']:.3g} TFLOP/s")
    rows = []
    for r in result["runs"]:
        get = lambda k, f: f.format(r[k]) if k in r else r.get("error", "-")  # noqa: E731
        rows.append([r["checkpointing"], get("bare_s", "{:.3f}"), get("cogfun_s", "{:.3f}"),
                     get("cogfun_over_bare", "{:.3f}"), get("mfu", "{:.1%}"),
                     f"{r['peak_memory'] / 2**30:.2f} GiB" if "peak_memory" in r else "-",
                     get("online_s", "{:.3f}"), get("online_over_cogfun", "{:.2f}x"),
                     f"{r['online_peak_memory'] / 2**30:.2f} GiB" if "online_peak_memory" in r else "-"])
    print(C.table(rows, ["grad ckpt", "bare s", "cogfun s", "cogfun/bare", "MFU (cogfun)", "peak mem",
                         "online s", "online/cogfun", "online peak mem"]))
    print("(peak mem: torch.cuda.max_memory_allocated on a GPU; the process's peak RSS on a CPU)")
    for r in result["runs"]:
        if "online_split_s" in r:
            total = sum(r["online_split_s"].values())
            print(f"online split (grad ckpt {r['checkpointing']}): " + ", ".join(
                f"{k} {v:.3f} s ({100 * v / total:.0f} %)" for k, v in r["online_split_s"].items()))
    if result["encoder_weight_bytes"]:
        print(f"VAE + T5 weights resident in the online process: {result['encoder_weight_bytes'] / 2**30:.3g} GiB")


def finish(args, result) -> None:
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
