"""Shared helpers for the benchmarks in bench/.

Import this module first: it pins the thread count (OMP_NUM_THREADS, default 1) before torch is
imported, so every side of every comparison runs with the same threads. The rest:

- `parse_args`: the common command line (--quick, --threads) plus a script's own options.
- `interleave`: time several callables round-robin (warm-up, then repeats side by side), so that
  load from other users of this shared machine hits every side alike; `median`, `spread`,
  `per_round_ratio`.
- `TrainSetup`, `LoraStep`, `OnlineEncoder`: the three ways to take a step (cogfun's batches and
  `batch_inputs`; the bare LoRA step; CogVideoX-Fun's per-step encoding), built from product code.
- `tiny_model`, `clip_dataset`, `shards_for`: a tiny InP model folder (optionally with a larger
  transformer), a synthetic clip dataset of one bucket, and its precomputed shards, cached under
  bench/out/ (git-ignored) by their parameters.
- `real_sample`, `write_real_shards`: random bf16 samples of real CogVideoX shapes written with the
  product's `encode_sample` + `BucketWriters`, plus the index/manifest the train loader reads.
- `measure_process`, `run_child`, `self_peak_rss`: a command's output and peak RSS.
- `table`, `save_figure`, `machine`: reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"            # caches and scratch (git-ignored)
FIGURES = BENCH / "figures"    # committed PNGs (full runs; --quick ones go to bench/out/figures)
QUICK = False
PYTHON = sys.executable
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------------ command line


def parse_args(description: str, add=None) -> argparse.Namespace:
    """--quick (< 2 min here), --threads N (sets OMP_NUM_THREADS for this run and its children)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 2 min on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]),
                   help="torch threads on every side (default: $OMP_NUM_THREADS or 1)")
    if add:
        add(p)
    args = p.parse_args()
    global QUICK
    QUICK = args.quick
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {machine(args.threads)}")
    return args


def machine(threads: int | None = None) -> str:
    import platform

    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    return (f"{dev}, torch {torch.__version__}, python {platform.python_version()}, "
            f"threads {threads or torch.get_num_threads()}")


# ------------------------------------------------------------------ timing


def median(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    """'median (min-max)' of a list of numbers."""
    return f"{median(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def interleave(fns: dict, *, repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each callable, run round-robin: warm-up rounds, then `repeat` rounds.

    A callable may return a number, which is then used instead of its wall time (for callables
    that time their own inner part, e.g. steps after a set-up).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            got = fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(float(got) if isinstance(got, (int, float)) else dt)
    return times


def per_round_ratio(num: list[float], den: list[float]) -> list[float]:
    """Ratios of values measured in the same round (num[i] / den[i])."""
    return [a / b for a, b in zip(num, den)]


# ------------------------------------------------------------------ tiny model + clips + shards

def n_clips(quick: bool) -> int:
    """Clips in the shared benchmark dataset (one epoch is longer than any measured run)."""
    return 12 if quick else 32


BIG_TINY = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "time_embed_dim": 64}


