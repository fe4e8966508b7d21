"""Every setting of cogfun, declared once.

Settings live in small dataclasses grouped by who reads them; a command's config class
inherits the groups it needs. Each field carries its help text (and whether it changes the
bytes of the shards, i.e. belongs in the precompute fingerprint). The click options, the
`--help` text and the TOML loader are all derived from these declarations, so a flag is
spelled, typed, documented and defaulted in exactly one place. Flag names keep
CogVideoX-Fun's underscore spelling (`--video_sample_size`), as in its training doc.

This module must stay import-light (no torch): `cogfun --help` imports it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from cogfun.masks import DEFAULT_POLICIES, POLICIES

TRAIN_MODES = ("normal", "inpaint", "i2v")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Mask policies and the default cached set, as cogfun.masks defines them (it imports no torch at
# module level).
MASK_POLICIES = POLICIES
DEFAULT_MASK_POLICIES = ",".join(DEFAULT_POLICIES)


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
        fingerprint: bool = False, hidden: bool = False, int_or_word: bool = False) -> Any:
    """A setting: default, help text, allowed choices, and whether it changes shard bytes.
    `int_or_word`: a str setting that is a number or a word (TOML may give it as an integer)."""
    meta = {"help": help, "choices": choices, "fingerprint": fingerprint, "hidden": hidden,
            "int_or_word": int_or_word}
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    pretrained_model_name_or_path: Optional[str] = opt(
        None, "Diffusers-layout CogVideoX-Fun model folder (transformer/, vae/, text_encoder/, "
              "tokenizer/, scheduler/).")


@dataclass
class DataArgs:
    """CogVideoX-Fun's data flags: what a clip becomes (bucket, size, frames)."""
    train_data_dir: Optional[str] = opt(None, "Root folder the metadata's file_path entries are relative to: a path or an http(s)://, s3:// or gs:// URL (files fetched into --media_cache_dir).")
    train_data_meta: Optional[str] = opt(None, "metadata.json (a list of {file_path, text, type}) or .csv with those columns; a path or a URL.")
    train_data_shards: Optional[str] = opt(None, "Instead of --train_data_meta: WebDataset tars of media (video2dataset / img2dataset layout: <key>.mp4 or .jpg ... + <key>.txt or <key>.json), a brace pattern of paths or URLs, e.g. 's3://b/data/{00000..00099}.tar'. The sample key is the source's identity.")
    train_data_caption_key: str = opt("caption", "With --train_data_shards: the key of the caption in a sample's .json, used when the sample has no .txt.")
    media_cache_dir: Optional[str] = opt(None, "Per-node cache of media read from URLs or tars (each file fetched once per node, shared by its ranks; default ~/.cache/cogfun/media).")
    media_cache_size_gb: float = opt(100.0, "Size bound of the media cache; least recently used files are evicted beyond it.")
    media_fetch_retries: int = opt(5, "Retries of a media fetch after a transient network error; a file still unreachable is skipped with the reason.")
    media_fetch_backoff: float = opt(1.0, "Seconds before the first retry of a media fetch; doubles after each.")
    image_sample_size: int = opt(512, "Image resolution; with --random_hw_adapt the largest base size.", fingerprint=True)
    video_sample_size: int = opt(512, "Video resolution; with --random_hw_adapt min(this, 512) is the smallest base size.", fingerprint=True)
    token_sample_size: int = opt(512, "With --training_with_video_token_length: the side T whose N*T*T pixel volume is the per-sample budget.", fingerprint=True)
    video_sample_stride: int = opt(4, "Spacing between sampled source frames.", fingerprint=True)
    video_sample_n_frames: int = opt(17, "Frames per video sample N (rounded down to 4k+1).", fingerprint=True)
    random_hw_adapt: bool = opt(False, "Draw each sample's base size between min(video_sample_size, 512) and image_sample_size.", fingerprint=True)
    training_with_video_token_length: bool = opt(False, "Trade frames for resolution: a video at base s gets the largest 4k+1 <= N*T^2/s^2 frames; bases range from video_sample_size to image_sample_size.", fingerprint=True)
    enable_bucket: bool = opt(False, "Keep each clip's aspect ratio (nearest ratio bucket) instead of center-cropping a square.", fingerprint=True)
    random_frame_crop: bool = opt(False, "At train time, keep a prefix of each batch's frames, as CogVideoX-Fun: a length drawn from 5, 9, ..., video_sample_n_frames (the shards' value) pixel frames, the full length 90% of the time and the others uniformly; never one latent frame of a video (CogVideoX 1.5: even latent counts).")
    video_repeat: int = opt(1, "Videos weigh this many times more than images when batches are drawn (0 counts as 1, as in CogVideoX-Fun).")
    train_mode: str = opt("normal", "normal: text-to-video (in_channels 16); inpaint / i2v: InP models (in_channels 33), masked-clip latents are cached.", choices=TRAIN_MODES, fingerprint=True)
    seed: int = opt(42, "Seed of every random choice (base sizes, frame windows, batch order, noise).", fingerprint=True)
    num_views: str = opt("1", "Views (base size, frame window) stored per clip; training shows one view of each clip per epoch, cycling through them. 'auto': about clip frames / window frames views per video, the window being the shortest a view may get (with --training_with_video_token_length: at the largest base), with stratified windows covering the clip; images 1; at most --max_views.", fingerprint=True, int_or_word=True)
    max_views: int = opt(8, "Most views per clip that --num_views auto stores.", fingerprint=True)
    mask_policies: str = opt(DEFAULT_MASK_POLICIES, "Inpaint/i2v only: masked-clip policies to cache, comma-separated of " + ", ".join(MASK_POLICIES) + " (or 'all'). Each is one VAE encode and one latent per sample (two with reference noise); images cache only block and ellipse. t2v (everything masked) needs no cache and is always drawn. The default covers 85 % of CogVideoX-Fun's mask distribution for videos, 100 % for images.", fingerprint=True)
    mask_policy_weights: str = opt("", "Inpaint/i2v only: train-time draw weights overriding CogVideoX-Fun's (which are the defaults), e.g. 'i2v=0.6,t2v=0.1' for an i2v-focused LoRA; a cached policy not named keeps its default.")
    probe_workers: int = opt(8, "Threads probing clips (inspect-buckets and precompute).")
    max_image_pixels: int = opt(89_478_485, "Decompression-bomb limit: images (and animation frames) with more pixels are skipped, with their size in the report. The default is Pillow's.")


