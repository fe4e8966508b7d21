"""Low-memory training: fp8 storage of the frozen transformer (--base_weight_dtype) and block offloading
(--offload_blocks), side by side in one run.

1. `cogfun train` itself (stages.train.train, in this process), tiny InP model, 20 steps, bf16 compute,
   gradient checkpointing, the same shards and seed: bf16 | float8_e4m3fn | bf16 + every block offloaded |
   fp8 + every block offloaded. The frozen bytes on the device and in CPU copies are what the run
   records in run_config.json; losses and step times come from its train_log.jsonl (the runs go one
   after another, in alternating order over --rounds, so step-time ratios are medians of per-round ratios).
2. Real shapes, exactly and for free: the frozen-weight bytes of CogVideoX-Fun 2b / 5b transformers
   built on the meta device with the seed's LoRA, bf16 vs fp8 (diffusers' skip list), and what stays bf16.
3. Memory held at the end of a training forward, one step of the tiny model per option, counted
   exactly: frozen weights on the device + the tensors autograd keeps for the backward (saved-tensor
   hooks, unique storages) that are weights or weight copies. This shows what fp8 storage saves at
   the step's peak with and without gradient checkpointing.
4. Why not diffusers' `enable_group_offload` for training (measured on the CPU with its disk offload,
   which is what makes its in-place data swap visible without a GPU): gradients vs no offload, and its
   onload / offload calls in one checkpointed step.
5. The estimate `inspect-buckets --pretrained_model_name_or_path` prints (cogfun.lowmem) against what
   autograd really keeps in a CPU training step of a small model; and its figures for a 5b at 49x480x720.
6. GPU (when one exists): a CogVideoX-Fun-5b-shaped LoRA step at 49x480x720 (17,776 tokens), gradient
   checkpointing, peak memory (torch.cuda.max_memory_allocated) next to the estimate, and step time per
   option. Skipped on a CPU.

  python bench/lowmem.py            # ~3 min on 2 CPU cores
  python bench/lowmem.py --quick
"""

from __future__ import annotations

import json
import time

import common as C

TARGETS = "to_q,to_k,to_v,ff.0,ff.2"
OPTIONS = {"bf16": {}, "fp8": {"base_weight_dtype": "float8_e4m3fn"},
           "bf16+offload": {"offload_blocks": 2}, "fp8+offload": {"base_weight_dtype": "float8_e4m3fn", "offload_blocks": 2}}
REAL = {  # CogVideoX-Fun transformer configs (diffusers' defaults are 2b's)
    "2b-InP": {"in_channels": 33},
    "5b-InP": {"in_channels": 33, "num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
}


def kb(n: float) -> str:
    return f"{n / 1e3:.1f} KB"


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="training steps per run (20)")
    p.add_argument("--rounds", type=int, default=None, help="repeats of the 4 training runs (2)")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds of the step-time comparison (30)")


# ------------------------------------------------------------------ 1. cogfun train, each option


def product_runs(args) -> dict:
    import statistics

    from accelerate.state import AcceleratorState, GradientState

    from cogfun.stages.train import train

    model = C.tiny_model()
    meta = C.clip_dataset(C.n_clips(True))
    shards = C.shards_for(model, meta, size=64, frames=9)
    out: dict[str, dict] = {k: {"step_s": []} for k in OPTIONS}
    for r in range(args.rounds):
        order = list(OPTIONS) if r % 2 == 0 else list(reversed(OPTIONS))
        for name in order:
            folder = C.scratch(f"lowmem-{name}")
            cfg = C.train_config(model, shards, folder, steps=args.steps, mixed_precision="bf16",
                                 gradient_checkpointing=True, dataloader_num_workers=0, learning_rate=1e-3,
                                 **OPTIONS[name])
            C.quiet(train, cfg)
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
            run = json.loads((folder / "run_config.json").read_text())
            out[name].update(losses=[row["loss"] for row in rows], on_device=run["frozen_bytes_on_device"],
                             offloaded=run["frozen_bytes_offloaded"], layers=run["offloaded_layers"])
            out[name]["step_s"].append(statistics.median(row["step_time"] for row in rows[2:]))
    return out