def tiny_model(transformer: dict | None = None, *, variant: str = "inp") -> Path:
    """A tiny model folder (bench/out/models/...), the transformer optionally overridden."""
    from cogfun.tiny import diffusers_kwargs, transformer_config, write_tiny_model

    transformer = dict(transformer or {})
    tag = variant + "".join(f"-{k[:6]}{v}" for k, v in sorted(transformer.items()))
    path = OUT / "models" / tag
    if (path / "model_index.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_model(tmp, variant, seed=0)
    if transformer:
        import torch
        from diffusers import CogVideoXTransformer3DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CogVideoXTransformer3DModel(**diffusers_kwargs({**transformer_config(variant), **transformer}))
        shutil.rmtree(tmp / "transformer")
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def clip_dataset(n_clips: int, *, frames: int = 24, scale: int = 1) -> Path:
    """metadata.json of `n_clips` videos (the synthetic dataset's four long clips, hard-linked
    under distinct names, each with its own caption): one bucket when center-cropped."""
    from cogfun.tiny import caption_corpus, write_synthetic_dataset

    root = OUT / "data" / f"clips{n_clips}-f{frames}-s{scale}"
    meta = root / "clips.json"
    if meta.exists():
        return meta
    shutil.rmtree(root, ignore_errors=True)
    write_synthetic_dataset(root / "src", seed=0, n_frames=frames, scale=scale)
    long = ["landscape", "portrait", "square", "wide"]
    captions = caption_corpus(n_clips, seed=1)
    (root / "videos").mkdir(parents=True)
    rows = []
    for i in range(n_clips):
        dst = root / "videos" / f"c{i:04d}.mp4"
        os.link(root / "src" / "videos" / f"{long[i % 4]}.mp4", dst)
        rows.append({"file_path": f"videos/{dst.name}", "text": captions[i], "type": "video"})
    meta.write_text(json.dumps(rows, indent=1))
    return meta


def data_flags(meta: Path, *, size: int, frames: int, train_mode: str = "inpaint") -> dict:
    """Data settings that put every clip of `clip_dataset` in one size x size x frames bucket."""
    return dict(train_data_dir=str(meta.parent), train_data_meta=str(meta), video_sample_size=size,
                image_sample_size=size, token_sample_size=size, video_sample_n_frames=frames,
                video_sample_stride=1, train_mode=train_mode, mask_policies="i2v,first_last", seed=42)


def precompute_config(model: Path, meta: Path, shard_dir: Path, *, size: int, frames: int, **over):
    from cogfun.config import PrecomputeConfig

    kw = dict(pretrained_model_name_or_path=str(model), shard_dir=str(shard_dir), mixed_precision="no",
              dataloader_num_workers=1, **data_flags(meta, size=size, frames=frames))
    kw.update(over)
    return PrecomputeConfig(**kw)


def train_config(model: Path, shard_dir: Path, output_dir: Path, *, steps: int, **over):
    from cogfun.config import TrainConfig

    kw = dict(pretrained_model_name_or_path=str(model), shard_dir=str(shard_dir), output_dir=str(output_dir),
              train_mode="inpaint", mixed_precision="no", max_train_steps=steps, checkpointing_steps=10**9,
              rank=16, network_alpha=8.0, learning_rate=1e-4, report_to="none", dataloader_num_workers=1,
              seed=42)
    kw.update(over)
    return TrainConfig(**kw)


def cli_flags(cfg) -> list[str]:
    """The `cli.py` flags that reproduce a config (every non-default setting)."""
    import dataclasses

    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            flags.append(f"--{f.name}")
        else:
            flags += [f"--{f.name}", str(value)]
    return flags


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shards_for(model: Path, meta: Path, *, size: int, frames: int) -> Path:
    """Precomputed shards (cached by model, data and shape; rebuilt when of an older shard format)."""
    from cogfun import shards
    from cogfun.stages.precompute import precompute

    shard_dir = OUT / "shards" / f"{model.name}--{meta.parent.name}--{size}x{frames}"
    made = shards.read_manifest(shard_dir, check_version=False)
    if made is None or made["format_version"] != shards.FORMAT_VERSION:
        precompute(precompute_config(model, meta, shard_dir, size=size, frames=frames, overwrite=True),
                   progress=False)
    return shard_dir


def scratch(name: str) -> Path:
    """An empty folder bench/out/tmp/<name>."""
    path = OUT / "tmp" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def read_step_times(output_dir: Path, skip: int) -> list[float]:
    """step_time of `cogfun train`'s train_log.jsonl, first `skip` steps left out."""
    rows = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows[skip:]]


# ------------------------------------------------------------------ the three ways to take a step


