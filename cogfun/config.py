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
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from cogfun.masks import DEFAULT_POLICIES, POLICIES

TRAIN_MODES = ("normal", "inpaint", "i2v")
MIXED_PRECISION = ("no", "fp16", "bf16")
# The LoRA file formats cogfun writes (cogfun.lora owns them): diffusers (diffusers' load_lora_weights,
# resume), kohya (CogVideoX-Fun's merge_lora and its ComfyUI nodes, kijai's wrapper), comfyui (core ComfyUI).
LORA_FORMATS = ("diffusers", "kohya", "comfyui")
# --base_weight_dtype: how the frozen transformer weights are stored (cogfun.lowmem applies it)
BASE_WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "float8_e4m3fn", "float8_e5m2")
# Mask policies and the default cached set, as cogfun.masks defines them (it imports no torch at
# module level).
MASK_POLICIES = POLICIES
DEFAULT_MASK_POLICIES = ",".join(DEFAULT_POLICIES)


UPSTREAM_ACTIONS = ("warn", "refuse", "ignore")


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
        fingerprint: bool = False, hidden: bool = False, int_or_word: bool = False,
        upstream: str | None = None, alias: str | None = None, several: bool = False) -> Any:
    """A setting: default, help text, allowed choices, and whether it changes shard bytes.
    `int_or_word`: a str setting that is a number or a word (TOML may give it as an integer).

    A flag of CogVideoX-Fun's train_lora.py that does nothing here is declared with `upstream`:
    "warn" (accepted; a value other than the default prints `help`, which says why it changes
    nothing), "refuse" (a value other than the default is a ConfigError with `help`, which says why
    and what to use) or "ignore" (accepted silently, e.g. a launcher's --local_rank); `alias`: the
    setting it is another name of. Such flags are hidden from --help. `several`: upstream takes
    several values (argparse nargs="+"): on the command line the words after the flag are joined
    with '|'."""
    if upstream is not None and upstream not in UPSTREAM_ACTIONS:
        raise ValueError(f"upstream action must be one of {UPSTREAM_ACTIONS}, got {upstream!r}")
    meta = {"help": help, "choices": choices, "fingerprint": fingerprint,
            "hidden": hidden or upstream is not None or alias is not None,
            "int_or_word": int_or_word, "upstream": upstream, "alias": alias, "several": several}
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
    random_hw_adapt: bool = opt(False, "Draw each sample's base size as CogVideoX-Fun does: images image_sample_size / r, r from its downsample list (1, 1.25, 1.5, 2, ... by size, and image/video size; r = 1 three times in four), so between min(video_sample_size, 512) and image_sample_size; videos video_sample_size / r likewise (or, with --training_with_video_token_length, a size of the token grid).", fingerprint=True)
    training_with_video_token_length: bool = opt(False, "Trade frames for resolution: a video takes a base s from video_sample_size, +128, ..., image_sample_size, among those below 1.25 x its mean side (no upscaling), and gets the largest 4k+1 <= N*T^2/s^2 frames (see --bucket_rules); images draw as with --random_hw_adapt.", fingerprint=True)
    enable_bucket: bool = opt(False, "Keep each clip's aspect ratio (nearest ratio bucket) instead of center-cropping a square.", fingerprint=True)
    random_ratio_crop: bool = opt(False, "With --enable_bucket: each sample (view) takes a ratio drawn from CogVideoX-Fun's crop table with its probabilities (1:1 and near-square most often) instead of its own, and is center-cropped to it.", fingerprint=True)
    bucket_rules: str = opt("cogfun", "cogfun: CogVideoX-Fun's bucket code, except where its training doc says otherwise (token-length frames 512->49, 768->21, 1024->9 at N 49, T 512; the token budget also without --random_hw_adapt or --enable_bucket). upstream: its code throughout (frames min(N*T^2/s^2, N)//4*4+1: 13 at 1024; the token budget and base draws only with --random_hw_adapt and --enable_bucket; clip frames // stride available; 1 to 4 of them make a 1-frame video instead of a skip).", choices=("cogfun", "upstream"), fingerprint=True)
    random_frame_crop: bool = opt(False, "At train time, keep a prefix of each batch's frames, as CogVideoX-Fun: a length drawn from 5, 9, ..., video_sample_n_frames (the shards' value) pixel frames, the full length 90% of the time and the others uniformly; never one latent frame of a video (CogVideoX 1.5: even latent counts).")
    video_repeat: int = opt(1, "Videos weigh this many times more than images when batches are drawn (0 counts as 1, as in CogVideoX-Fun).")
    train_mode: str = opt("normal", "What the LoRA learns. normal: text-to-video, for a text-to-video model (transformer in_channels 16): it sees the noisy latents and the caption only. inpaint and i2v are two names of one mode (as in CogVideoX-Fun), for an InP model (in_channels 33): every step also feeds a mask and the latents of the clip with the masked pixels blacked out, the mask drawn per sample from the cached --mask_policies (first frame known = image-to-video, first+last frames, blocks, ..., everything masked = text-to-video) with --mask_policy_weights; one LoRA learns image-to-video and inpainting together (weight i2v up for an i2v-focused LoRA). Precompute refuses a mode the model's in_channels do not fit before encoding anything. cogfun train --shard_dir takes it from the shards.", choices=TRAIN_MODES, fingerprint=True)
    seed: int = opt(42, "Seed of every random choice (base sizes, frame windows, batch order, noise).", fingerprint=True)
    num_views: str = opt("1", "Views (base size, frame window) stored per clip; training shows one view of each clip per epoch, cycling through them. 'auto': about clip frames / window frames views per video, the window being the shortest a view may get (with --training_with_video_token_length: at the largest base), with stratified windows covering the clip; images 1; at most --max_views.", fingerprint=True, int_or_word=True)
    max_views: int = opt(8, "Most views per clip that --num_views auto stores.", fingerprint=True)
    mask_policies: str = opt(DEFAULT_MASK_POLICIES, "Inpaint/i2v only: masked-clip policies to cache, comma-separated of " + ", ".join(MASK_POLICIES) + " (or 'all'). Each is one VAE encode and one latent per sample (two with reference noise); images cache only block and ellipse. t2v (everything masked) needs no cache and is always drawn. The default covers 85 % of CogVideoX-Fun's mask distribution for videos, 100 % for images.", fingerprint=True)
    masks_per_policy: int = opt(1, "Inpaint/i2v only: mask geometries cached per policy and view: K seeded draws, each one more VAE encode and one more latent per policy (bytes and precompute time grow about with 1 + K x policies). Training shows one of them per epoch, cycling as views do: over V x K epochs each view of a clip is seen with each geometry set, so a small dataset's clips see more masks (CogVideoX-Fun draws a fresh one every step). 1: the shards as before.", fingerprint=True)
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
    overwrite: bool = opt(False, "Precompute: replace a shard dir made with different settings, model or sources. Train: an --output_dir holding another run is refused unless this flag is given, which deletes that run (its checkpoints, LoRA files, run_config.json, train_log.jsonl, eval_files.txt, TensorBoard logs/cogfun/ and validation videos samples/step-*/; nothing else, e.g. the validation/ prompt cache or a shard dir inside, is touched) and starts a new one; with --resume_from_checkpoint it deletes nothing.")
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
    output_dir: str = opt("output_dir", "Where checkpoints, the LoRA file, logs and the run config go. One run per folder: a folder holding another run is refused unless --resume_from_checkpoint (which must name a checkpoint of the same run) or --overwrite.")
    allow_data_flag_mismatch: bool = opt(False, "Training from an existing --shard_dir uses the data settings the shards were made with (their manifest), and records those. A data flag given with another value (e.g. --video_sample_stride) is refused, listing them all; with this flag it is only warned about and ignored.")
    train_batch_size: int = opt(1, "Samples per rank per step (all from one bucket).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.")
    num_train_epochs: int = opt(100, "Passes over the cached samples (ignored when --max_train_steps is set).")
    max_train_steps: Optional[int] = opt(None, "Stop after this many optimizer steps.")
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every this many optimizer steps.")
    checkpoints_total_limit: Optional[int] = opt(None, "Keep at most this many checkpoints (oldest removed first).")
    checkpoint_kohya: bool = opt(False, "Also write the kohya (CogVideoX-Fun nodes) and core-ComfyUI LoRA files into every checkpoint-<step>/ (always written for the final LoRA; `cogfun export-lora` converts any checkpoint later).")
    resume_from_checkpoint: Optional[str] = opt(None, "A checkpoint-<step> folder (a path that does not exist is looked for in --output_dir, as CogVideoX-Fun does: checkpoint-500 means <output_dir>/checkpoint-500), or 'latest' for the newest complete one in --output_dir (none: start at step 0). The checkpoint must be of this run: the same shards (fingerprint), model, LoRA rank, alpha and --target_name, and the same batch order (--train_batch_size, --seed, --video_repeat, --eval_samples, and --gradient_accumulation_steps x ranks); every difference is named. Other changed flags apply from the next step (printed, and recorded in run_config.json under 'changes'), e.g. a new --learning_rate.")
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
    validation_prompts: Optional[str] = opt(None, "Prompts rendered with the current LoRA every --validation_steps and at the end, into <output_dir>/samples/step-<N>/ and TensorBoard: a .txt file (one prompt per line) or prompts separated by '|'. A short-lived T5 process encodes them once (cached in <output_dir>/validation/); T5 never enters the training process, the VAE only while validating. Several words after the flag (CogVideoX-Fun's --validation_prompts 'a' 'b') are several prompts.", several=True)
    validation_images: Optional[str] = opt(None, "InP models: the first frame of each validation video (image-to-video), one for all prompts or one per prompt: a .txt file (one path per line) or paths separated by '|'. Without it InP validation is text-to-video. (CogVideoX-Fun's --validation_paths is another name of it.)", several=True)
    validation_steps: int = opt(2000, "Render the validation prompts every this many optimizer steps (and after the last step).")
    validation_negative_prompt: str = opt(NEGATIVE_PROMPT, "Negative prompt of the validation videos (classifier-free guidance).")
    validation_num_frames: Optional[int] = opt(None, "Frames per validation video (4k+1); default: those of the shards' largest video bucket (most tokens).")
    validation_height: Optional[int] = opt(None, "Validation video height (multiple of 16); default: the shards' largest video bucket's.")
    validation_width: Optional[int] = opt(None, "Validation video width (multiple of 16); default: the shards' largest video bucket's.")
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