def report_product(res: dict) -> None:
    base = res["bf16"]
    rows = []
    for name, r in res.items():
        ref = res["fp8" if name == "fp8+offload" else "bf16"]
        dl = [abs(a - b) for a, b in zip(r["losses"], base["losses"])]
        same = "equal" if r["losses"] == ref["losses"] else f"max {max(abs(a - b) for a, b in zip(r['losses'], ref['losses'])):.2g}"
        ratios = C.per_round_ratio(r["step_s"], base["step_s"])
        rows.append([name, kb(r["on_device"]), f"{r['on_device'] / base['on_device']:.3f}", kb(r["offloaded"]),
                     r["layers"], f"{max(dl):.2e} / {sum(dl) / len(dl):.2e}",
                     f"{max(d / b for d, b in zip(dl, base['losses'])):.2e}",
                     same if name.endswith("offload") else "-",
                     f"{C.median(r['step_s']) * 1e3:.0f}", f"{C.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"])
    print(C.table(rows, ["option", "frozen on device", "/ bf16", "in CPU copies", "hooked layers",
                         "|loss - bf16| max / mean", "max relative", "loss vs same dtype w/o offload",
                         "step ms", "step time / bf16"]))
    C.goal("frozen bytes on the device fp8 / bf16 (tiny model)", res["fp8"]["on_device"] / base["on_device"], "<=", 0.52)


def step_times(args) -> dict:
    """Seconds per training step of each option, the four models side by side, step after step
    (`C.interleave`): BIG_TINY transformer (4 blocks x 128 wide) + LoRA r16, 17x128x128, bf16 autocast,
    checkpointing, AdamW; every block offloaded for the offload options."""
    import torch

    from cogfun import lowmem, models
    from cogfun.lora import inject_lora

    model = C.tiny_model(C.BIG_TINY)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 33, 16, 16, generator=gen).bfloat16()
    text = torch.randn(1, 226, 32, generator=gen).bfloat16()
    target = torch.randn(1, 5, 16, 16, 16, generator=gen)
    steps = {}
    for name, opt in OPTIONS.items():
        t = models.load_transformer(model, torch.bfloat16)
        inject_lora(t, rank=16, alpha=8, target_name=TARGETS, seed=0, lora_dtype=torch.float32)
        t.enable_gradient_checkpointing()
        lowmem.apply_base_weight_dtype(t, lowmem.storage_dtype(opt.get("base_weight_dtype"), torch.bfloat16),
                                       torch.bfloat16)
        lowmem.offload_blocks(t, len(t.transformer_blocks) if opt.get("offload_blocks") else 0, "cpu")
        params = [p for p in t.train().parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=1e-4)

        def step(t=t, optim=optim):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]), return_dict=False)[0]
            torch.nn.functional.mse_loss(out.float(), target).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        steps[name] = step
    times = C.interleave(steps, repeat=args.repeat, warmup=2)
    rows = []
    for name, ts in times.items():
        ratios = C.per_round_ratio(ts, times["bf16"])
        rows.append([name, f"{C.median(ts) * 1e3:.1f}", f"{C.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"])
    print(C.table(rows, ["option (BIG_TINY, 17x128x128, grad ckpt)", "step ms (median)",
                         "step time / bf16, per round (min-max)"]))
    return {k: {"median_s": C.median(v), "ratio": C.median(C.per_round_ratio(v, times["bf16"]))} for k, v in times.items()}


# ------------------------------------------------------------------ 2. real shapes on meta