@dataclass
class EncodeArgs:
    """How the precompute stage encodes and writes shards."""
    shard_dir: Optional[str] = opt(None, "Folder of the cached shards (manifest.json, index.parquet, <bucket>/*.tar, prompts/). Train and inspect-buckets also read an http(s)://, s3:// or gs:// URL of one; precompute writes to a local or shared filesystem.")
    vae_mini_batch: int = opt(1, "Samples per VAE encode call (same-bucket samples only). Batched encodes differ from single ones in the last bits, so this is part of the fingerprint, and only 1 gives shards that are bit-identical on any number of ranks.")
    low_vram: bool = opt(False, "Precompute on a small GPU: T5 stays on the CPU and streams its layers to the GPU (accelerate cpu_offload); VAE batch slicing. Same bytes.")
    dataloader_num_workers: int = opt(2, "Precompute: DataLoader worker processes decoding clips. Train: threads reading shards ahead of the step (0: read in the step).")
    mixed_precision: str = opt("bf16", "Compute dtype of the encoders (precompute) and of the frozen transformer (train).", choices=MIXED_PRECISION, fingerprint=True)
    overwrite: bool = opt(False, "Precompute: replace a shard dir made with different settings, model or sources.")
    shard_max_samples: int = opt(64, "Precompute: samples per tar before a new one is started.")
    decode_timeout: float = opt(120.0, "Precompute: seconds one clip may take to decode before it is skipped.")