_UNUSED = "CogVideoX-Fun's train_lora.py parses it but never uses it; ignored here too."


@dataclass
class UpstreamArgs:
    """The rest of CogVideoX-Fun's train_lora.py flags, so that its launch scripts run unchanged:
    those cogfun implements, and (hidden from --help) those that have no meaning here, which warn
    or refuse saying why (`opt(upstream=...)`)."""
    transformer_path: Optional[str] = opt(None, "Transformer weights (.safetensors) loaded over the model folder's transformer before the LoRA is added, as CogVideoX-Fun does (non-strict: missing and unexpected keys are listed). Pickled checkpoints (.bin/.pt) are refused: convert them to safetensors.")
    allow_tf32: bool = opt(False, "Let CUDA matmuls use TF32 (torch.backends.cuda.matmul.allow_tf32), as CogVideoX-Fun does.")
    scale_lr: bool = opt(False, "Multiply --learning_rate by gradient_accumulation_steps x train_batch_size x number of processes.")
    use_8bit_adam: bool = opt(False, "bitsandbytes' AdamW8bit instead of AdamW (needs `pip install bitsandbytes`): 8-bit optimizer state, e.g. ~0.5 GB instead of ~2 GB for a rank-128 q/k/v/ff LoRA on a 5b model.")
    use_came: bool = opt(False, "The CAME optimizer (needs `pip install came_pytorch`) with CogVideoX-Fun's settings: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), no weight decay.")
    train_sampling_steps: Optional[int] = opt(None, "Timesteps are drawn uniformly from [0, this); default the scheduler's num_train_timesteps (1000, as CogVideoX-Fun's default).")
    uniform_sampling: bool = opt(False, "Each rank draws its timesteps from its own slice of [0, train_sampling_steps), as CogVideoX-Fun's DiscreteSampling: G groups of ranks, G the largest divisor of the number of processes that divides the step count.")
    motion_sub_loss: bool = opt(False, "Add CogVideoX-Fun's motion loss: the MSE of the frame-to-frame differences of prediction and target (samples with more than 2 latent frames), weighted by --motion_sub_loss_ratio.")
    motion_sub_loss_ratio: float = opt(0.25, "With --motion_sub_loss: loss = (1 - ratio) * MSE + ratio * motion MSE.")
    validation_epochs: Optional[int] = opt(None, "Also render the validation prompts at the end of every epoch e with e % this == 0 (epoch 0 too), as CogVideoX-Fun does. Its default is 5; here it is off unless given: an epoch of a small dataset is a few steps.")
    tracker_project_name: str = opt("cogfun", "Project name of the tracker run (accelerate init_trackers).")
    logging_dir: str = opt("logs", "TensorBoard logs go to <output_dir>/<logging_dir>.")
    validation_paths: Optional[str] = opt(None, "CogVideoX-Fun's name of --validation_images.", alias="validation_images", several=True)
    local_rank: int = opt(-1, "Set by some launchers; accelerate reads the rank from the environment.", upstream="ignore")
    input_perturbation: float = opt(0.0, _UNUSED, upstream="warn")
    max_train_samples: Optional[int] = opt(None, _UNUSED, upstream="warn")
    cache_dir: Optional[str] = opt(None, _UNUSED, upstream="warn")
    random_flip: bool = opt(False, _UNUSED + " (No clip is flipped by CogVideoX-Fun.)", upstream="warn")
    use_ema: bool = opt(False, _UNUSED + " (No EMA weights are kept by CogVideoX-Fun.)", upstream="warn")
    push_to_hub: bool = opt(False, _UNUSED, upstream="warn")
    hub_model_id: Optional[str] = opt(None, _UNUSED, upstream="warn")
    prediction_type: Optional[str] = opt(None, _UNUSED + " (The scheduler config's prediction type is used, v_prediction for CogVideoX.)", upstream="warn")
    noise_offset: float = opt(0.0, _UNUSED + " (No noise offset is added by CogVideoX-Fun.)", upstream="warn")
    snr_loss: bool = opt(False, _UNUSED + " (Its loss is the unweighted MSE.)", upstream="warn")
    hub_token: Optional[str] = opt(None, "CogVideoX-Fun only checks it against --report_to wandb; nothing is pushed; ignored.", upstream="warn")
    non_ema_revision: Optional[str] = opt(None, "CogVideoX-Fun only feeds it to --use_ema, which it never uses; ignored.", upstream="warn")
    multi_stream: bool = opt(False, "CUDA streams for CogVideoX-Fun's per-step VAE encodes of the masked clip; cogfun's training runs no VAE (the latents are cached by precompute); ignored.", upstream="warn")
    enable_text_encoder_in_dataloader: bool = opt(False, "T5 runs once per caption at precompute, never in training; ignored.", upstream="warn")
    use_deepspeed: bool = opt(False, "CogVideoX-Fun sets it itself from accelerate's config; here too `accelerate launch --use_deepspeed ...` chooses; ignored.", upstream="warn")
    use_fsdp: bool = opt(False, "CogVideoX-Fun sets it itself from accelerate's config; here too `accelerate launch --use_fsdp ...` chooses; ignored.", upstream="warn")
    save_state: bool = opt(False, "cogfun's checkpoint-<step>/ always holds the resume state (LoRA-only optimizer state, LR scheduler, RNG, data position) beside the LoRA file; nothing to change.", upstream="warn")
    revision: Optional[str] = opt(None, "cogfun reads a local model folder, not the Hub: download that revision (`huggingface-cli download REPO --revision R --local-dir DIR`) and give DIR as --pretrained_model_name_or_path.", upstream="refuse")
    variant: Optional[str] = opt(None, "cogfun reads a local model folder's default weight files: download the variant's files into a folder (named as the default ones) and give it as --pretrained_model_name_or_path.", upstream="refuse")
    vae_path: Optional[str] = opt(None, "The VAE runs only in precompute, from the model folder's vae/, whose weights the shards' fingerprint hashes: put these weights there (as vae/diffusion_pytorch_model.safetensors, in a copy of the folder) and precompute with it.", upstream="refuse")
    train_text_encoder: bool = opt(False, "T5 embeddings are cached at precompute, so T5 cannot be trained (CogVideoX-Fun's LoRA on T5); train the transformer's LoRA only.", upstream="refuse")
    tokenizer_max_length: int = opt(226, "The shards store T5's 226 positions (the transformer's max_text_seq_length); another length is not supported.", upstream="refuse")
    auto_tile_batch_size: bool = opt(False, "With --training_with_video_token_length: a batch whose pixel volume (frames x H x W) is at most 1/16 of the token budget N x T^2 is repeated 4x, at most 1/4 of it 2x, as CogVideoX-Fun does (each copy draws its own noise, timestep and conditioning).")
    keep_all_node_same_token_length: bool = opt(False, "Each step keeps the first frames that fit a token length s x s x N drawn from s = 256, 384, ..., token_sample_size, the same draw on every rank, as CogVideoX-Fun does (so all nodes run one sequence length).")