def real_bytes() -> dict:
    import torch
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    from cogfun import lowmem
    from cogfun.lora import inject_lora

    out = {}
    for name, kw in REAL.items():
        with init_empty_weights():
            t = CogVideoXTransformer3DModel(**kw).to(torch.bfloat16)
        inject_lora(t, rank=128, alpha=64, target_name=TARGETS, lora_dtype=torch.float32)
        bf16 = sum(p.nbytes for p in t.parameters() if not p.requires_grad)
        lowmem.apply_base_weight_dtype(t, torch.float8_e4m3fn, torch.bfloat16)
        fp8 = sum(p.nbytes for p in t.parameters() if not p.requires_grad)
        kept: dict[str, int] = {}
        for n, p in t.named_parameters():
            if not p.requires_grad and p.dtype == torch.bfloat16:
                key = ".".join(n.split(".")[2:-1]) if n.startswith("transformer_blocks.") else n.split(".")[0]
                kept[key] = kept.get(key, 0) + p.nbytes
        modulation = kept.get("norm1.linear", 0) + kept.get("norm2.linear", 0)
        out[name] = {"bf16": bf16, "fp8": fp8, "kept_bf16": kept, "modulation": modulation,
                     "lora": sum(p.nbytes for p in t.parameters() if p.requires_grad)}
    return out


def report_real(res: dict) -> None:
    rows = []
    for name, r in res.items():
        top = sorted(r["kept_bf16"].items(), key=lambda kv: -kv[1])[:3]
        rows.append([name, f"{r['bf16'] / 1e9:.2f} GB", f"{r['fp8'] / 1e9:.2f} GB", f"{r['fp8'] / r['bf16']:.3f}",
                     ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in top),
                     f"{(r['fp8'] - r['modulation'] / 2) / r['bf16']:.3f}", f"{r['lora'] / 1e6:.0f} MB"])
    print(C.table(rows, ["transformer (meta)", "frozen bf16", "frozen fp8", "fp8 / bf16", "kept in bf16 (largest)",
                         "if the AdaLN modulation Linears were fp8 too", "LoRA r128 fp32"]))
    C.goal("frozen bytes fp8 / bf16 (CogVideoX-Fun-5b, diffusers' skip list)", res["5b-InP"]["fp8"] / res["5b-InP"]["bf16"], "<=", 0.52)


# ------------------------------------------------------------------ 3. what a step holds


def held_at_end_of_forward(storage, offload: bool, checkpointing: bool) -> dict:
    """One forward of the tiny InP transformer + LoRA at 9x64x64: bytes of frozen weights in the
    module + weights / weight copies autograd holds for the backward (unique storages; on a GPU
    both would be device memory), then the backward."""
    import torch

    from cogfun import lowmem
    from cogfun.lora import inject_lora
    from cogfun.tiny import build_tiny_components

    t = build_tiny_components("inp")["transformer"].to(torch.bfloat16)
    inject_lora(t, rank=16, alpha=8, target_name=TARGETS, seed=0, lora_dtype=torch.float32)
    if checkpointing:
        t.enable_gradient_checkpointing()
    lowmem.apply_base_weight_dtype(t, storage, torch.bfloat16)
    lowmem.offload_blocks(t, len(t.transformer_blocks) if offload else 0, "cpu")
    t.train()
    frozen = {n: p for n, p in t.named_parameters() if not p.requires_grad}
    shapes = {tuple(p.shape) for p in frozen.values()} | {tuple(p.shape[::-1]) for p in frozen.values() if p.ndim == 2}
    resident = {p.untyped_storage().data_ptr(): p.nbytes for p in frozen.values() if not p.is_meta}
    held: dict[int, int] = {}

    def pack(x):
        if tuple(x.shape) in shapes and x.untyped_storage().data_ptr() not in resident:
            held[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 33, 8, 8, generator=gen).to(torch.bfloat16)
    text = torch.randn(1, 226, 32, generator=gen).to(torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda y: y), torch.autocast("cpu", dtype=torch.bfloat16):
        out = t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]), return_dict=False)[0]
    out.float().square().mean().backward()
    return {"resident": sum(resident.values()), "saved_copies": sum(held.values())}