@dataclass
class ShardReadArgs:
    """How `cogfun train` reads a remote shard dir (--shard_dir URL)."""
    shard_cache_dir: Optional[str] = opt(None, "Per-node read-through cache of a remote --shard_dir: each tar is fetched once per node and shared by its ranks and threads (default ~/.cache/cogfun/shards).")
    shard_cache_size_gb: float = opt(100.0, "Size bound of the shard cache; least recently used files are evicted beyond it.")
    shard_fetch_retries: int = opt(5, "Retries of a remote read after a transient network error before the run fails naming the URL.")
    shard_fetch_backoff: float = opt(1.0, "Seconds before the first retry of a remote read; doubles after each.")


@dataclass
class TrainArgs:
    """Training flags of CogVideoX-Fun's train_lora.py (same names, same meaning)."""
    output_dir: str = opt("output_dir", "Where checkpoints, the LoRA file, logs and the run config go.")
    train_batch_size: int = opt(1, "Samples per rank per step (all from one bucket).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.")
    num_train_epochs: int = opt(100, "Passes over the cached samples (ignored when --max_train_steps is set).")
    max_train_steps: Optional[int] = opt(None, "Stop after this many optimizer steps.")
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every this many optimizer steps.")
    checkpoints_total_limit: Optional[int] = opt(None, "Keep at most this many checkpoints (oldest removed first).")
    checkpoint_kohya: bool = opt(False, "Also write the kohya/ComfyUI LoRA file into every checkpoint-<step>/ (always written for the final LoRA).")
    resume_from_checkpoint: Optional[str] = opt(None, "A checkpoint-<step> folder (a path that does not exist is looked for in --output_dir, as CogVideoX-Fun does: checkpoint-500 means <output_dir>/checkpoint-500), or 'latest' for the newest complete one in --output_dir.")
    learning_rate: float = opt(1e-4, "AdamW learning rate.")
    lr_scheduler: str = opt("constant", "diffusers LR schedule: constant, constant_with_warmup, linear, cosine, ...")
    lr_warmup_steps: int = opt(0, "Warm-up steps of the LR schedule.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (applied under DDP, ZeRO-2 and FSDP alike).")
    gradient_checkpointing: bool = opt(False, "Recompute transformer activations in the backward pass.")
    rank: int = opt(128, "LoRA rank r.")
    network_alpha: float = opt(64.0, "LoRA alpha; the update is scaled by alpha/rank.")
    target_name: str = opt("to_q,to_k,to_v,ff.0,ff.2", "Comma-separated module-name suffixes that get LoRA (ff.0/ff.2 are the feed-forward layers).")
    use_peft_lora: bool = opt(False, "Accepted for CogVideoX-Fun's launch lines; changes nothing: LoRA is always peft's (same numbers, same files).")
    caption_dropout: float = opt(0.1, "Probability of training a sample on the empty-caption embedding.")
    report_to: str = opt("tensorboard", "Tracker for accelerate: tensorboard or none.", choices=("tensorboard", "none"))


#: CogVideoX-Fun's negative prompt (its predict scripts and its trainer's validation use it).
NEGATIVE_PROMPT = ("The video is not of a high quality, it has a low resolution. Watermark present in each frame. "
                   "The background is solid. Strange body and strange trajectory. Distortion. ")


@dataclass
class ValidationArgs:
    """Seeing what is trained: validation videos and a held-out eval loss (cogfun train)."""
    validation_prompts: Optional[str] = opt(None, "Prompts rendered with the current LoRA every --validation_steps and at the end, into <output_dir>/samples/step-<N>/ and TensorBoard: a .txt file (one prompt per line) or prompts separated by '|'. A short-lived T5 process encodes them once (cached in <output_dir>/validation/); T5 never enters the training process, the VAE only while validating.")
    validation_images: Optional[str] = opt(None, "InP models: the first frame of each validation video (image-to-video), one for all prompts or one per prompt: a .txt file (one path per line) or paths separated by '|'. Without it InP validation is text-to-video.")
    validation_steps: int = opt(2000, "Render the validation prompts every this many optimizer steps (and after the last step).")
    validation_negative_prompt: str = opt(NEGATIVE_PROMPT, "Negative prompt of the validation videos (classifier-free guidance).")
    validation_num_frames: Optional[int] = opt(None, "Frames per validation video (4k+1); default --video_sample_n_frames rounded down to 4k+1 (as precompute does).")
    validation_height: Optional[int] = opt(None, "Validation video height (multiple of 16); default --video_sample_size floored to a multiple of 16.")
    validation_width: Optional[int] = opt(None, "Validation video width (multiple of 16); default --video_sample_size floored to a multiple of 16.")
    validation_num_inference_steps: int = opt(25, "Denoising steps per validation video.")
    validation_guidance_scale: float = opt(4.5, "Classifier-free guidance scale of the validation videos (1 = none).")
    eval_samples: float = opt(0.0, "Hold this many source files out of training, with all their samples (every view and caption variant), for a deterministic eval loss (a value below 1 is a fraction of the files); the same files on every rank, on resume and for any number of ranks. 0 = off.")
    eval_steps: int = opt(100, "Compute the held-out eval loss (9 fixed timesteps, fixed noise) every this many optimizer steps, before the first step and after the last.")