class TrainSetup:
    """What `cogfun train` sets up around its loop, rebuilt from the same product functions:
    scheduler, scaling, mask policies, null prompt, the loader's batches, `batch_inputs`."""

    def __init__(self, cfg):
        import torch
        from safetensors.torch import load_file

        from cogfun import models, shards

        self.cfg, self.shard_dir = cfg, Path(cfg.shard_dir)
        self.manifest = shards.require_manifest(self.shard_dir)
        self.scheduler = models.load_scheduler(cfg.pretrained_model_name_or_path)
        self.scaling = float(self.manifest["model"]["scaling_factor"])
        self.policies = list(self.manifest["mask_policies"])
        self.null_prompt = load_file(str(self.shard_dir / shards.NULL_PROMPT))["prompt_embeds"].float()  # local dir
        self.torch = torch

    def batches(self, n: int, epoch: int = 0) -> list[dict]:
        """The first `n` batches `cogfun train` draws (same dataset, sampler, collate), read in this thread."""
        import itertools

        from cogfun.loader import BucketBatchSampler, CachedSamples, batches, index_rows

        dataset = CachedSamples(self.shard_dir, self.manifest)
        sampler = BucketBatchSampler(index_rows(dataset), batch_size=self.cfg.train_batch_size,
                                     world=1, rank=0, accumulation=1, seed=self.cfg.seed)
        sampler.set_epoch(epoch)
        return list(itertools.islice(batches(dataset, sampler, threads=0), n))

    def inputs(self, batch: dict, epoch: int = 0):
        from cogfun.stages.train import batch_inputs

        return batch_inputs(batch, epoch=epoch, cfg=self.cfg, scheduler=self.scheduler, scaling=self.scaling,
                            policies=self.policies, null_prompt=self.null_prompt, device="cpu",
                            dtype=self.torch.float32)