@dataclass
class MemoryArgs:
    """Fitting the frozen transformer in a small GPU (cogfun train, validation and cogfun sample)."""
    base_weight_dtype: Optional[str] = opt(None, "Storage dtype of the frozen transformer weights (default: the --mixed_precision dtype, as before). float8_e4m3fn / float8_e5m2 store the Linear weights in 8 bits and upcast each layer to the compute dtype (--mixed_precision) only while it runs (diffusers' layerwise casting; norms, AdaLN modulation Linears, embeddings, patch/proj layers and the LoRA weights keep their dtype): 0.57x the bytes of bf16 for a 5b. Use with --gradient_checkpointing (without it autograd keeps the upcast copies until the backward pass). Not under FSDP.", choices=BASE_WEIGHT_DTYPES)
    offload_blocks: int = opt(0, "Keep the frozen weights of this many transformer blocks (the first ones) in CPU memory and move each layer to the GPU only while it runs, forward and backward (accelerate's offload hooks; LoRA weights stay on the GPU). 0 = off. Slower (every step copies those weights to the GPU, twice with --gradient_checkpointing); the numbers do not change. Not under FSDP; with cogfun sample not together with --low_vram (which already streams every layer).")


@dataclass
class SampleConfig(ModelArgs, SampleArgs, MemoryArgs):
    """`cogfun sample`."""


