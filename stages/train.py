"""`cogfun train`: LoRA on the CogVideoX transformer from cached latents. Never loads the VAE or T5.

Reads top to bottom: accelerator (DDP / DeepSpeed ZeRO-2 / FSDP, with launch guards) ->
manifest checks -> transformer + LoRA -> data -> resume -> loop -> LoRA export.

Training maths follow CogVideoX-Fun's train_lora.py: DDPM from the model's scheduler config
(v-prediction, zero terminal SNR), t ~ U{0..999}, x0 = posterior sample from the cached
mean/logvar times the VAE scaling factor, MSE on the velocity in fp32, 10 % caption dropout on
the cached empty-caption embedding; the transformer (`cogfun.positions.FunTransformer`) computes
CogVideoX-Fun's positions and, for CogVideoX 1.5 (patch_size_t), appends a zero latent frame to a
1-frame sample for the patch and crops its output back (the loss covers the real frame);
with `add_noise_in_inpaint_model` the conditioning carries reference noise (cogfun.masks). Every
random draw of a batch comes from generators seeded by (seed, epoch, global batch id), so a resumed
run (and a run on another world size) sees the same noise for the same batch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from cogfun import runs, shards
from cogfun.config import ConfigError, TrainConfig, to_dict
from cogfun.masks import MASK_DESIGN
from cogfun.shards import ShardError

CHECKPOINT_STATE = "cogfun_state.json"
CROP_FULL_PROB = 0.9   # --random_frame_crop: CogVideoX-Fun keeps all video_sample_n_frames 90 % of the time


# ------------------------------------------------------------------ launch

def launch_kind() -> str:
    """What `accelerate launch` asked for, from the environment it sets."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def make_accelerator(cfg: TrainConfig, output_dir: Path):
    """An Accelerator that really is what the launch asked for (checked), CPU-capable."""
    import torch
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    from cogfun.dist import LaunchError, check_world

    kind = launch_kind()
    cuda = torch.cuda.is_available()
    common = dict(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                  mixed_precision=cfg.mixed_precision,
                  log_with=None if cfg.report_to == "none" else cfg.report_to,
                  project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                      logging_dir=str(output_dir / cfg.logging_dir)))
    handlers = [] if cuda or int(os.environ.get("WORLD_SIZE", "1")) == 1 else [InitProcessGroupKwargs(backend="gloo")]
    if kind == "deepspeed":
        # Never cpu=True with DeepSpeed: accelerate would silently drop DeepSpeed and run DDP.
        accelerator = Accelerator(kwargs_handlers=handlers, **common)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        clip = ds.get("gradient_clipping", "auto")
        if clip not in ("auto", None) and float(clip) != cfg.max_grad_norm:
            raise ConfigError(f"the DeepSpeed config sets gradient_clipping={clip} but --max_grad_norm is "
                              f"{cfg.max_grad_norm}; make them agree (or set it to \"auto\")")
        # Without this key DeepSpeed never clips and accelerate's clip call is a no-op.
        ds["gradient_clipping"] = cfg.max_grad_norm
        ds["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
        ds.pop("train_batch_size", None)
        want = DistributedType.DEEPSPEED
    elif kind == "fsdp" and not cuda:
        # accelerate will not pick FSDP without a GPU-class device; build it on a CPU state.
        from accelerate.utils import FullyShardedDataParallelPlugin

        os.environ["ACCELERATE_USE_FSDP"] = "false"     # let the CPU Accelerator come up as MULTI_CPU
        try:
            accelerator = Accelerator(cpu=True, kwargs_handlers=handlers, **common)
        finally:
            os.environ["ACCELERATE_USE_FSDP"] = "true"
        # Every rank loads the same weights and seeds LoRA alike: no module-state sync needed
        # (it needs a GPU-class device). FSDP1 on CPU diverges on resume and crashes on full
        # state gathers (measured), so the CPU path is FSDP2, which is exact.
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
        os.environ["FSDP_VERSION"] = "2"
        plugin = FullyShardedDataParallelPlugin()
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        from accelerate.state import PartialState

        # AcceleratorState re-reads PartialState's view whenever it is constructed again
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        want = DistributedType.FSDP
    else:
        accelerator = Accelerator(cpu=not cuda, kwargs_handlers=handlers, **common)
        want = (DistributedType.FSDP if kind == "fsdp" else
                (DistributedType.MULTI_GPU if cuda else DistributedType.MULTI_CPU) if kind == "ddp" else
                DistributedType.NO)
    check_world(accelerator.num_processes)
    if accelerator.distributed_type != want:
        raise LaunchError(f"the launch asked for {kind} but accelerate set up {accelerator.distributed_type}; "
                          f"refusing to train on a silently degraded launch")
    return accelerator


# ------------------------------------------------------------------ checks

def weight_dtypes(cfg: TrainConfig):
    """(compute, storage) dtype of the frozen transformer: --mixed_precision's (fp32 under FSDP, which
    shards one flat dtype per unit and computes in bf16 through its policy) and --base_weight_dtype's
    (default: the compute dtype)."""
    import torch

    from cogfun.lowmem import storage_dtype
    from cogfun.models import dtype_of

    compute = torch.float32 if launch_kind() == "fsdp" else dtype_of(cfg.mixed_precision)
    return compute, storage_dtype(cfg.base_weight_dtype, compute)


def check_shards_fit(manifest: dict, tcfg, train_mode: str, family=None) -> None:
    """Refuse shards that do not fit the transformer (latent channels, text dim, in_channels) or
    were made for another model family (`family`: the frame rule of patch_size_t, reference noise,
    the frames its positions cover)."""
    from cogfun.buckets import VAE_TEMPORAL, latent_frames, parse_bucket

    model = manifest["model"]
    problems = []
    if family is not None:
        made = manifest.get("latent_frame_multiple", 1)
        if made != family.latent_multiple:
            problems.append(f"frame rule: the shards were made for latent frame counts in multiples of {made} "
                            f"(patch_size_t {made if made > 1 else 'none'}), this transformer patches "
                            f"{family.latent_multiple} latent frame(s) at a time (patch_size_t "
                            f"{family.patch_size_t or 'none'}); precompute the shards with this model")
        longest = max((parse_bucket(b)[2] for b in manifest.get("buckets", {})), default=1)
        if family.position_frames is not None and latent_frames(longest) > family.position_frames:
            problems.append(f"frames: the shards hold {longest}-frame samples ({latent_frames(longest)} latent frames); "
                            f"this model's sincos positions cover {family.position_frames} latent frames "
                            f"(transformer config sample_frames), as in CogVideoX-Fun's transformer class; "
                            f"precompute with --video_sample_n_frames <= "
                            f"{(family.position_frames - 1) * VAE_TEMPORAL + 1}")
        noise = bool(manifest.get("reference_noise"))
        if train_mode in ("inpaint", "i2v") and manifest["mask_policies"] and noise != family.reference_noise:
            problems.append("reference noise: " + (
                "the transformer config asks for it (add_noise_in_inpaint_model: true) but the shards were "
                "precomputed without it" if family.reference_noise else
                "the shards carry it but the transformer config does not ask for it (no "
                "add_noise_in_inpaint_model)") + "; precompute the shards with this model")
    if model["latent_channels"] != tcfg.out_channels:
        problems.append(f"latent channels: shards {model['latent_channels']}, transformer out_channels {tcfg.out_channels}")
    if model["text_dim"] != tcfg.text_embed_dim:
        problems.append(f"text dim: shards {model['text_dim']}, transformer text_embed_dim {tcfg.text_embed_dim}")
    inpaint = train_mode in ("inpaint", "i2v")
    want_in = 2 * model["latent_channels"] + 1 if inpaint else model["latent_channels"]
    if tcfg.in_channels != want_in:
        problems.append(f"in_channels: --train_mode {train_mode} needs {want_in}, the transformer has "
                        f"{tcfg.in_channels} ({'an InP model needs --train_mode inpaint' if tcfg.in_channels == 2 * model['latent_channels'] + 1 else 'a text-to-video model needs --train_mode normal'})")
    if inpaint and not manifest["mask_policies"]:
        problems.append("--train_mode inpaint needs masked-clip latents, but the shards were precomputed with "
                        "--train_mode normal")
    elif inpaint and manifest.get("mask_design") != MASK_DESIGN:
        problems.append(f"mask design: the shards' masks were made by {manifest.get('mask_design') or 'an older cogfun'} "
                        f"(no per-sample mask geometry), this cogfun trains {MASK_DESIGN}; re-run precompute "
                        f"(with --overwrite, or into a new --shard_dir)")
    if problems:
        raise ShardError("the shards do not fit this transformer:\n  " + "\n  ".join(problems))


def mask_weights(cfg: TrainConfig, policies: list[str]) -> dict[str, dict[str, float]]:
    """The train-time draw weights {"video": .., "image": ..}: CogVideoX-Fun's over the cached policies,
    with --mask_policy_weights applied. Refuses a weight for a policy the shards do not cache, and
    weights that leave nothing to draw (`cogfun.masks.draw_weights`)."""
    from cogfun.masks import draw_weights

    try:
        return draw_weights(policies, cfg.mask_policy_weights, frame_crop=cfg.random_frame_crop)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def find_checkpoint(output_dir: Path, spec: str | None) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: a folder (a path that does not exist is
    looked for in `output_dir`, as CogVideoX-Fun joins a bare `checkpoint-500` with --output_dir),
    or `latest`: the newest complete one."""
    if not spec:
        return None
    if spec != "latest":
        path = Path(spec)
        if not path.exists() and (output_dir / spec).exists():
            path = output_dir / spec
        if not path.exists():
            raise ConfigError(f"--resume_from_checkpoint {spec}: does not exist (neither {path.absolute()} nor "
                              f"{(output_dir / spec).absolute()}); give a checkpoint-<step> folder or 'latest'")
        if not (path / CHECKPOINT_STATE).is_file():
            raise ConfigError(f"--resume_from_checkpoint {spec}: {path} is not a complete cogfun checkpoint "
                              f"(no {CHECKPOINT_STATE})")
        return path
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoint-<step>/ folders of `output_dir` (their state record written), oldest step first."""
    done = [p for p in output_dir.glob("checkpoint-*") if (p / CHECKPOINT_STATE).is_file()]
    return sorted(done, key=runs.checkpoint_step)


def agree_on_checkpoint(accelerator, output_dir: Path, spec: str | None) -> Path | None:
    """Rank 0's choice of checkpoint, checked on every rank: each must see the state record, the
    LoRA file and its own RNG state in it. A machine that cannot (its --output_dir is not the
    shared one) stops every rank with a message naming the missing files, before anything loads."""
    from accelerate.utils.constants import RNG_STATE_NAME

    from cogfun.dist import broadcast, gather
    from cogfun.lora import LORA_WEIGHT_NAME

    choice = None
    if accelerator.is_main_process:
        try:
            choice = find_checkpoint(output_dir, spec)
        except ConfigError as exc:
            choice = exc
    choice = broadcast(choice, accelerator)
    if isinstance(choice, Exception):
        raise choice
    if choice is None:
        return None
    rank = accelerator.process_index
    need = [choice / CHECKPOINT_STATE, choice / LORA_WEIGHT_NAME, choice / f"{RNG_STATE_NAME}_{rank}.pkl"]
    report = gather([(rank, socket.gethostname(), [str(p) for p in need if not p.is_file()])], accelerator)
    blind = [f"rank {r} on {host} cannot see {', '.join(missing)}" for r, host, missing in report if missing]
    if blind:
        raise ConfigError(f"cannot resume from {choice}: " + "; ".join(blind) + ". Every machine must see the "
                          f"same --output_dir (a shared filesystem): a checkpoint holds the state of every rank, "
                          f"written by that rank.")
    return choice


def resume_or_claim(accelerator, cfg: TrainConfig, output_dir: Path, manifest: dict):
    """One run per output dir, checked on rank 0 before anything loads: a dir holding another run
    is refused unless this launch resumes or --overwrite (the deletion waits until training
    starts); a resume must be from a checkpoint of this run (`runs.check_resume`). Returns
    (checkpoint or None, settings changed since it {name: [old, new]}, the run's change history,
    this run's identity)."""
    from cogfun.dist import broadcast

    mine, settings = runs.identity(cfg, manifest), runs.settings_record(cfg)
    found = None
    if accelerator.is_main_process:
        try:
            runs.claim_output_dir(output_dir, resuming=bool(cfg.resume_from_checkpoint), overwrite=cfg.overwrite,
                                  delete=False)
            found = ({}, [])
            checkpoint = find_checkpoint(output_dir, cfg.resume_from_checkpoint)
            if checkpoint is not None:
                record = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
                found = (runs.check_resume(checkpoint, record, mine, settings, accelerator.num_processes),
                         record.get("changes", []))
            elif cfg.resume_from_checkpoint and (output_dir / runs.RUN_CONFIG).is_file():
                # no checkpoint yet: starting over is fine, but only for this run
                record = json.loads((output_dir / runs.RUN_CONFIG).read_text())
                runs.check_resume(output_dir / runs.RUN_CONFIG, record, mine, settings, accelerator.num_processes)
        except ConfigError as exc:
            found = exc
    found = broadcast(found, accelerator)
    if isinstance(found, Exception):
        raise found
    changes, history = found
    return agree_on_checkpoint(accelerator, output_dir, cfg.resume_from_checkpoint), changes, history, mine


def apply_optimizer_settings(optimizer, lr_scheduler, cfg: TrainConfig) -> None:
    """After a resume: AdamW's learning rate, betas, weight decay and epsilon are the flags' (the
    loaded state holds the checkpoint's); the LR schedule (diffusers': a LambdaLR) keeps its position."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
    sched.base_lrs = [cfg.learning_rate] * len(sched.base_lrs)
    lrs = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group.update(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                     eps=cfg.adam_epsilon)
    sched._last_lr = lrs


def stop_requested(accelerator, stop: runs.StopRequest, device) -> int:
    """The signal (0: none) any rank received: all ranks stop at the same step boundary."""
    signum = stop.signum or 0
    if accelerator.num_processes == 1:
        return signum
    import torch
    import torch.distributed as tdist

    flag = torch.tensor([signum], device=device, dtype=torch.int64)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return int(flag.item())


def held_out_files(dataset, indices: list[int]) -> list[str]:
    """The source files of the held-out samples (`--eval_samples`), sorted."""
    if not indices:
        return []
    import numpy as np

    codes, names = dataset.index.codes("source")   # aligned with dataset.global_indices()
    held = np.unique(codes[np.isin(dataset.global_indices(), np.asarray(indices))]).tolist()
    sources = names.to_pylist()
    return sorted(sources[c] for c in held)


def print_summary(cfg: TrainConfig, train_rows, steps_per_epoch: int, max_steps: int, start: int,
                  world: int, held_files: list[str], n_held: int, output_dir: Path) -> None:
    """The start-up summary: what trains, how long, what is held out, what the progress bar shows."""
    buckets = set(train_rows.bucket.tolist())
    batch = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    held = (f"; {len(held_files)} source file(s) ({n_held} samples) held out for the eval loss, listed in "
            f"{output_dir / runs.EVAL_FILES}" if held_files else "; no eval loss (--eval_samples 0)")
    print(f"train: {len(train_rows)} samples in {len(buckets)} bucket(s){held}")
    print(f"train: {steps_per_epoch} steps per epoch at an effective batch of {batch} samples "
          f"(--train_batch_size {cfg.train_batch_size} x --gradient_accumulation_steps "
          f"{cfg.gradient_accumulation_steps} x {world} rank(s)); {max_steps} steps "
          f"({max_steps / max(1, steps_per_epoch):.1f} epochs)" + (f", from step {start}" if start else "")
          + f"; a checkpoint every {cfg.checkpointing_steps} steps and at the end")
    print("progress bar: loss = the step's training loss (mean over micro-batches and ranks; noisy: the timestep "
          "is random), lr = learning rate, step_s = seconds the step took; the eval loss (held-out files, fixed "
          "noise) is printed on its own line")


# ------------------------------------------------------------------ one batch -> loss inputs

def batch_inputs(batch: dict, *, epoch: int, cfg: TrainConfig, scheduler, scaling: float, policies: list[str],
                 null_prompt, device, dtype, family=None, black=None, sample_n_frames: int | None = None,
                 t_range: tuple[int, int] | None = None, keep_at_most: int | None = None):
    """(model input, prompt embeds, timesteps, velocity target) for one bucket batch.

    All randomness comes from (seed, epoch, batch id): independent of rank, world size, resume.
    random_frame_crop, as CogVideoX-Fun's trainer: it draws T pixel frames from 5, 9, ..., N
    (N = `sample_n_frames`, the --video_sample_n_frames the shards were made with; default the
    config's), T = N with probability 0.9 and the others uniformly, keeps the first min(clip, T)
    frames, and for CogVideoX 1.5 drops an odd latent frame. In latent frames: L from 2..N', keep
    min(F', L), less keep % patch_size_t; a video never keeps a single latent frame, an image is
    never cropped.
    `family` (models.TransformerFamily): its patch_size_t (above); with its reference noise, a sigma
    and a sign per sample scale the cached noise response.
    Inpaint: a mask policy per sample, drawn with `mask_weights` among t2v and the sample's cached
    policies (its json's `masks`: {policy: geometry}); `black` ({bucket: latents} of an all -1 clip):
    10 % of t2v draws get mask 0 + those latents, as CogVideoX-Fun's t2v_flag does.
    `t_range`: [lo, hi) of the timesteps (`timestep_range`); `keep_at_most`: a cap on the latent
    frames kept (`same_token_length_frames`).
    """
    import torch

    from cogfun.buckets import floor_4k1, latent_frames, sample_key
    from cogfun.loader import mask_variant
    from cogfun.masks import (BLACK, BLACK_LATENTS, BLACK_SHARE, PREFIX_SAFE, REFERENCE_NOISE_SIGMA0,
                              conditioning, draw_reference_sigma, parse_weights, weights_for)

    gid = batch["batch_id"]
    rng = random.Random(f"{cfg.seed}:step-draws:{epoch}:{gid}")
    # Draws happen on the training device (a CPU-side draw at 2b size costs ~45 ms a step); a
    # generator per batch keeps them independent of rank, world size and resume.
    gen = torch.Generator(device=device).manual_seed(rng.getrandbits(63))
    t = {k: v.to(device, non_blocking=True) for k, v in batch["tensors"].items()}
    mean = t["latent_mean"].float()
    logvar = t["latent_logvar"].float().clamp(-30.0, 20.0)
    bsz, f_lat = mean.shape[0], mean.shape[1]
    frames = batch["metas"][0]["frames"]

    keep = f_lat
    longest = latent_frames(floor_4k1(sample_n_frames or cfg.video_sample_n_frames))
    if cfg.random_frame_crop and f_lat > 1 and longest >= 2:
        lengths = list(range(2, longest + 1))   # latent frames of 5, 9, ..., N pixel frames
        shorter = (1 - CROP_FULL_PROB) / (len(lengths) - 1) if len(lengths) > 1 else 0.0
        drawn = rng.choices(lengths, weights=[shorter] * (len(lengths) - 1) + [CROP_FULL_PROB])[0]
        keep = min(f_lat, drawn)
        keep -= keep % (family.latent_multiple if family is not None else 1)   # CogVideoX 1.5: whole patches
    if keep_at_most is not None and keep_at_most < keep:   # --keep_all_node_same_token_length
        keep = keep_at_most
    eps = torch.randn(mean.shape, generator=gen, device=device)
    latents = (mean + torch.exp(0.5 * logvar) * eps)[:, :keep] * scaling
    noise = torch.randn(latents.shape, generator=gen, device=device)
    lo, hi = t_range or (0, scheduler.config.num_train_timesteps)
    timesteps = torch.randint(lo, hi, (bsz,), generator=gen, device=device)
    prompts = t["prompt_embeds"].clone()
    for b in range(bsz):
        if rng.random() < cfg.caption_dropout:
            prompts[b] = null_prompt.to(device, prompts.dtype)

    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    model_in = noisy
    if policies:
        noise_scale = [None] * bsz
        if family is not None and family.reference_noise:  # sigma = exp(N(-3, 0.5)) and a sign, per sample
            sigma = draw_reference_sigma(bsz, generator=gen, device=device)
            sign = torch.randint(0, 2, (bsz,), generator=gen, device=device) * 2 - 1
            noise_scale = list(sign * sigma / REFERENCE_NOISE_SIGMA0)
        weights = weights_for(policies, frames, parse_weights(cfg.mask_policy_weights))  # checked by mask_weights
        allowed = [p for p in weights if keep == f_lat or p in PREFIX_SAFE]
        bucket = batch["metas"][0]["bucket"]
        if sum(weights[p] for p in allowed) <= 0:
            raise ConfigError(f"--mask_policy_weights gives every conditioning of bucket {bucket} "
                              f"({', '.join(allowed)}{', frame-cropped' if keep < f_lat else ''}) weight 0")
        if black is not None:
            t[BLACK_LATENTS] = black[bucket][None].to(device)
        conds = []
        for b in range(bsz):
            policy = rng.choices(allowed, weights=[weights[p] for p in allowed])[0]
            if policy == "t2v" and black is not None and rng.random() < BLACK_SHARE:
                policy = BLACK
            meta = batch["metas"][b]
            # --masks_per_policy: the geometry set this epoch shows (cycled as views are; 0 without)
            variant = 0
            if meta.get("mask_variants"):
                variant = mask_variant(cfg.seed, epoch, sample_key(meta["identity"], meta["view"]), meta["views"],
                                       1 + len(meta["mask_variants"]))
            geometry = (meta["masks"] if variant == 0 else meta["mask_variants"][variant - 1]).get(policy)
            conds.append(conditioning(policy, t, b, frames=frames, keep=keep, scaling=scaling,
                                      noise_scale=noise_scale[b], geometry=geometry, device=device, variant=variant))
        model_in = torch.cat([noisy, torch.cat(conds)], dim=2)
    return model_in.to(dtype), prompts.to(dtype), timesteps, target.float()


def timestep_range(cfg: TrainConfig, scheduler, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of this rank's training timesteps: [0, --train_sampling_steps or the scheduler's
    num_train_timesteps); with --uniform_sampling CogVideoX-Fun's DiscreteSampling slice: G groups
    of ranks, G the largest divisor of the world size that divides the step count, group g draws
    from [g * n / G, (g + 1) * n / G)."""
    n = cfg.train_sampling_steps or scheduler.config.num_train_timesteps
    if not 1 <= n <= scheduler.config.num_train_timesteps:
        raise ConfigError(f"--train_sampling_steps must be 1..{scheduler.config.num_train_timesteps} (the "
                          f"scheduler's num_train_timesteps), got {n}")
    if not cfg.uniform_sampling or world == 1:
        return 0, n
    groups = max(g for g in range(1, world + 1) if world % g == 0 and n % g == 0)
    width, interval = world // groups, n // groups
    g = rank // width
    return g * interval, (g + 1) * interval


def same_token_length_frames(cfg: TrainConfig, batch: dict, epoch: int, world: int, family,
                             data: dict | None = None) -> int | None:
    """--keep_all_node_same_token_length, as CogVideoX-Fun: each micro-step draws a token length
    s * s * N, s from 256, 384, ..., token_sample_size (the same draw on every rank: seeded by the
    step, not the rank), and keeps the first (min(s*s*N / (H*W), N) - 1) // 4 * 4 + 1 pixel frames
    (CogVideoX 1.5: an even latent count, or 1 frame). Returns that cap in latent frames (None
    without the flag). N and T: the shards' (`data`, their manifest's config), else cfg's."""
    from cogfun.buckets import VAE_TEMPORAL, latent_frames

    if not cfg.keep_all_node_same_token_length:
        return None
    data = data or {}
    n = data.get("video_sample_n_frames", cfg.video_sample_n_frames)
    t = data.get("token_sample_size", cfg.token_sample_size)
    sides = list(range(256, t + 1, 128)) if t > 256 else [256]
    if sides[-1] != t and t > 256:
        sides.append(t)
    rng = random.Random(f"{cfg.seed}:token-length:{epoch}:{batch['batch_id'] // world}")
    tokens = rng.choice(sides) ** 2 * n
    meta = batch["metas"][0]
    frames = int(max((min(tokens / meta["height"] / meta["width"], n) - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1, 1))
    multiple = family.latent_multiple if family is not None else 1
    frames -= latent_frames(frames) % multiple * VAE_TEMPORAL
    return latent_frames(max(frames, 1))


def auto_tile(cfg: TrainConfig, batch: dict, data: dict | None = None) -> dict:
    """--auto_tile_batch_size with --training_with_video_token_length, as CogVideoX-Fun: a batch
    whose pixel volume F x H x W is at most 1/16 of the token budget N x T^2 is repeated 4x, at most
    1/4 of it 2x (each copy draws its own noise, timestep, posterior sample, caption dropout and
    mask policy). The token budget N x T^2 is the shards' (`data`, their manifest's config, else
    cfg's); the shards were made with --training_with_video_token_length."""
    data = {**{k: getattr(cfg, k) for k in ("video_sample_n_frames", "token_sample_size")}, **(data or {})}
    if not (cfg.auto_tile_batch_size and (cfg.training_with_video_token_length
                                          or data.get("training_with_video_token_length"))):
        return batch
    meta = batch["metas"][0]
    volume = meta["frames"] * meta["height"] * meta["width"]
    budget = data["video_sample_n_frames"] * data["token_sample_size"] ** 2
    factor = 4 if budget // 16 >= volume else 2 if budget // 4 >= volume else 1
    if factor == 1:
        return batch
    tensors = {k: v.repeat(factor, *([1] * (v.dim() - 1))) for k, v in batch["tensors"].items()}
    return {**batch, "tensors": tensors, "metas": batch["metas"] * factor}


def with_motion_loss(loss, pred, target, ratio: float):
    """--motion_sub_loss: CogVideoX-Fun's (1 - ratio) * loss + ratio * MSE of the frame-to-frame
    differences of prediction and target, for samples with more than 2 latent frames."""
    import torch

    if pred.shape[1] <= 2:
        return loss
    motion = torch.nn.functional.mse_loss(pred[:, 1:] - pred[:, :-1], target[:, 1:] - target[:, :-1], reduction="mean")
    return loss * (1 - ratio) + motion * ratio


def make_optimizer(cfg: TrainConfig, params, world: int):
    """AdamW over the LoRA parameters; bitsandbytes' AdamW8bit (--use_8bit_adam) or CAME (--use_came,
    CogVideoX-Fun's betas and eps, no weight decay) when installed. --scale_lr multiplies the rate by
    accumulation x batch x processes."""
    import torch

    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * world
    if cfg.use_8bit_adam and cfg.use_came:
        raise ConfigError("--use_8bit_adam and --use_came choose two optimizers: give one")
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag for "
                              "AdamW)") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_came:
        try:
            from came_pytorch import CAME
        except ImportError:
            raise ConfigError("--use_came needs came_pytorch: pip install came_pytorch (or drop the flag for "
                              "AdamW)") from None
        return CAME(params, lr=lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


EVAL_TIMESTEPS = 9


def eval_loss(accelerator, transformer, dataset, indices: list[int], *, cfg: TrainConfig, scheduler, scaling: float,
              policies: list[str], device, dtype) -> float:
    """Mean velocity MSE of the held-out samples at 9 fixed timesteps (the midpoints of 9 equal
    quantiles of [0, T)), with fixed noise per (sample, timestep), the posterior mean as x0, the
    sample's own caption and a fixed mask policy per sample (clean conditioning, no reference noise):
    the same weights give the same number. Positions and the CogVideoX 1.5 padding: the transformer's own.

    Split across the ranks and reduced; every rank runs the same number of forwards (FSDP gathers
    weights in each). Call on every rank.
    """
    import torch

    from cogfun.masks import conditioning, parse_weights, weights_for

    world, rank = accelerator.num_processes, accelerator.process_index
    n_t = scheduler.config.num_train_timesteps
    timesteps = torch.tensor([int((k + 0.5) * n_t / EVAL_TIMESTEPS) for k in range(EVAL_TIMESTEPS)], device=device)
    mine = indices[rank::world]
    model = accelerator.unwrap_model(transformer)
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for j in range(-(-len(indices) // world)):
        sample = dataset[(mine[j] if j < len(mine) else indices[0], -1)]
        meta = sample["meta"]
        t = {k: v[None].to(device) for k, v in sample["tensors"].items()}
        rng = random.Random(f"{cfg.seed}:eval:{meta['source']}:{meta['view']}")
        gen = torch.Generator(device=device).manual_seed(rng.getrandbits(63))
        latents = (t["latent_mean"].float() * scaling).expand(EVAL_TIMESTEPS, *t["latent_mean"].shape[1:])
        noise = torch.randn(latents.shape, generator=gen, device=device)
        model_in = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        if policies:  # drawn as in training, among the sample's cached policies (geometry from its json)
            weights = weights_for(policies, meta["frames"], parse_weights(cfg.mask_policy_weights))
            allowed = [p for p, w in weights.items() if w > 0]
            policy = rng.choices(allowed, weights=[weights[p] for p in allowed])[0]
            cond = conditioning(policy, t, 0, frames=meta["frames"], keep=latents.shape[1], scaling=scaling,
                                geometry=meta.get("masks", {}).get(policy), device=device)
            model_in = torch.cat([model_in, cond.expand(EVAL_TIMESTEPS, *cond.shape[1:])], dim=2)
        for k in range(EVAL_TIMESTEPS):  # one timestep per forward: a training step's activation size
            with torch.no_grad(), accelerator.autocast():
                pred = model(hidden_states=model_in[k:k + 1].to(dtype), encoder_hidden_states=t["prompt_embeds"].to(dtype),
                             timestep=timesteps[k:k + 1], return_dict=False)[0]
            if j < len(mine):
                total += torch.stack([torch.nn.functional.mse_loss(pred.float(), target[k:k + 1]).double(),
                                      torch.ones((), device=device, dtype=torch.float64)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


# ------------------------------------------------------------------ saving

def save_lora_files(folder: Path, lora_sd: dict, cfg: TrainConfig, targets: list[str], step: int,
                    manifest: dict, *, kohya: bool) -> None:
    from cogfun.lora import EXPORT_FORMATS, save_lora_as
    from cogfun.lowmem import dtype_name

    meta = {"cogfun_step": str(step), "cogfun_config": json.dumps(to_dict(cfg), sort_keys=True),
            "cogfun_shards_fingerprint": manifest["fingerprint"],
            "cogfun_base_weight_dtype": dtype_name(weight_dtypes(cfg)[1])}
    # the diffusers file (resume reads it); with `kohya` also the CogVideoX-Fun/kohya and core ComfyUI files
    for fmt in EXPORT_FORMATS if kohya else ["diffusers"]:
        save_lora_as(fmt, folder / EXPORT_FORMATS[fmt], lora_sd, rank=cfg.rank, alpha=cfg.network_alpha,
                     target_modules=targets, extra_metadata=meta if fmt == "diffusers" else None)


def gather_lora(accelerator, model) -> dict:
    """Full fp32 LoRA tensors on every rank (a collective under FSDP2: call it on all ranks)."""
    from cogfun.lora import lora_state_dict

    return {k: v.float().contiguous() for k, v in lora_state_dict(accelerator.unwrap_model(model)).items()}


@contextmanager
def weights_saved_apart(model):
    """Inside, `model.state_dict()` is empty and `load_state_dict` expects nothing, so accelerate's
    save_state / load_state (plain, DDP, DeepSpeed) write and read no model tensors."""
    def drop(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]

    def expect_nothing(module, incompatible_keys):
        incompatible_keys.missing_keys.clear()

    handles = [model.register_state_dict_post_hook(drop), model.register_load_state_dict_post_hook(expect_nothing)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def save_resume_state(accelerator, model, optimizer, lr_scheduler, folder: Path) -> None:
    """accelerate's resume state without model tensors: optimizer (LoRA parameters only), LR
    scheduler, RNG. The checkpoint never holds the frozen base, and holds the LoRA once, in
    pytorch_lora_weights.safetensors, which `load_resume_state` reads back."""
    if launch_kind() != "fsdp":
        kwargs = {"exclude_frozen_parameters": True} if launch_kind() == "deepspeed" else {}
        with weights_saved_apart(accelerator.unwrap_model(model)):
            accelerator.save_state(str(folder), **kwargs)
        return
    # FSDP: save_state always writes the whole model through DCP (which refuses an empty state
    # dict); write the rest with the helpers save_state itself uses.
    from accelerate.checkpointing import save_accelerator_state
    from accelerate.utils import save_fsdp_optimizer

    save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(folder))
    save_accelerator_state(str(folder), [], [], [lr_scheduler], [], accelerator.process_index, accelerator.step,
                           accelerator.scaler)


def load_resume_state(accelerator, model, optimizer, lr_scheduler, folder: Path) -> None:
    """What `save_resume_state` wrote, then the LoRA from the checkpoint's LoRA file."""
    from safetensors.torch import load_file

    from cogfun.lora import LORA_WEIGHT_NAME, load_lora_state_dict

    kind = launch_kind()
    if kind != "fsdp":
        kwargs = {"load_module_strict": False} if kind == "deepspeed" else {"strict": False}
        with weights_saved_apart(accelerator.unwrap_model(model)):
            accelerator.load_state(str(folder), **kwargs)
    else:
        from accelerate.checkpointing import load_accelerator_state
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(folder))
        restored = load_accelerator_state(str(folder), [], [], [lr_scheduler], [], accelerator.process_index,
                                          accelerator.scaler)
        accelerator.step = restored.get("step", accelerator.step)
    load_lora_state_dict(accelerator.unwrap_model(model), load_file(str(folder / LORA_WEIGHT_NAME)))


def save_checkpoint(accelerator, model, optimizer, lr_scheduler, cfg: TrainConfig, output_dir: Path, step: int,
                    epoch_state: dict, targets: list[str], manifest: dict) -> Path:
    """checkpoint-<step>/ = LoRA file + accelerate state without model tensors; a temp dir, renamed."""
    from accelerate.utils.constants import RNG_STATE_NAME

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    save_resume_state(accelerator, model, optimizer, lr_scheduler, tmp)
    lora_sd = gather_lora(accelerator, model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora_files(tmp, lora_sd, cfg, targets, step, manifest, kohya=cfg.checkpoint_kohya)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"global_step": step, "world_size": accelerator.num_processes,
                                                        **epoch_state}))
        unseen = [r for r in range(accelerator.num_processes) if not (tmp / f"{RNG_STATE_NAME}_{r}.pkl").is_file()]
        if unseen:
            print(f"WARNING: checkpoint-{step}: the state of rank(s) {unseen} is not in {output_dir} as this machine "
                  f"sees it (written on their machines): --output_dir is not shared, and resuming from this "
                  f"checkpoint will fail. Use one shared directory for --output_dir on every machine.",
                  file=sys.stderr)
        shards.apply_umask(tmp)  # accelerate's safetensors files are 0600: another account could not read them
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if cfg.checkpoints_total_limit:
            for old in complete_checkpoints(output_dir)[:-cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------ the stage

def train(cfg: TrainConfig) -> dict:
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import load
    from tqdm import tqdm

    from cogfun import lowmem, models, validation
    from cogfun.loader import BucketBatchSampler, CachedSamples, batches, held_out, index_rows
    from cogfun.lora import LORA_WEIGHT_NAME, inject_lora
    from cogfun.storage import open_store

    # ------------------------------------------------------------ setup
    for flag in ("pretrained_model_name_or_path", "shard_dir"):
        if not getattr(cfg, flag):
            raise ConfigError(f"--{flag} is required")
    output_dir = Path(cfg.output_dir)
    family = models.transformer_family(cfg.pretrained_model_name_or_path)  # refuses what cogfun cannot train
    tcfg_dict = models.read_component_config(cfg.pretrained_model_name_or_path, "transformer")
    lowmem.check_launch(cfg.base_weight_dtype, cfg.offload_blocks, kind=launch_kind(), mixed_precision=cfg.mixed_precision,
                        blocks=tcfg_dict.get("num_layers", 30))
    store = open_store(cfg)  # a local dir or a URL (per-node cache, retries)
    manifest = shards.require_manifest(store)
    store.check_cache_fits(manifest["shard_bytes"])
    # the data settings (train_mode included) are the shards': refuses a data flag they contradict
    data_warnings = runs.adopt_shard_settings(cfg, manifest)
    accelerator = make_accelerator(cfg, output_dir)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    for warning in data_warnings if main else []:
        print(warning, file=sys.stderr)
    resume_dir, changes, history, run_id = resume_or_claim(accelerator, cfg, output_dir, manifest)
    set_seed(cfg.seed)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    device = accelerator.device
    weight_dtype, storage_dtype = weight_dtypes(cfg)

    from types import SimpleNamespace

    check_shards_fit(manifest, SimpleNamespace(**{"out_channels": 16, "in_channels": 16, "text_embed_dim": 4096,
                                                  **tcfg_dict}), cfg.train_mode, family)
    # validation prompts: encoded by a side process (T5 never enters this one), before the transformer loads
    validation_set = validation.prepare(cfg, output_dir, accelerator)
    transformer = models.load_transformer(cfg.pretrained_model_name_or_path, lowmem.load_dtype(storage_dtype, weight_dtype))
    if cfg.transformer_path:   # CogVideoX-Fun's --transformer_path: weights over the folder's, before the LoRA
        missing, unexpected = models.load_transformer_weights(transformer, cfg.transformer_path)
        if main:
            print(f"--transformer_path {cfg.transformer_path}: loaded; missing keys: {len(missing)}, "
                  f"unexpected keys: {len(unexpected)}" + (f" (e.g. {(missing or unexpected)[0]})"
                                                           if missing or unexpected else ""))
    scheduler = models.load_scheduler(cfg.pretrained_model_name_or_path)
    scaling = float(manifest["model"]["scaling_factor"])
    policies = list(manifest["mask_policies"]) if cfg.train_mode != "normal" else []
    weights = mask_weights(cfg, policies)  # checked before any work
    null_prompt = load(store.read_bytes(shards.NULL_PROMPT))["prompt_embeds"].float()
    black = load(store.read_bytes(shards.BLACK_LATENTS)) if policies else None
    sample_n_frames = manifest["config"]["video_sample_n_frames"]  # --random_frame_crop's longest length

    transformer.requires_grad_(False)
    targets = inject_lora(transformer, rank=cfg.rank, alpha=cfg.network_alpha, target_name=cfg.target_name,
                          seed=cfg.seed, lora_dtype=torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    lowmem.apply_base_weight_dtype(transformer, storage_dtype, weight_dtype)  # before the device sees the weights
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device)

    dataset = CachedSamples(store, manifest)
    eval_indices = held_out(dataset, cfg.eval_samples, cfg.seed)  # same on every rank and on resume
    train_rows = index_rows(dataset, exclude=eval_indices)
    sampler = BucketBatchSampler(train_rows, batch_size=cfg.train_batch_size, world=world,
                                 rank=rank, accumulation=cfg.gradient_accumulation_steps, seed=cfg.seed,
                                 video_repeat=cfg.video_repeat)
    steps_per_epoch = sampler.steps_in_epoch(0)  # the same every epoch unless a clip's views differ in bucket
    max_steps = cfg.max_train_steps or sum(sampler.steps_in_epoch(e) for e in range(cfg.num_train_epochs))

    optimizer = make_optimizer(cfg, params, world)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(transformer)
    offloaded = lowmem.offload_blocks(unwrapped, cfg.offload_blocks, device)  # after prepare: DDP/DeepSpeed broadcast weights

    global_step = 0
    if main:
        for note in lowmem.memory_notes(cfg.base_weight_dtype, cfg.offload_blocks, cfg.gradient_checkpointing):
            print(note)
    if cfg.resume_from_checkpoint and resume_dir is None and main:
        print(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting from step 0")
    if resume_dir is not None:
        load_resume_state(accelerator, transformer, optimizer, lr_scheduler, resume_dir)
        apply_optimizer_settings(optimizer, lr_scheduler, cfg)  # the flags', not the checkpoint's
        global_step = json.loads((resume_dir / CHECKPOINT_STATE).read_text())["global_step"]
        if main:
            print(f"resumed from {resume_dir} at step {global_step}")
            if changes:
                print(f"changed since that checkpoint, applied from step {global_step + 1}: "
                      + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()))
        if changes:
            history = history + [{"from_step": global_step + 1, "changed": changes}]

    held_files = held_out_files(dataset, eval_indices)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume_from_checkpoint:
            deleted = runs.claim_output_dir(output_dir, resuming=False, overwrite=cfg.overwrite)
            if deleted:
                print(f"--overwrite: deleted the previous run in {output_dir}: {', '.join(deleted)}")
        run_config = {"config": to_dict(cfg), "run": run_id, "changes": history, "launch": launch_kind(),
                      "world_size": world, "lora_targets": targets, "steps_per_epoch": steps_per_epoch,
                      "max_train_steps": max_steps, "shards_fingerprint": manifest["fingerprint"],
                      "eval_samples_held_out": len(eval_indices), "eval_files_held_out": len(held_files),
                      "mask_policy_weights": weights, "base_weight_dtype": lowmem.dtype_name(storage_dtype),
                      "compute_dtype": lowmem.dtype_name(weight_dtype), "offloaded_layers": len(offloaded),
                      "frozen_bytes_on_device": lowmem.resident_bytes(unwrapped),
                      "frozen_bytes_offloaded": lowmem.offloaded_bytes(unwrapped)}
        shards.write_json_atomic(output_dir / runs.RUN_CONFIG, run_config)
        if held_files:
            (output_dir / runs.EVAL_FILES).write_text("".join(f + "\n" for f in held_files))
        print_summary(cfg, train_rows, steps_per_epoch, max_steps, global_step, world, held_files,
                      len(eval_indices), output_dir)
    if accelerator.log_with:
        accelerator.init_trackers(cfg.tracker_project_name, config={k: v for k, v in to_dict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})
    log_path = output_dir / runs.TRAIN_LOG
    if main and log_path.exists():  # keep the history up to the step we (re)start from
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= global_step]
        log_path.write_text("".join(line + "\n" for line in kept))
    transformer.train()
    sampling_scheduler = models.load_sampling_scheduler(cfg.pretrained_model_name_or_path) if validation_set else None

    def evaluate() -> float:
        return eval_loss(accelerator, transformer, dataset, eval_indices, cfg=cfg, scheduler=scheduler,
                         scaling=scaling, policies=policies, device=device, dtype=weight_dtype)

    def validate() -> None:
        seconds = validation.render(validation_set, accelerator, transformer, cfg=cfg, step=global_step,
                                    output_dir=output_dir, scheduler=sampling_scheduler, dtype=weight_dtype,
                                    same_forward_count=launch_kind() == "fsdp")
        accelerator.log({"validation_seconds": seconds}, step=global_step)

    eval_losses: list[tuple[int, float]] = []
    if eval_indices and global_step == 0:  # the baseline the held-out loss falls from
        logs = {"eval_loss": evaluate()}
        eval_losses.append((0, logs["eval_loss"]))
        accelerator.log(logs, step=0)
        if main:
            print(f"step 0: eval loss {logs['eval_loss']:.4f} (held-out files, before training)")
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": 0, **logs}) + "\n")

    t_range = timestep_range(cfg, scheduler, rank, world)

    # ------------------------------------------------------------ loop
    bar = tqdm(total=max_steps, initial=global_step, desc="train", unit="step", disable=not main,
               dynamic_ncols=True)
    epoch, epoch_start = sampler.locate_step(global_step)
    losses: list[float] = []
    stop = runs.StopRequest(announce=main).install()  # SIGINT / SIGTERM: checkpoint at the next step, stop
    t_step = time.time()
    try:   # the handlers go back however the loop ends (an exception too)
        while global_step < max_steps:
            sampler.set_epoch(epoch)
            skip = max(0, (global_step - epoch_start) * cfg.gradient_accumulation_steps)  # resume
            micro_losses = []
            for batch in batches(dataset, sampler, threads=cfg.dataloader_num_workers, skip=skip,
                                 pin_memory=torch.cuda.is_available()):
                with accelerator.accumulate(transformer):
                    batch = auto_tile(cfg, batch, manifest["config"])   # --auto_tile_batch_size
                    model_in, prompts, timesteps, target = batch_inputs(
                        batch, epoch=epoch, cfg=cfg, scheduler=scheduler, scaling=scaling, policies=policies,
                        null_prompt=null_prompt, device=device, dtype=weight_dtype, family=family, black=black,
                        sample_n_frames=sample_n_frames, t_range=t_range,
                        keep_at_most=same_token_length_frames(cfg, batch, epoch, world, family, manifest["config"]))
                    with accelerator.autocast():
                        pred = transformer(hidden_states=model_in, encoder_hidden_states=prompts, timestep=timesteps,
                                           return_dict=False)[0]
                    loss = torch.nn.functional.mse_loss(pred.float(), target, reduction="mean")
                    if cfg.motion_sub_loss:
                        loss = with_motion_loss(loss, pred.float(), target, cfg.motion_sub_loss_ratio)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params if launch_kind() not in ("fsdp",) else
                                                                transformer.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach())
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                micro_losses = []
                losses.append(step_loss)
                now = time.time()
                logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "step_time": now - t_step}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                t_step = now
                if eval_indices and (global_step % cfg.eval_steps == 0 or global_step == max_steps):
                    logs["eval_loss"] = evaluate()
                    eval_losses.append((global_step, logs["eval_loss"]))
                    if main:
                        bar.write(f"step {global_step}: eval loss {logs['eval_loss']:.4f} (held-out files)")
                    t_step = time.time()
                accelerator.log(logs, step=global_step)
                if main:
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps({"step": global_step, **logs}) + "\n")
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}", step_s=f"{logs['step_time']:.2f}")
                stopping = stop_requested(accelerator, stop, device)  # every rank agrees
                saved = None
                if global_step % cfg.checkpointing_steps == 0 or global_step == max_steps or stopping:
                    saved = save_checkpoint(accelerator, transformer, optimizer, lr_scheduler, cfg, output_dir,
                                            global_step, {"epoch": epoch, "run": run_id,
                                                          "config": runs.settings_record(cfg), "changes": history},
                                            targets, manifest)
                    if main:
                        bar.write(f"step {global_step}: checkpoint saved to {saved}")
                    t_step = time.time()  # the save is not the next step's time
                if stopping:   # (the `finally` below puts the signal handlers back)
                    bar.close()
                    accelerator.end_training()
                    raise runs.Interrupted(stopping, global_step, saved)
                if validation_set and (global_step % cfg.validation_steps == 0 or global_step == max_steps):
                    validate()
                    t_step = time.time()
                if global_step >= max_steps:
                    break
            epoch_start += sampler.steps_in_epoch(epoch)
            if (validation_set and cfg.validation_epochs and epoch % cfg.validation_epochs == 0
                    and global_step == epoch_start and global_step % cfg.validation_steps and global_step != max_steps):
                # --validation_epochs: after a whole epoch (not when the step rule just rendered)
                validate()
                t_step = time.time()
            epoch += 1
    finally:
        stop.restore()
    bar.close()

    # ------------------------------------------------------------ save the LoRA
    lora_sd = gather_lora(accelerator, transformer)
    if main:
        save_lora_files(output_dir, lora_sd, cfg, targets, global_step, manifest, kohya=True)
        print(f"LoRA written to {output_dir / LORA_WEIGHT_NAME} (step {global_step}, rank {cfg.rank}, "
              f"alpha {cfg.network_alpha}, {len(targets)} modules)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses, "eval_losses": eval_losses, "output_dir": str(output_dir)}
