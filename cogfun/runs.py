"""Runs a user can trust: one training run per output dir, resumed only from its own checkpoints,
recording what it really used, and stopped cleanly by a signal.

- `claim_output_dir`: an --output_dir holding another run (its run_config.json, log, LoRA files or
  checkpoints) is refused unless the run resumes, or `--overwrite` deletes that run first.
- `identity` / `check_resume`: a checkpoint records the run it belongs to (shard fingerprint,
  transformer, LoRA rank / alpha / target names) and the settings it was trained with. A resume
  refuses another run's checkpoint and settings that change the batch order, naming every
  difference; other changed settings apply from the next step and are reported.
- `adopt_shard_settings`: training from shards uses the data settings the shards were made with
  (their manifest); a data flag given with another value is refused (or, with
  --allow_data_flag_mismatch, warned about); validation defaults to the shards' largest video bucket.
- `StopRequest`: SIGINT / SIGTERM ask the loop to save a checkpoint at the next step boundary.

No torch at module level.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from cogfun.config import (DataArgs, PrecomputeConfig, ConfigError, fingerprint_keys, given_settings,
                           num_views_setting)

RUN_CONFIG = "run_config.json"
TRAIN_LOG = "train_log.jsonl"
EVAL_FILES = "eval_files.txt"
# what marks a dir as holding a run, besides checkpoint-*/ and the LoRA files
RUN_FILES = (RUN_CONFIG, TRAIN_LOG, EVAL_FILES)
LORA_FILES = "pytorch_lora_weights*.safetensors"
# also deleted by --overwrite: TensorBoard's run and the validation videos (validation/, a checked
# cache of the encoded prompts, is kept; so is anything else in the dir)
RUN_OUTPUTS = ("logs/cogfun", "samples/step-*")

# Settings of a run that fix the batch order and the held-out set: a checkpoint's data position
# means nothing under other values, so a resume refuses a change. (So does a change of the
# micro-batches per step, --gradient_accumulation_steps x ranks; either factor alone may change.)
BATCH_ORDER = ("train_batch_size", "seed", "video_repeat", "eval_samples")
# Settings that do not describe the training (how this launch was started).
NOT_SETTINGS = ("resume_from_checkpoint", "overwrite", "allow_data_flag_mismatch")
# Settings `cogfun train` reads although precompute declares them too; the others of PrecomputeConfig
# describe how the shards were made and are taken from their manifest.
TRAIN_READS = ("pretrained_model_name_or_path", "shard_dir", "train_data_dir", "train_data_meta", "seed",
               "mixed_precision", "dataloader_num_workers", "random_frame_crop", "video_repeat",
               "mask_policy_weights", "overwrite", "low_vram")


# ------------------------------------------------------------------ one run per output dir

def run_entries(output_dir: Path) -> list[Path]:
    """What of a training run `output_dir` holds: run record, LoRA files, checkpoints (none: no run);
    then its TensorBoard logs and validation videos."""
    if not output_dir.is_dir():
        return []
    found = [output_dir / n for n in RUN_FILES if (output_dir / n).exists()]
    found += sorted(output_dir.glob(LORA_FILES))
    found += sorted(output_dir.glob("checkpoint-*"), key=checkpoint_step) + sorted(output_dir.glob(".checkpoint-*.tmp"))
    if found:
        found += [p for pattern in RUN_OUTPUTS for p in sorted(output_dir.glob(pattern))]
    return found


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint-<step> folder (-1 for another name)."""
    tail = path.name.split("-", 1)[1]
    return int(tail) if tail.isdigit() else -1


def describe_entries(entries: list[Path]) -> str:
    ckpts = [p.name for p in entries if p.name.startswith("checkpoint-")]
    rest = [_shown(p) for p in entries if not p.name.startswith("checkpoint-")]
    if ckpts:
        rest.append(f"{len(ckpts)} checkpoint(s) " + (ckpts[0] if len(ckpts) == 1 else f"{ckpts[0]} .. {ckpts[-1]}"))
    return ", ".join(rest)


def _shown(p: Path) -> str:
    name = f"{p.parent.name}/{p.name}" if p.parent.name in ("logs", "samples") else p.name
    return name + ("/" if p.is_dir() else "")