@dataclass
class PrecomputeConfig(ModelArgs, DataArgs, EncodeArgs):
    """`cogfun precompute`."""


@dataclass
class TrainConfig(ModelArgs, DataArgs, EncodeArgs, ShardReadArgs, TrainArgs, ValidationArgs, UpstreamArgs, MemoryArgs):
    """`cogfun train` (data and encode flags are used when it must precompute first)."""


@dataclass
class InspectConfig(ModelArgs, DataArgs):
    """`cogfun inspect-buckets`."""
    shard_dir: Optional[str] = opt(None, "Report a finished shard dir from its manifest instead of probing a dataset. With --train_data_meta: probe the dataset, reusing the dir's probe cache (probes/; a local dir also keeps what was probed now, for the precompute that follows).")
    json: bool = opt(False, "Print one JSON object instead of a table.")
    plot: Optional[str] = opt(None, "Write a PNG histogram of the buckets to this file.")
    text_dim: int = opt(4096, "Text-embedding width used for the size estimate when no model is given (T5-XXL: 4096).")


@dataclass
class ExportLoraConfig:
    """`cogfun export-lora CHECKPOINT`: convert a trained LoRA to another file format."""
    format: str = opt("comfyui", "comfyui: core ComfyUI's native CogVideoX keys (diffusion_model.blocks.N.q, ... + alpha); kohya: CogVideoX-Fun's lora_unet__ keys (its merge_lora, its ComfyUI nodes, the CogVideoX wrapper); diffusers: diffusers' load_lora_weights.", choices=LORA_FORMATS)
    output: Optional[str] = opt(None, "The .safetensors file to write; default: the format's usual file name beside the checkpoint's diffusers file (pytorch_lora_weights_comfyui.safetensors, _kohya, or pytorch_lora_weights.safetensors).")


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
    cfg = cls(**values)
    # what the user set (command line, environment, TOML) as opposed to a declared default: train
    # refuses a given data flag that the shards contradict, and takes the others from the shards
    given = {k for k in values if ctx is not None and ctx.get_parameter_source(k) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
    cfg._given = frozenset(given | set(toml if config_file else ()))
    for note in upstream_flags(cfg):
        if os.environ.get("RANK", "0") == "0":   # once per launch, not once per process
            click.echo(f"warning: {note}", err=True)
    return cfg


def upstream_flags(cfg: Any) -> list[str]:
    """Apply the `upstream` and `alias` declarations of cfg's settings: an alias's value moves to
    its setting, a refused flag raises ConfigError, a warned one gives a note (returned)."""
    notes = []
    for f in fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        if value == f.default:
            continue
        if meta.get("alias"):
            target = next(g for g in fields(cfg) if g.name == meta["alias"])
            if getattr(cfg, target.name) not in (target.default, value):
                raise ConfigError(f"--{f.name} is another name of --{target.name}: give one of them")
            setattr(cfg, target.name, value)
        elif meta.get("upstream") == "refuse":
            raise ConfigError(f"--{f.name} (CogVideoX-Fun's train_lora.py) has no meaning in cogfun: {meta['help']}")
        elif meta.get("upstream") == "warn":
            notes.append(f"--{f.name}: {meta['help']}")
    return notes


def join_several(cls: type, args: list[str]) -> list[str]:
    """CogVideoX-Fun's several-value flags (argparse nargs="+", e.g. `--validation_prompts "a" "b"`):
    the words after such a flag, up to the next option, become one value joined with '|'."""
    several = {f"--{f.name}" for f in fields(cls) if f.metadata.get("several")}
    out: list[str] = []
    i = 0
    while i < len(args):
        out.append(args[i])
        if args[i] in several:
            words = []
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                words.append(args[i])
                i += 1
            if words:
                out.append("|".join(words))
            continue
        i += 1
    return out


def given_settings(cfg: Any) -> frozenset[str]:
    """The settings the user set (command line, environment or TOML file), as `build_config`
    recorded them; for a config made in code, those that differ from their declared defaults."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return given
    return frozenset(f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default)


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
    """The settings a run records: without the upstream flags that change nothing (warned or
    ignored) and aliases (their value is in the setting they name)."""
    dropped = {f.name for f in fields(cfg) if f.metadata.get("upstream") in ("warn", "ignore") or f.metadata.get("alias")}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in dropped}


def subset(cfg: Any, cls: type):
    """The `cls` view of a bigger config (e.g. the PrecomputeConfig inside a TrainConfig)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def mask_policy_list(cfg: DataArgs) -> list[str]:
    """The cached mask policies (empty for train_mode normal); validated."""
    if cfg.train_mode == "normal":
        return []
    if cfg.masks_per_policy < 1:
        raise ConfigError(f"--masks_per_policy must be >= 1, got {cfg.masks_per_policy}")
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