def report_held() -> dict:
    import torch

    rows, res = [], {}
    for ckpt in (False, True):
        for name, (storage, offload) in {"bf16": (torch.bfloat16, False), "fp8": (torch.float8_e4m3fn, False),
                                         "bf16+offload": (torch.bfloat16, True),
                                         "fp8+offload": (torch.float8_e4m3fn, True)}.items():
            r = res[(name, ckpt)] = held_at_end_of_forward(storage, offload, ckpt)
            rows.append([name, "on" if ckpt else "off", kb(r["resident"]), kb(r["saved_copies"]),
                         kb(r["resident"] + r["saved_copies"]),
                         f"{(r['resident'] + r['saved_copies']) / (res[('bf16', ckpt)]['resident']):.2f}"])
    print(C.table(rows, ["option", "grad ckpt", "frozen weights in the module", "weight copies kept for backward",
                         "weights held at the end of the forward", "/ bf16 resident"]))
    print("(tiny InP transformer; with checkpointing the recompute of one block adds that block's copies during "
          "its backward, not counted here)")
    return res


# ------------------------------------------------------------------ 4. diffusers' group offload


def diffusers_group_offload() -> list[dict]:
    import tempfile

    import torch
    from diffusers.hooks import group_offloading as go

    from cogfun.lora import inject_lora
    from cogfun.tiny import build_tiny_components

    def make():
        t = build_tiny_components("t2v")["transformer"]
        inject_lora(t, rank=4, alpha=4, target_name=TARGETS, seed=1, lora_dtype=torch.float32)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(3)
            for n, p in t.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        return t.train()

    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 2, 16, 8, 8, generator=gen), torch.randn(1, 226, 32, generator=gen)

    def step(t):
        out = t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]), return_dict=False)[0]
        out.square().mean().backward()
        return torch.cat([p.grad.flatten() for p in t.parameters() if p.requires_grad])

    ref = step(make())
    calls = {"onload": 0, "offload": 0}
    onload, offload = go.ModuleGroup.onload_, go.ModuleGroup.offload_

    def counted(name, fn):
        def wrapper(self):
            calls[name] += 1
            return fn(self)
        return wrapper

    go.ModuleGroup.onload_, go.ModuleGroup.offload_ = counted("onload", onload), counted("offload", offload)
    rows = []
    try:
        for ckpt in (False, True):
            with tempfile.TemporaryDirectory() as d:
                t = make()
                if ckpt:
                    t.enable_gradient_checkpointing()
                t.enable_group_offload(onload_device="cpu", offload_device="cpu", offload_type="block_level",
                                       num_blocks_per_group=1, offload_to_disk_path=d)
                calls.update(onload=0, offload=0)
                g = step(t)
                rows.append({"checkpointing": ckpt, "grads_finite": bool(torch.isfinite(g).all()),
                             "max_abs_diff": float((g - ref).abs().nan_to_num(float("inf")).max()),
                             "grad_max": float(ref.abs().max()), **calls})
    finally:
        go.ModuleGroup.onload_, go.ModuleGroup.offload_ = onload, offload
    print(C.table([[r["checkpointing"], r["grads_finite"], f"{r['max_abs_diff']:.3g}", f"{r['grad_max']:.3g}",
                    r["onload"], r["offload"]] for r in rows],
                  ["grad ckpt", "LoRA grads finite", "max |grad - no offload|", "max |grad|", "group onloads",
                   "group offloads"]))
    return rows


# ------------------------------------------------------------------ 5. the inspect-buckets estimate