def claim_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool, delete: bool = True) -> list[str]:
    """Make `output_dir` this run's: refuse one holding another run unless `resuming` (the resume
    checks the checkpoint) or `overwrite`, which deletes that run (`delete`=False: check only).
    Returns the names deleted."""
    entries = run_entries(output_dir)
    if not entries or resuming:
        return []
    if not overwrite:
        raise ConfigError(f"--output_dir {output_dir} holds a run ({describe_entries(entries)}). One run per "
                          f"output dir: continue it with --resume_from_checkpoint latest, start over with "
                          f"--overwrite (deletes that run), or give another --output_dir.")
    names = [_shown(p) for p in entries]
    if delete:
        for p in entries:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    return names


# ------------------------------------------------------------------ which run a checkpoint belongs to

def transformer_identity(model: str) -> str:
    """The transformer a LoRA was trained on: its config.json and the names and sizes of its weight
    files (hashing gigabytes at every launch would cost more than it tells)."""
    from cogfun.models import component_dir, read_component_config

    folder = component_dir(model, "transformer")
    files = sorted((p.name, p.stat().st_size) for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    blob = json.dumps([read_component_config(model, "transformer"), files], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def identity(cfg, manifest: dict) -> dict:
    """What makes two trainings the same run: the shards, the transformer, the LoRA's shape."""
    return {"shards_fingerprint": manifest["fingerprint"], "model": str(cfg.pretrained_model_name_or_path),
            "transformer": transformer_identity(cfg.pretrained_model_name_or_path), "rank": cfg.rank,
            "network_alpha": cfg.network_alpha, "target_name": cfg.target_name}


def settings_record(cfg) -> dict:
    """The settings a run trains with, as a checkpoint records them."""
    from cogfun.config import to_dict

    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_SETTINGS}


def check_resume(where: Path, record: dict | None, mine: dict, settings: dict, world: int) -> dict:
    """Refuse to resume from a checkpoint (or a run record) of another run, or with a changed batch
    order, naming every difference. `record`: what the checkpoint wrote ({"run": identity,
    "config": settings}); `mine`: this launch's identity and settings. Returns the settings that
    changed {name: [checkpoint's, now]}, which apply from the next step. `world`: this launch's ranks."""
    if not record or "run" not in record:
        raise ConfigError(f"cannot resume from {where}: it records no run identity (made by an older cogfun), so "
                          f"cannot be checked to belong to this run. Start a new run (another --output_dir, or "
                          f"--overwrite without --resume_from_checkpoint).")
    old, problems = record["run"], []
    if old["shards_fingerprint"] != mine["shards_fingerprint"]:
        problems.append(f"shards: it was trained on shards {old['shards_fingerprint'][:12]}, --shard_dir holds "
                        f"{mine['shards_fingerprint'][:12]}")
    if old["transformer"] != mine["transformer"]:
        problems.append(f"model: it was trained on the transformer of {old['model']}, this run loads another "
                        f"({mine['model']}: other config or weight files)")
    for key, flag in (("rank", "--rank"), ("network_alpha", "--network_alpha"), ("target_name", "--target_name")):
        if old[key] != mine[key]:
            problems.append(f"LoRA {flag}: {old[key]} in the checkpoint, {mine[key]} now")
    other_run = bool(problems)
    before = record.get("config", {})
    for key in BATCH_ORDER:
        if key in before and before[key] != settings[key]:
            problems.append(f"--{key}: {before[key]} in the checkpoint, {settings[key]} now (it fixes the batch "
                            f"order / held-out files the checkpoint's data position refers to)")
    if "gradient_accumulation_steps" in before and "world_size" in record:
        was = (before["gradient_accumulation_steps"], record["world_size"])
        now = (settings["gradient_accumulation_steps"], world)
        if was[0] * was[1] != now[0] * now[1]:
            problems.append(f"micro-batches per step (--gradient_accumulation_steps x ranks): {was[0]} x {was[1]} in "
                            f"the checkpoint, {now[0]} x {now[1]} now (a step's batches would differ; keep the "
                            f"product, e.g. twice the accumulation on half the ranks)")
    if problems:
        head = "it belongs to another run" if other_run else "its batch order cannot change on resume"
        raise ConfigError(f"cannot resume from {where}: {head}:\n  " + "\n  ".join(problems)
                          + "\nResume with the settings it was made with, or start a new run (another "
                            "--output_dir, or --overwrite without --resume_from_checkpoint to delete this one).")
    return {k: [before[k], v] for k, v in settings.items() if k in before and before[k] != v}


# ------------------------------------------------------------------ data settings come from the shards

def shard_settings() -> list[str]:
    """The settings that describe how shards are made (the manifest records them), i.e. those of
    PrecomputeConfig that `cogfun train` does not read for itself."""
    return [f.name for f in fields(PrecomputeConfig) if f.name not in TRAIN_READS]


def _normal(key: str, value, made: dict):
    """A shard setting's value as the shards' bytes see it (`made`: the shards' settings)."""
    train_mode = made.get("train_mode", "normal")
    if key == "num_views":
        return num_views_setting(value)
    if key == "max_views" and str(made.get("num_views")).strip().lower() != "auto":
        return None                                            # read only with --num_views auto
    if key == "train_mode":
        return "normal" if value == "normal" else "inpaint"   # one mode, two names (as CogVideoX-Fun)
    if key == "mask_policies":
        if train_mode == "normal":
            return None                                        # not read without inpaint
        from cogfun.config import MASK_POLICIES

        names = sorted({p.strip() for p in str(value).split(",") if p.strip()})
        return sorted(MASK_POLICIES) if names == ["all"] else names
    return value


def adopt_shard_settings(cfg, manifest: dict) -> list[str]:
    """Set `cfg`'s shard settings to the shards' (what the latents hold, so what trains and what is
    recorded). A data flag the user gave (`config.given_settings`) with another value than the
    shards' is refused, all of them listed, unless --allow_data_flag_mismatch (then returned as
    warnings). Unset validation sizes default to the shards' largest video bucket."""
    made = manifest["config"]
    given = given_settings(cfg)
    byte_keys = set(fingerprint_keys(DataArgs)) | {"vae_mini_batch", "max_image_pixels"}   # change what they hold
    clashes, unused = [], []
    for key in shard_settings():
        if key not in made:
            continue
        mine, theirs = getattr(cfg, key), made[key]
        if _normal(key, mine, made) == _normal(key, theirs, made):
            continue
        if key in given:
            (clashes if key in byte_keys else unused).append(f"--{key} {mine} (the shards: {theirs})")
        setattr(cfg, key, theirs)
    warnings = []
    if unused and not cfg.train_data_meta:   # (the seed's form used them, if the shards needed encoding)
        warnings.append("note: precompute-only flags, unused when training from existing shards (they do not "
                        "change what the shards hold): " + "; ".join(unused))
    if clashes:
        where = f"--shard_dir {cfg.shard_dir}"
        if not cfg.allow_data_flag_mismatch:
            raise ConfigError(f"{where} was precomputed with other data settings than these flags give:\n  "
                              + "\n  ".join(clashes) + "\nTraining reads the shards as they were made. Drop these "
                              "flags, precompute shards with them (another --shard_dir), or pass "
                              "--allow_data_flag_mismatch to train on the shards' settings anyway.")
        warnings.append(f"WARNING: {where}: ignoring data flags the shards contradict (--allow_data_flag_mismatch); "
                        f"training on and recording the shards' settings: " + "; ".join(clashes))
    videos = [b for b in manifest["buckets"].values() if b["frames"] > 1] or list(manifest["buckets"].values())
    if videos:
        big = max(videos, key=lambda b: (b["tokens"], b["height"] * b["width"], b["frames"]))
        for key, value in (("validation_num_frames", big["frames"]), ("validation_height", big["height"]),
                           ("validation_width", big["width"])):
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
    return warnings


# ------------------------------------------------------------------ stopping on a signal

class Interrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving `checkpoint`; exit status 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}")


class StopRequest:
    """From `install()` to `restore()`, SIGINT and SIGTERM (a SLURM preemption sends SIGTERM) do not
    end the process: they set `signum`, and the training loop saves a checkpoint at the next step
    boundary and stops. A second SIGINT more than `REPEAT_S` later raises KeyboardInterrupt (stop
    now, without saving); sooner it is the same request (Ctrl-C reaches the workers both from the
    terminal and forwarded by accelerate's / torchrun's launcher). Outside the main thread nothing
    is installed."""

    REPEAT_S = 2.0

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.at = 0.0
        self.announce = announce
        self.previous: dict = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - self.at > self.REPEAT_S:
                raise KeyboardInterrupt
            return
        self.signum, self.at = signum, time.monotonic()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  f"(Ctrl-C again, after {self.REPEAT_S:g} s: stop now, without saving)", file=sys.stderr, flush=True)


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """`argv` (a `cogfun train ...` command line) resuming from `checkpoint`."""
    import shlex

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume_from_checkpoint":
            skip = True
            continue
        if a.startswith("--resume_from_checkpoint="):
            continue
        args.append(a)
    return shlex.join(args + ["--resume_from_checkpoint", str(checkpoint)])