class LoraStep:
    """The bare step: LoRA-injected transformer (injected as `cogfun train` does), fwd + MSE + bwd
    + clip + AdamW, on inputs already in memory. `model`: a transformer to use instead of loading
    the one of `cfg`; `autocast`: a dtype to run the forward under (bf16 as `--mixed_precision
    bf16`), on `device`."""

    def __init__(self, cfg, *, model=None, device="cpu", autocast=None):
        import torch

        from cogfun import models
        from cogfun.lora import inject_lora

        self.torch, self.device, self.autocast = torch, torch.device(device), autocast
        if model is None:
            model = models.load_transformer(cfg.pretrained_model_name_or_path, torch.float32)
        self.model = model
        model.requires_grad_(False)
        inject_lora(model, rank=cfg.rank, alpha=cfg.network_alpha, target_name=cfg.target_name,
                    seed=cfg.seed, lora_dtype=torch.float32)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        self.max_grad_norm = cfg.max_grad_norm
        model.train()

    def run(self, model_in, prompts, timesteps, target):
        """One step; returns (loss, grad norm) as tensors (no host sync)."""
        import contextlib

        torch = self.torch
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            pred = self.model(hidden_states=model_in, encoder_hidden_states=prompts, timestep=timesteps,
                              return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach(), norm

    def __call__(self, *inputs) -> float:
        return self.run(*inputs)[0].item()


class OnlineEncoder:
    """CogVideoX-Fun's per-step work before the LoRA step: decode the clip, VAE-encode it and a
    masked copy (inpaint), T5-encode the caption; with the product's own encode functions.
    `__call__` turns a cached batch's metas into the same batch dict the loader yields (so that
    `batch_inputs` and the step are shared), and returns the seconds spent per part."""

    PARTS = ("decode", "vae", "t5")

    def __init__(self, pcfg):
        import torch

        from cogfun import models
        from cogfun.buckets import Sampling
        from cogfun.dataset import load_sources, probe_and_plan

        self.torch = torch
        model = pcfg.pretrained_model_name_or_path
        self.vae = models.load_vae(model, torch.float32, "cpu")
        self.tokenizer, self.t5 = models.load_text_encoder(model, torch.float32, "cpu")
        sources, _ = load_sources(pcfg.train_data_meta, pcfg.train_data_dir)
        plans, _, by_key = probe_and_plan(sources, Sampling.from_config(pcfg), workers=1, progress=False)
        self.plans = {p.key: p for p in plans}
        self.sources = by_key
        from cogfun.config import mask_policy_list

        self.policies = mask_policy_list(pcfg)

    def __call__(self, batch: dict, step: int) -> tuple[dict, dict]:
        import random

        from cogfun import models, video
        from cogfun.buckets import sample_key
        from cogfun.masks import masked_clip

        torch = self.torch
        t: dict[str, float] = dict.fromkeys(self.PARTS, 0.0)
        tensors: dict[str, list] = {}
        for meta in batch["metas"]:
            plan = self.plans[sample_key(meta.get("identity", meta["source"]), meta["view"])]
            src = self.sources[plan.key]
            t0 = time.perf_counter()
            pixels = video.frames_to_tensor(video.decode_video(src.path, plan.frame_indices, plan.resize_hw,
                                                               plan.crop_box, media=src.media))[None]
            t1 = time.perf_counter()
            mean, logvar = models.encode_clips(self.vae, pixels)
            policy = random.Random(step).choice(self.policies)   # one random mask per step
            masked = models.encode_clips(self.vae, masked_clip(pixels, policy))[0]
            t2 = time.perf_counter()
            prompt = models.encode_prompts(self.tokenizer, self.t5, [src.text])
            t3 = time.perf_counter()
            t["decode"] += t1 - t0
            t["vae"] += t2 - t1
            t["t5"] += t3 - t2
            parts = {"latent_mean": mean[0], "latent_logvar": logvar[0], "prompt_embeds": prompt[0]}
            parts.update({f"masked_latents.{p}": masked[0] for p in self.policies})
            for k, v in parts.items():
                tensors.setdefault(k, []).append(v)
        out = {"tensors": {k: torch.stack(v) for k, v in tensors.items()}, "metas": batch["metas"],
               "batch_id": batch["batch_id"]}
        return out, t


# ------------------------------------------------------------------ real-shape samples

REAL_TEXT = (226, 4096)      # T5-XXL, 226 tokens
REAL_POLICIES = ("i2v", "first_last")


def real_sample(frames: int, height: int, width: int, *, policies=REAL_POLICIES, seed: int = 0,
                text: tuple[int, int] = REAL_TEXT) -> dict:
    """Random bf16 tensors of one real sample: latents [F', 16, H/8, W/8] (mean, logvar, one per
    mask policy) and the T5 prompt embedding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lat = ((frames - 1) // 4 + 1, 16, height // 8, width // 8)
    names = ["latent_mean", "latent_logvar"] + [f"masked_latents.{p}" for p in policies]
    out = {n: torch.randn(lat, generator=g).to(torch.bfloat16) for n in names}
    out["prompt_embeds"] = torch.randn(text, generator=g).to(torch.bfloat16)
    return out


def payload_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_real_shards(shard_dir: Path, n: int, *, frames: int, height: int, width: int,
                      per_tar: int = 16, policies=REAL_POLICIES, per_table: int = 400_000) -> dict:
    """Write `n` real-shape samples (one distinct caption each) in the product's format: tars with
    `encode_sample` + `BucketWriters`, the caption table(s) (`per_table` embeddings each at most:
    safetensors caps a header at 100 MB), index.parquet and a manifest with what the train loader
    reads. Returns the manifest. A few distinct random samples are reused (the bytes of random bf16
    do not compress either way)."""
    from cogfun import shards
    from cogfun.buckets import sample_key

    shard_dir.mkdir(parents=True, exist_ok=True)
    writers = shards.BucketWriters(shard_dir, 0, "bench", per_tar)
    bucket = f"{height}x{width}x{frames}"
    pool = [real_sample(frames, height, width, policies=policies, seed=s) for s in range(4)]
    table = {}
    for i in range(n):
        caption = f"caption {i}"
        meta = {"source": f"videos/c{i:05d}.mp4", "caption": caption, "prompt": shards.prompt_key(caption),
                "kind": "video", "bucket": bucket, "view": 0, "base": height, "frame_indices": list(range(frames)),
                "frames": frames, "height": height, "width": width, "latent_frames": (frames - 1) // 4 + 1,
                "tokens": ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)}
        sample = dict(pool[i % len(pool)])
        table[meta["prompt"]] = sample.pop("prompt_embeds").clone()   # one embedding per distinct caption
        writers.write(bucket, shards.encode_sample(sample_key(meta["source"], 0), meta, sample))
    writers.close()
    (shard_dir / shards.PROMPTS).mkdir(exist_ok=True)
    keys, table_of = list(table), {}
    for start in range(0, len(keys), per_table):
        table_rel = f"{shards.PROMPTS}/000-bench-{start:07d}.safetensors"
        shards.save_tensors({k: table[k] for k in keys[start:start + per_table]}, shard_dir / table_rel)
        table_of.update(dict.fromkeys(keys[start:start + per_table], table_rel))
    rows = shards.scan_shards(shard_dir)
    shards.write_index(shard_dir, rows, table_of)
    counts = shards.tar_sample_counts(shard_dir)
    manifest = {"format_version": shards.FORMAT_VERSION, "shards": counts, "num_samples": len(rows),
                "mask_policies": list(policies),
                "shard_bytes": {s: (shard_dir / s).stat().st_size for s in counts},
                "prompt_tables": {t: (shard_dir / t).stat().st_size for t in sorted(set(table_of.values()))}}
    shards.write_json_atomic(shard_dir / shards.MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------ processes


def measure_process(cmd: list[str], *, env: dict | None = None, interval: float = 0.02) -> dict:
    """Run `cmd`; return rc, wall seconds, output and `tree_peak_rss`, the peak of the summed RSS
    of its whole process tree (sampled every `interval` s).

    Not ru_maxrss (getrusage RUSAGE_CHILDREN / wait4): Linux carries the high-water mark of the
    process that forked the child across exec (signal->maxrss), so every child of a big parent
    reports at least the parent's size. The child's own peak is its VmHWM (`self_peak_rss`)."""
    import threading

    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    tree_peak = 0
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(interval)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return {"rc": proc.returncode, "wall": wall, "output": b"".join(chunks).decode(errors="replace"),
            "tree_peak_rss": tree_peak}


def run_child(args: list[str], *, env: dict | None = None) -> dict:
    """Run `python <args>` whose last stdout line starting with "{" is a JSON report; return it
    with `measure_process`'s wall time and peak RSS figures added."""
    res = measure_process([PYTHON, *args], env=env)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed (rc {res['rc']}):\n{res['output'][-4000:]}")
    last = [line for line in res["output"].splitlines() if line.startswith("{")][-1]
    return {**json.loads(last), "wall": res["wall"], "tree_peak_rss": res["tree_peak_rss"]}


def quiet(fn, *args, **kwargs):
    """Call fn with stdout/stderr (progress bars, prints) discarded."""
    import contextlib

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        return fn(*args, **kwargs)


def self_peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM, the high-water mark of its own address space
    (see `measure_process` for why not ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ reporting


def table(rows: list[list], headers: list[str]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([lines[0], lines[1], *map(fmt, cells[1:])])


def goal(name: str, value: float, op: str, target: float) -> str:
    met = value <= target if op == "<=" else value >= target
    line = f"GOAL {name}: {value:.4g} (goal {op} {target:g}) -> {'MET' if met else 'NOT MET'}"
    print(line)
    return line


def save_figure(fig, name: str) -> Path:
    """bench/figures/<name>.png (bench/out/figures/ for --quick runs), kept under 200 KB."""
    folder = OUT / "figures" if QUICK else FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    for dpi in (100, 80, 60):
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        if path.stat().st_size < 200_000:
            break
    print(f"figure: {path.relative_to(ROOT)} ({path.stat().st_size // 1000} KB)")
    return path


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