@dataclass
class SampleArgs:
    """`cogfun sample`: videos from a model folder, optionally with a trained LoRA."""
    lora: Optional[str] = opt(None, "LoRA to apply: a diffusers-format or kohya/ComfyUI .safetensors file, a training output dir or a checkpoint-<N>/ dir (the diffusers file is preferred when both are there).")
    lora_scale: float = opt(1.0, "Multiplier on the LoRA's own scale alpha/rank stored in the file (1 = as trained, 0 = off), like diffusers' set_adapters weight and ComfyUI's strength.")
    prompt: Optional[str] = opt(None, "The prompt (or use --prompts).")
    prompts: Optional[str] = opt(None, "A .txt file with one prompt per line: one video each.")
    negative_prompt: str = opt(NEGATIVE_PROMPT, "Negative prompt (classifier-free guidance).")
    image: Optional[str] = opt(None, "InP models: the first frame (image-to-video). It is resized to cover --height x --width and center-cropped.")
    end_image: Optional[str] = opt(None, "InP models: the last frame (with --image: first and last frame known).")
    num_frames: Optional[int] = opt(None, "Frames per video (4k+1); default: the model's sample_frames (49 for CogVideoX-Fun 2b/5b, 85 for V1.5). With --end_image on a CogVideoX 1.5 model a count of odd latent frames is trimmed to an even one (49 -> 45), as CogVideoX-Fun's inpaint pipeline does.")
    height: Optional[int] = opt(None, "Video height (multiple of 16); default: the model's sample_height x 8 (480 for CogVideoX-Fun 2b/5b); 384 for a CogVideoX 1.5 model (patch_size_t; CogVideoX-Fun's predict default).")
    width: Optional[int] = opt(None, "Video width (multiple of 16); default: the model's sample_width x 8 (720 for CogVideoX-Fun 2b/5b); 672 for a CogVideoX 1.5 model (patch_size_t; CogVideoX-Fun's predict default).")
    num_inference_steps: int = opt(50, "Denoising steps.")
    guidance_scale: float = opt(6.0, "Classifier-free guidance scale (1 = none).")
    seed: int = opt(42, "Seed of the initial noise (the same for every prompt, so prompts and LoRA scales compare on equal noise) and of the reference-image noise.")
    fps: Optional[int] = opt(None, "Frame rate of the mp4; default the model's: 8 (CogVideoX 1.0), 16 (CogVideoX 1.5).")
    output: Optional[str] = opt(None, "The mp4 to write (one prompt).")
    output_dir: Optional[str] = opt(None, "Folder for one mp4 per prompt (<index>-<words of the prompt>.mp4).")
    mixed_precision: str = opt("bf16", "Compute dtype of the transformer, VAE and T5.", choices=MIXED_PRECISION)
    low_vram: bool = opt(False, "Small GPU: T5 and the transformer stream their layers from the CPU (accelerate offload), the VAE decodes in tiles. Slower; the same videos up to tile seams.")


@dataclass
class SampleConfig(ModelArgs, SampleArgs):
    """`cogfun sample`."""


@dataclass
class PrecomputeConfig(ModelArgs, DataArgs, EncodeArgs):
    """`cogfun precompute`."""


