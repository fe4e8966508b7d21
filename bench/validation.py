"""Validation during training: memory and time, in the training process vs a side process.

Sides (each its own subprocess of this script, same tiny InP model (BIG_TINY transformer), same
shards, same N = 3K training steps):
  train       `stages.train.train`, no validation
  validate    the same run with --validation_prompts (P prompts, every K steps and at the end):
              the training transformer renders, the VAE is loaded to decode and freed
  side        what validating in a separate process on the saved checkpoint costs instead: a fresh
              process loads the transformer + the checkpoint's LoRA + the VAE, renders the same
              prompts from the same cached inputs (`cogfun.sampling` functions) and exits
Peaks are per phase (VmHWM, reset through /proc/self/clear_refs at each phase boundary; on a GPU
torch.cuda.max_memory_allocated, reset alike): the training steps before the first validation
(T1, includes set-up), each validation (V), the steps between validations (T2, T3): with and
without validation the phases cover the same steps. Seconds per validation are the stage's own
figure (samples/step-N/index.json).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import common as C

PROMPTS = ["A red fox runs across the meadow.", "A golden owl sleeps near the old bridge.",
           "A small boat drifts on the lake.", "A white square slides to the right."]


def add_args(p):
    p.add_argument("--child", choices=("train", "imports", "validate", "side"))
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--every", type=int, default=None, help="K: validation every K steps (N = 3K steps)")
    p.add_argument("--prompts", type=int, default=None, help="P validation prompts")
    p.add_argument("--denoise", type=int, default=None, help="denoising steps per validation video")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=None, help="(side) the output dir of a `validate` child")


# ------------------------------------------------------------------ phase peaks

def peak_now() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


class Phases:
    """Peak per phase; a phase ends at `mark(name)`."""

    def __init__(self):
        self.peaks: list[tuple[str, int]] = []
        reset_peak()

    def mark(self, name: str) -> None:
        self.peaks.append((name, peak_now()))
        reset_peak()


def config(args, out: Path, *, validate: bool):
    model = C.tiny_model(C.BIG_TINY)
    meta = C.clip_dataset(C.n_clips(args.quick))
    shard_dir = C.shards_for(model, meta, size=args.size, frames=args.frames)
    extra = {}
    if validate:
        extra = dict(validation_prompts=" | ".join(PROMPTS[:args.prompts]), validation_steps=args.every,
                     validation_num_frames=args.frames, validation_height=args.size, validation_width=args.size,
                     validation_num_inference_steps=args.denoise)
    return C.train_config(model, shard_dir, out, steps=3 * args.every, dataloader_num_workers=0,
                          checkpointing_steps=args.every, **extra)


def child_train(args, validate: bool, preimport: bool = False) -> dict:
    import cogfun.stages.train as st
    from cogfun import sampling, validation

    if preimport:  # the code validation brings in (PyAV + x264, the pipeline, the VAE), nothing else
        import av  # noqa: F401
        from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline  # noqa: F401

        from cogfun.video import write_mp4  # noqa: F401
    out = C.scratch(f"validation-{'validate' if validate else 'train'}")
    cfg = config(args, out, validate=validate)
    phases = Phases()
    steps = {"n": 0}
    real_inputs, real_render = st.batch_inputs, validation.render
    real_denoise, real_decode = sampling.denoise, sampling.decode
    sub = {"denoise": 0, "decode": 0}

    def denoise(*a, **k):
        try:
            return real_denoise(*a, **k)
        finally:
            sub["denoise"] = max(sub["denoise"], peak_now())

    def decode(*a, **k):
        reset_peak()
        try:
            return real_decode(*a, **k)
        finally:
            sub["decode"] = max(sub["decode"], peak_now())

    sampling.denoise, sampling.decode = denoise, decode

    def batch_inputs(*a, **k):  # the same step boundaries in both runs
        steps["n"] += 1
        if steps["n"] > 1 and (steps["n"] - 1) % args.every == 0 and not validate:
            phases.mark(f"T{(steps['n'] - 1) // args.every}")
        return real_inputs(*a, **k)

    def render(*a, **k):
        phases.mark(f"T{len([p for p in phases.peaks if p[0].startswith('T')]) + 1}")
        seconds = real_render(*a, **k)
        phases.mark(f"V{len([p for p in phases.peaks if p[0].startswith('V')]) + 1}")
        return seconds

    st.batch_inputs, validation.render = batch_inputs, render
    t0 = time.perf_counter()
    C.quiet(st.train, cfg)
    wall = time.perf_counter() - t0
    if not validate:
        phases.mark("T3")
    seconds = [json.loads((out / "samples" / f"step-{s}" / "index.json").read_text())["seconds"]
               for s in (args.every, 2 * args.every, 3 * args.every)] if validate else []
    return {"phases": dict(phases.peaks), "sub": sub, "validation_seconds": seconds, "train_wall": wall, "out": str(out)}


def child_side(args) -> dict:
    """A side process validating checkpoint-K: transformer + LoRA + VAE, the cached inputs, render, exit."""
    import torch
    from safetensors.torch import load_file

    from cogfun import models, sampling, validation

    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = config(args, out, validate=True)
    model = cfg.pretrained_model_name_or_path
    _, geo, spec = validation.inputs_spec(cfg, out, "cpu")
    inputs = load_file(spec["out"])
    transformer = models.load_transformer(model, torch.float32).requires_grad_(False).eval()
    sampling.load_lora(transformer, out / f"checkpoint-{args.every}")
    scheduler = models.load_sampling_scheduler(model)
    latents = [sampling.denoise(transformer, scheduler, inputs[f"prompt_embeds.{i}"], inputs["negative_prompt_embeds"],
                                inputs.get(f"condition.{i}"), geo, steps=args.denoise,
                                guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed, device=torch.device("cpu"),
                                dtype=torch.float32, progress=False) for i in range(args.prompts)]
    del transformer
    vae = models.load_vae(model, torch.float32, torch.device("cpu"), slicing=True)
    vae.enable_tiling()
    frames = [sampling.decode(vae, lat) for lat in latents]
    return {"work_seconds": time.perf_counter() - t0, "self_peak_rss": C.self_peak_rss(), "videos": len(frames)}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    args.every = args.every or (4 if args.quick else 10)
    args.prompts = args.prompts or (2 if args.quick else 4)
    args.denoise = args.denoise or (4 if args.quick else 10)
    common_args = ["--frames", str(args.frames), "--size", str(args.size), "--every", str(args.every),
                   "--prompts", str(args.prompts), "--denoise", str(args.denoise), "--threads", str(args.threads),
                   *(["--quick"] if args.quick else [])]
    if args.child in ("train", "imports", "validate"):
        print(json.dumps(child_train(args, args.child == "validate", preimport=args.child == "imports")))
        return
    if args.child == "side":
        print(json.dumps(child_side(args)))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    C.shards_for(C.tiny_model(C.BIG_TINY), C.clip_dataset(C.n_clips(args.quick)), size=args.size, frames=args.frames)
    runs: dict[str, list[dict]] = {"train": [], "imports": [], "validate": [], "side": []}
    for _ in range(rounds):  # side by side, round-robin
        for side in ("train", "imports", "validate"):
            runs[side].append(C.run_child([__file__, "--child", side, *common_args]))
        runs["side"].append(C.run_child([__file__, "--child", "side", "--out", runs["validate"][-1]["out"],
                                         *common_args]))
    med = lambda side, key: C.median([r["phases"][key] for r in runs[side]])  # noqa: E731
    n = 3 * args.every
    print(f"\n{n} training steps at {args.frames}x{args.size}x{args.size}; validation every {args.every} steps: "
          f"{args.prompts} videos of {args.frames}x{args.size}x{args.size}, {args.denoise} denoising steps, CFG; "
          f"{rounds} round(s), medians")
    rows = []
    for key in ("T1", "V1", "T2", "V2", "T3", "V3"):
        with_v = med("validate", key)
        without = med("train", key) if key.startswith("T") else None
        imports = med("imports", key) if key.startswith("T") else None
        rows.append([key, C.mb(without) if without else "-", C.mb(imports) if imports else "-", C.mb(with_v),
                     f"{with_v / without:.3f}" if without else f"+{C.mb(with_v - med('validate', 'T1'))} over T1",
                     f"{with_v / imports:.3f}" if imports else "-"])
    print(C.table(rows, ["phase (peak)", "no validation", "no validation, its code imported", "with validation",
                         "ratio", "ratio to code-imported"]))
    sub = {k: C.median([r["sub"][k] for r in runs["validate"]]) for k in ("denoise", "decode")}
    print(f"  inside a validation: denoising peak {C.mb(sub['denoise'])}, VAE load + decode peak {C.mb(sub['decode'])}")
    steady = max(med("validate", "T2"), med("validate", "T3")) / max(med("train", "T2"), med("train", "T3"))
    steady_code = max(med("validate", "T2"), med("validate", "T3")) / max(med("imports", "T2"), med("imports", "T3"))
    extra = max(med("validate", k) for k in ("V1", "V2", "V3")) - max(med("train", k) for k in ("T1", "T2", "T3"))
    secs = [s for r in runs["validate"] for s in r["validation_seconds"]]
    side_secs = [r["wall"] for r in runs["side"]]
    side_work = [r["work_seconds"] for r in runs["side"]]
    side_peak = C.median([r["self_peak_rss"] for r in runs["side"]])
    print(f"\n  steady-state training peak, with / without validation: {steady:.3f} "
          f"({steady_code:.3f} against a run that imported validation's code)")
    print(f"  validation's extra peak over the training peak: {C.mb(extra)}")
    print(f"  seconds per validation (in process): {C.spread(secs)}  ({args.prompts} videos)")
    print(f"  training wall, with / without validation: "
          f"{C.median([r['train_wall'] for r in runs['validate']]) / C.median([r['train_wall'] for r in runs['train']]):.2f}")
    print(f"\n  side process on checkpoint-{args.every}: {C.spread(side_secs)} s wall ({C.spread(side_work)} s after "
          f"its imports), peak RSS {C.mb(side_peak)} (a second process beside the training one, which stays resident)")
    print(f"  side / in-process seconds: {C.median(side_secs) / C.median(secs):.2f}")
    C.goal("steady-state training peak with / without validation", steady, "<=", 1.02)


if __name__ == "__main__":
    main()