def estimate_vs_step() -> list[dict]:
    """The activation part of `estimate_training_memory` (meta tensors, one block scaled) against what
    autograd really keeps in a CPU training forward (bf16 autocast) of the whole model, BIG_TINY
    transformer (4 blocks x 128 wide); then the estimate for a CogVideoX-Fun-5b at 49x480x720."""
    import tempfile
    from pathlib import Path

    import torch

    from cogfun import lowmem, models
    from cogfun.lora import inject_lora

    model = C.tiny_model(C.BIG_TINY)
    rows = []
    for frames, size in ((9, 64), (17, 128)):
        est = lowmem.estimate_training_memory(model, [(frames, size, size)], rank=16, alpha=8, target_name=TARGETS)
        for name, storage in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
            t = models.load_transformer(model, torch.bfloat16)
            inject_lora(t, rank=16, alpha=8, target_name=TARGETS, seed=0, lora_dtype=torch.float32)
            lowmem.apply_base_weight_dtype(t, storage, torch.bfloat16)
            held = [p.untyped_storage() for p in t.train().parameters()]
            weights = {s._cdata for s in held}
            saved: dict[int, int] = {}

            def pack(x):
                if x.untyped_storage()._cdata not in weights:
                    saved[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
                return x

            x = torch.randn(1, (frames - 1) // 4 + 1, 33, size // 8, size // 8).bfloat16()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda y: y), torch.autocast("cpu", dtype=torch.bfloat16):
                t(hidden_states=x, encoder_hidden_states=torch.randn(1, 226, 32).bfloat16(),
                  timestep=torch.tensor([500]), return_dict=False)
            b = est["buckets"][0]
            predicted = b["peak"][name]["no_checkpointing"] - est["frozen_weight_bytes"][name] - est["lora_state_bytes"]
            rows.append({"shape": f"{size}x{size}x{frames}", "option": name, "tokens": b["tokens"],
                         "measured": sum(saved.values()), "estimated": predicted})
    print(C.table([[r["shape"], r["tokens"], r["option"], kb(r["measured"]), kb(r["estimated"]),
                    f"{r['estimated'] / r['measured']:.3f}"] for r in rows],
                  ["bucket", "tokens", "base", "kept for backward: measured (CPU step)", "estimated (meta)",
                   "estimate / measured"]))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "transformer").mkdir()
        (Path(d) / "transformer" / "config.json").write_text(json.dumps(REAL["5b-InP"]))
        est = lowmem.estimate_training_memory(d, [(49, 480, 720)], rank=128, alpha=64, target_name=TARGETS)
    peak = est["buckets"][0]["peak"]
    print(C.table([[k, f"{v['checkpointing'] / 2**30:.1f} GiB", f"{v['no_checkpointing'] / 2**30:.1f} GiB"]
                   for k, v in peak.items()],
                  ["5b-InP, 49x480x720, LoRA r128 (estimate)", "with grad ckpt", "without"]))
    return {"tiny": rows, "5b_49x480x720": peak}


# ------------------------------------------------------------------ 6. GPU


def measure_options(config: dict, frames: int, height: int, width: int, device, steps: int) -> list[dict]:
    """Per option: peak memory and median step time of a LoRA step (r128, seed's targets, AdamW, clip,
    bf16 autocast, checkpointing) of a random `config` transformer, built on `device` (fast init) and
    then cast / offloaded; the peak is reset after that set-up, so it is the training step's own."""
    import gc

    import torch
    from cogfun import lowmem
    from cogfun.lora import inject_lora
    from cogfun.positions import FunTransformer

    device = torch.device(device)
    cuda = device.type == "cuda"
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    results = []
    for name, opt in OPTIONS.items():
        t = optim = None
        try:
            with torch.device(device):
                t = FunTransformer(**config).to(torch.bfloat16)
            inject_lora(t, rank=128, alpha=64, target_name=TARGETS, seed=0, lora_dtype=torch.float32)
            t.enable_gradient_checkpointing()
            storage = torch.float8_e4m3fn if opt.get("base_weight_dtype") else torch.bfloat16
            lowmem.apply_base_weight_dtype(t, storage, torch.bfloat16)
            lowmem.offload_blocks(t, len(t.transformer_blocks) if opt.get("offload_blocks") else 0, device)
            params = [p for p in t.train().parameters() if p.requires_grad]
            optim = torch.optim.AdamW(params, lr=1e-4)
            x = torch.randn(1, lat[0], config.get("in_channels", 16), lat[1], lat[2], device=device, dtype=torch.bfloat16)
            text = torch.randn(1, 226, t.config.text_embed_dim, device=device, dtype=torch.bfloat16)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(2 + steps):
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500], device=device),
                            return_dict=False)[0]
                out.float().square().mean().backward()
                torch.nn.utils.clip_grad_norm_(params, 0.05)
                optim.step()
                optim.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            results.append({"option": name, "peak": torch.cuda.max_memory_allocated() if cuda else C.self_peak_rss(),
                            "step_s": C.median(times)})
        except torch.OutOfMemoryError as exc:
            results.append({"option": name, "error": f"out of memory: {str(exc).splitlines()[0][:60]}"})
        finally:
            del t, optim
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return results