@dataclass
class TrainConfig(ModelArgs, DataArgs, EncodeArgs, ShardReadArgs, TrainArgs, ValidationArgs):
    """`cogfun train` (data and encode flags are used when it must precompute first)."""


@dataclass
class InspectConfig(ModelArgs, DataArgs):
    """`cogfun inspect-buckets`."""
    shard_dir: Optional[str] = opt(None, "Report a finished shard dir from its manifest instead of probing a dataset. With --train_data_meta: probe the dataset, reusing the dir's probe cache (probes/; a local dir also keeps what was probed now, for the precompute that follows).")
    json: bool = opt(False, "Print one JSON object instead of a table.")
    plot: Optional[str] = opt(None, "Write a PNG histogram of the buckets to this file.")
    text_dim: int = opt(4096, "Text-embedding width used for the size estimate when no model is given (T5-XXL: 4096).")


def _base_type(f: dataclasses.Field, cls: type) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def fingerprint_keys(cls: type = PrecomputeConfig) -> list[str]:
    """The settings that change the bytes of a shard dir."""
    return [f.name for f in fields(cls) if f.metadata.get("fingerprint")]


def click_options(cls: type):
    """A decorator adding one click option per setting of `cls` (plus --config)."""
    import click

    def decorate(fn):
        for f in reversed(fields(cls)):
            typ = _base_type(f, cls)
            name = f"--{f.name}"
            meta = f.metadata
            kwargs: dict[str, Any] = {"help": meta.get("help", ""), "hidden": meta.get("hidden", False),
                                      "show_default": True}
            if typ is bool:
                fn = click.option(name, f.name, is_flag=True, default=f.default, **kwargs)(fn)
                continue
            click_type = click.Choice(meta["choices"]) if meta.get("choices") else typ
            fn = click.option(name, f.name, type=click_type, default=f.default, **kwargs)(fn)
        fn = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                          default=None, help="TOML file supplying any of these flags; the command line wins.")(fn)
        return fn

    return decorate


class ConfigError(ValueError):
    """A setting is wrong in a way the user must fix."""


def build_config(cls: type, params: dict[str, Any], ctx=None):
    """Make a `cls` from click's params, a TOML file (`config_file`) and the defaults.

    Precedence: command line > TOML > declared default.
    """
    import click

    params = dict(params)
    config_file = params.pop("config_file", None)
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in params.items() if k in names}
    if config_file:
        toml = load_toml(config_file, cls)
        for key, value in toml.items():
            from_cli = ctx is not None and ctx.get_parameter_source(key) in (
                click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
            if not from_cli:
                values[key] = value
    return cls(**values)


def load_toml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a TOML config; unknown keys and wrong types are errors naming the key."""
    with open(path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    flat: dict[str, Any] = {}
    for key, value in data.items():  # allow [train] / [data] style tables
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    by_name = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in flat.items():
        if key not in by_name:
            raise ConfigError(f"{path}: unknown setting '{key}' for this command")
        typ = _base_type(by_name[key], cls)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if by_name[key].metadata.get("int_or_word") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: '{key}' must be {typ.__name__}, got {value!r}")
        choices = by_name[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{path}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
        out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def subset(cfg: Any, cls: type):
    """The `cls` view of a bigger config (e.g. the PrecomputeConfig inside a TrainConfig)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def mask_policy_list(cfg: DataArgs) -> list[str]:
    """The cached mask policies (empty for train_mode normal); validated."""
    if cfg.train_mode == "normal":
        return []
    names = [p.strip() for p in cfg.mask_policies.split(",") if p.strip()]
    if names == ["all"]:
        names = list(MASK_POLICIES)
    bad = [p for p in names if p not in MASK_POLICIES]
    if bad:
        raise ConfigError(f"--mask_policies: unknown policy {', '.join(bad)}; choose from {', '.join(MASK_POLICIES)}")
    return sorted(set(names), key=MASK_POLICIES.index)


def num_views_setting(value) -> int | str:
    """--num_views: a count >= 1 or 'auto'."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--num_views must be a number >= 1 or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--num_views must be >= 1 or 'auto', got {value!r}")
    return n