def gpu_runs(args) -> list[dict]:
    import tempfile
    from pathlib import Path

    from cogfun import lowmem

    frames, height, width = 49, 480, 720
    results = measure_options(REAL["5b-InP"], frames, height, width, "cuda", args.gpu_steps)
    with tempfile.TemporaryDirectory() as d:   # what inspect-buckets would have said
        (Path(d) / "transformer").mkdir()
        (Path(d) / "transformer" / "config.json").write_text(json.dumps(REAL["5b-InP"]))
        est = lowmem.estimate_training_memory(d, [(frames, height, width)], rank=128, alpha=64,
                                              target_name=TARGETS)["buckets"][0]["peak"]
    for r in results:
        r["estimate"] = est[r["option"]]["checkpointing"]
    base = next((r for r in results if r["option"] == "bf16" and "peak" in r), None)
    print(C.table([[r["option"], f"{r['peak'] / 2**30:.2f} GiB" if "peak" in r else r["error"],
                    f"{r['estimate'] / 2**30:.2f} GiB", f"{r['step_s']:.2f}" if "step_s" in r else "-",
                    f"{r['step_s'] / base['step_s']:.2f}" if base and "step_s" in r else "-"] for r in results],
                  ["option (5b-shaped, 49x480x720, grad ckpt)", "peak memory (max_memory_allocated)",
                   "inspect-buckets estimate", "step s", "step / bf16"]))
    return results


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    import torch
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    args.steps = args.steps or (8 if args.quick else 20)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.repeat = args.repeat or (8 if args.quick else 30)
    args.gpu_steps = 3
    result = {"machine": C.machine(args.threads)}
    print(f"\n## 1. cogfun train, tiny InP model, {args.steps} steps, bf16 compute, gradient checkpointing, "
          f"{args.rounds} round(s)")
    result["product"] = product_runs(args)
    report_product(result["product"])
    print(f"\nstep time side by side (one process, {args.repeat} interleaved rounds):")
    result["step_times"] = step_times(args)
    print("\n## 2. frozen-weight bytes of the real transformers (meta device, LoRA r128 on the seed's targets)")
    result["real"] = real_bytes()
    report_real(result["real"])
    print("\n## 3. weights held at the end of a training forward (one step, tiny InP transformer, 9x64x64)")
    result["held"] = {f"{k[0]} ckpt={k[1]}": v for k, v in report_held().items()}
    print("\n## 4. diffusers' enable_group_offload in training (disk offload on the CPU)")
    result["diffusers_group_offload"] = diffusers_group_offload()
    print("\n## 5. the inspect-buckets estimate against a real step")
    result["estimate"] = estimate_vs_step()
    print("\n## 6. GPU: CogVideoX-Fun-5b-shaped LoRA step")
    if torch.cuda.is_available():
        result["gpu"] = gpu_runs(args)
    else:
        print("no GPU on this machine: skipped (run this script on a GPU machine for the peak-memory table)")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
