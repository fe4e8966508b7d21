"""Tiny stand-ins for a CogVideoX-Fun model folder and a training dataset, for tests and smoke runs.

:func:`write_tiny_model` writes randomly initialised instances of the *real* classes
(``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``, ``T5EncoderModel``, a trained T5
Unigram tokenizer, the CogVideoX scheduler config) in the diffusers folder layout, so the same
``from_pretrained`` code loads them and a real CogVideoX-Fun-2b-InP folder. The VAE keeps the real
8x spatial / 4x temporal compression and 16 latent channels; all models together hold ~0.34 M
parameters (1.4 MB on disk). Same seed -> byte-identical files.

:func:`write_synthetic_dataset` and :func:`write_bad_dataset` write small datasets in
CogVideoX-Fun's ``metadata.json`` format (H.264 mp4 clips with moving, frame-identifiable content
and PNG/JPEG images); :func:`synthetic_frames` regenerates the exact source frames of a clip.

Heavy libraries (torch, diffusers, transformers, PyAV) are imported inside the functions that
need them.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cogfun.video import write_mp4

if TYPE_CHECKING:
    from transformers import T5Tokenizer

__all__ = [
    "TEXT_SEQ_LEN",
    "T5_D_MODEL",
    "VAE_SCALING_FACTOR",
    "SCHEDULER_CONFIG",
    "transformer_config",
    "vae_config",
    "t5_config",
    "caption_corpus",
    "train_tokenizer_vocab",
    "build_tiny_tokenizer",
    "build_tiny_components",
    "write_tiny_model",
    "synthetic_frames",
    "SyntheticClip",
    "synthetic_clips",
    "synthetic_images",
    "write_synthetic_dataset",
    "write_bad_dataset",
]

PathLike = str | os.PathLike[str]

TEXT_SEQ_LEN = 226  # CogVideoX's T5 sequence length
T5_D_MODEL = 32
VAE_SCALING_FACTOR = 1.15258426  # CogVideoX-2b's value
VARIANTS = ("inp", "t2v")
LATENT_CHANNELS = 16

# The scheduler/scheduler_config.json of CogVideoX(-Fun)-2b. The trainer loads it with
# DDPMScheduler, which ignores snr_shift_scale (as CogVideoX-Fun's own trainer does).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "sample_max_value": 1.0,
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
    "snr_shift_scale": 3.0,
}


def transformer_config(variant: str = "inp", *, rotary: bool = False) -> dict[str, Any]:
    """Constructor kwargs of the tiny CogVideoXTransformer3DModel.

    ``variant`` "inp": in_channels 33 (16 noisy latents + 1 mask + 16 masked-video latents);
    "t2v": 16. ``rotary`` False = 2b style (sincos positions), True = 5b style (3D RoPE).
    sample_* are latent sizes, as in the real config (real 2b: 90x60x49).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    return {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 2 * LATENT_CHANNELS + 1 if variant == "inp" else LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "time_embed_dim": 32,
        "text_embed_dim": T5_D_MODEL,
        "num_layers": 2,
        "sample_width": 16,
        "sample_height": 16,
        "sample_frames": 9,
        "patch_size": 2,
        "max_text_seq_length": TEXT_SEQ_LEN,
        "use_rotary_positional_embeddings": rotary,
        "use_learned_positional_embeddings": False,
    }


def vae_config() -> dict[str, Any]:
    """Constructor kwargs of the tiny AutoencoderKLCogVideoX: 4 blocks (8x spatial), 4x temporal."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("CogVideoXDownBlock3D",) * 4,
        "up_block_types": ("CogVideoXUpBlock3D",) * 4,
        "block_out_channels": (8, 16, 16, 16),
        "latent_channels": LATENT_CHANNELS,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "temporal_compression_ratio": 4,
        "sample_height": 480,  # the real values: only used as the tiling thresholds
        "sample_width": 720,
        "scaling_factor": VAE_SCALING_FACTOR,
    }


def t5_config(vocab_size: int) -> dict[str, Any]:
    """T5Config kwargs of the tiny text encoder (T5 v1.1 style: gated GELU)."""
    return {
        "vocab_size": vocab_size,
        "d_model": T5_D_MODEL,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "architectures": ["T5EncoderModel"],
    }


# ----------------------------------------------------------------------------------------------
# captions and tokenizer

_SUBJECTS = (
    "cat dog horse bird child woman man robot dragon fox rabbit owl whale car train boat drone "
    "astronaut dancer chef painter skateboarder jellyfish butterfly"
).split()
_ADJECTIVES = (
    "small large red blue green golden silver fluffy old young shiny dark bright colorful quiet "
    "happy tired curious ancient futuristic misty glowing"
).split()
_VERBS = (
    "runs walks jumps flies swims dances spins drives sails glides climbs sleeps waves turns rolls "
    "floats drifts races"
).split()
_PLACES = (
    "field forest city street beach ocean mountain river desert kitchen garden studio stadium "
    "bridge village harbor sky meadow canyon"
).split()
_EXTRAS = (
    "slowly quickly gently while the camera pans zooms tilts in a close-up wide shot during the "
    "morning evening night sunset sunrise under rain snow fog soft light long shadows"
).split()
_PREPOSITIONS = "across through under over near along around into".split()


def caption_corpus(n: int, *, seed: int = 0) -> list[str]:
    """``n`` deterministic caption-like sentences (the tokenizer is trained on this vocabulary)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        extra = " ".join(rng.choice(_EXTRAS) for _ in range(rng.randint(1, 6)))
        out.append(
            f"A {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
            f"{rng.choice(_PREPOSITIONS)} the {rng.choice(_ADJECTIVES)} {rng.choice(_PLACES)}, {extra}."
        )
    return out


_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in real T5


def train_tokenizer_vocab(vocab_size: int = 400) -> list[tuple[str, float]]:
    """Train a SentencePiece-style Unigram vocabulary on :func:`caption_corpus` with ``tokenizers``.

    The trainer is not reproducible across processes: scores differ in the last float digits,
    and single characters it keeps without an EM score (rare ones) get tie-break scores in hash
    order. So multi-character scores are rounded to 6 decimals, every single character except
    "▁" gets one score below all multi-character pieces (characters are the last resort, as the
    rare ones are in a trained model anyway), the printable ASCII characters missing from the
    corpus are added, and pieces are sorted by (score desc, piece). The result is identical in
    every process.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(_SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(caption_corpus(800, seed=1234), trainer=trainer)
    trained = json.loads(tok.to_str())["model"]["vocab"]
    multi = {str(p): round(float(s), 6) for p, s in trained if p not in _SPECIAL_TOKENS and (len(p) > 1 or p == "▁")}
    chars = {str(p) for p, _ in trained if p not in _SPECIAL_TOKENS and len(p) == 1 and p != "▁"}
    chars |= set(string.ascii_letters + string.digits + string.punctuation)
    floor = round(min(multi.values()) - 1.0, 6)
    pieces = sorted([*multi.items(), *((c, floor) for c in chars)], key=lambda ps: (-ps[1], ps[0]))
    return [(t, 0.0) for t in _SPECIAL_TOKENS] + pieces


def build_tiny_tokenizer() -> "T5Tokenizer":
    """A real T5 tokenizer (Unigram, ``<pad>``=0, ``</s>``=1, ``<unk>``=2, 100 ``<extra_id_*>``)."""
    from tokenizers import normalizers
    from transformers import T5Tokenizer  # in transformers 5, T5TokenizerFast is this class

    tokenizer = T5Tokenizer(vocab=train_tokenizer_vocab(), extra_ids=100, model_max_length=TEXT_SEQ_LEN)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()
    return tokenizer


# ----------------------------------------------------------------------------------------------
# model folder


def build_tiny_components(variant: str = "inp", *, seed: int = 0, rotary: bool = False) -> dict[str, Any]:
    """In-memory tiny components: transformer, vae, text_encoder, tokenizer, scheduler.

    Each model is constructed right after ``torch.manual_seed(seed)`` inside a forked RNG, so
    the caller's global RNG state is left untouched. Models are in eval mode, float32.
    """
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tcfg = transformer_config(variant, rotary=rotary)  # validates variant before any work
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**tcfg)
        torch.manual_seed(seed)
        vae = AutoencoderKLCogVideoX(**vae_config())
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(**t5_config(len(tokenizer))))
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": CogVideoXDDIMScheduler(**SCHEDULER_CONFIG),
    }


def _model_index() -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }


def write_tiny_model(path: PathLike, variant: str = "inp", *, seed: int = 0, rotary: bool = False) -> Path:
    """Write a tiny CogVideoX(-Fun) model folder (diffusers layout, safetensors) and return it.

    Layout: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/.
    ``variant`` "inp" (in_channels 33, like CogVideoX-Fun-*-InP) or "t2v" (16).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_components(variant, seed=seed, rotary=rotary)
    parts["transformer"].save_pretrained(root / "transformer", safe_serialization=True)
    parts["vae"].save_pretrained(root / "vae", safe_serialization=True)
    parts["text_encoder"].save_pretrained(root / "text_encoder", safe_serialization=True)
    parts["tokenizer"].save_pretrained(root / "tokenizer")
    parts["scheduler"].save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(_model_index(), indent=2, sort_keys=True) + "\n")
    return root


# ----------------------------------------------------------------------------------------------
# synthetic media


def synthetic_frames(height: int, width: int, n_frames: int, *, seed: int = 0) -> np.ndarray:
    """Deterministic moving content, uint8 [F, H, W, 3]: drifting sinusoidal colour gradients plus
    a white square sliding right and bobbing. Consecutive frames differ by tens of grey levels, so
    a decoded frame is identified by its nearest source frame."""
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0.0, 2.0 * np.pi, size=3)
    y = (np.arange(height, dtype=np.float32) / height)[:, None]
    x = (np.arange(width, dtype=np.float32) / width)[None, :]
    side = max(4, min(height, width) // 4)
    out = np.empty((n_frames, height, width, 3), np.uint8)
    for t in range(n_frames):
        r = 0.5 + 0.5 * np.sin(2 * np.pi * (x + t / 40) + ph[0]) + 0 * y
        g = 0.5 + 0.5 * np.sin(2 * np.pi * (0.7 * y - t / 29) + ph[1]) + 0 * x
        b = 0.5 + 0.5 * np.sin(3 * np.pi * (x + y) + ph[2] + t / 7)
        img = np.stack([r, g, b], axis=-1) * 255.0
        top = int((height - side) * (0.5 + 0.5 * np.sin(t / 5 + ph[0])))
        left = (t * 5) % (width - side + 1)
        img[top : top + side, left : left + side] = 255.0
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class SyntheticClip:
    """One synthetic video of :func:`write_synthetic_dataset` (sizes already scaled)."""

    file_path: str  # relative to the dataset root
    height: int
    width: int
    frames: int
    fps: int
    seed: int


def synthetic_clips(*, seed: int = 0, n_frames: int = 24, scale: int = 1) -> list[SyntheticClip]:
    """The videos :func:`write_synthetic_dataset` writes, in metadata order."""
    if n_frames < 9 or scale < 1:
        raise ValueError(f"need n_frames >= 9 and scale >= 1, got {n_frames}, {scale}")
    spec = [  # name, h, w, frames, fps
        ("landscape", 96, 160, n_frames, 24),
        ("portrait", 160, 96, n_frames, 12),
        ("square", 128, 128, n_frames + n_frames // 2, 8),
        ("wide", 48, 192, n_frames, 24),  # 4:1
        ("short", 64, 112, 6, 24),
    ]
    return [
        SyntheticClip(f"videos/{name}.mp4", h * scale, w * scale, f, fps, seed * 1000 + i)
        for i, (name, h, w, f, fps) in enumerate(spec)
    ]


def synthetic_images(*, seed: int = 0, scale: int = 1) -> list[SyntheticClip]:
    """The images :func:`write_synthetic_dataset` writes (frames=1, fps=0)."""
    spec = [("portrait.png", 144, 96), ("landscape.jpg", 96, 144), ("square.png", 80, 80)]
    return [
        SyntheticClip(f"images/{name}", h * scale, w * scale, 1, 0, seed * 1000 + 100 + i)
        for i, (name, h, w) in enumerate(spec)
    ]


def _write_image(path: Path, frame: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(frame)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95)
    else:
        img.save(path)


def write_synthetic_dataset(
    root: PathLike, *, seed: int = 0, n_frames: int = 24, scale: int = 1
) -> Path:
    """Write a small dataset in CogVideoX-Fun's format and return ``root/metadata.json``.

    Five H.264 clips (landscape 96x160, portrait 160x96, square 128x128 with 1.5x n_frames,
    wide 48x192 = 4:1, a 6-frame clip 64x112; h x w times ``scale``; fps 24/12/8) and three
    images (portrait PNG, landscape JPEG, square PNG). Rows are
    ``{"file_path": relative path, "text": caption, "type": "video" | "image"}``; one caption
    is longer than 226 T5 tokens.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clips = synthetic_clips(seed=seed, n_frames=n_frames, scale=scale)
    images = synthetic_images(seed=seed, scale=scale)
    captions = caption_corpus(len(clips) + len(images) + 40, seed=seed)
    rows: list[dict[str, str]] = []
    for i, clip in enumerate(clips):
        write_mp4(root / clip.file_path, synthetic_frames(clip.height, clip.width, clip.frames, seed=clip.seed), clip.fps)
        text = captions[i]
        if clip.file_path.endswith("square.mp4"):
            text = " ".join(captions[-40:])  # > 226 tokens: exercises truncation
        rows.append({"file_path": clip.file_path, "text": text, "type": "video"})
    for j, image in enumerate(images):
        _write_image(root / image.file_path, synthetic_frames(image.height, image.width, 1, seed=image.seed)[0])
        rows.append({"file_path": image.file_path, "text": captions[len(clips) + j], "type": "image"})
    meta = root / "metadata.json"
    meta.write_text(json.dumps(rows, indent=2) + "\n")
    return meta


def write_bad_dataset(root: PathLike) -> Path:
    """Write ``root/metadata.json`` with 2 good rows and the inputs a loader must skip; return it.

    Rows, in order:
      0. good video ``videos/good.mp4`` (64x96, 12 frames)
      1. good image ``images/good.png`` (64x64)
      2. ``videos/missing.mp4``: file does not exist
      3. ``videos/empty.mp4``: zero bytes
      4. ``videos/corrupt.mp4``: random bytes
      5. ``videos/two_frames.mp4``: valid H.264, only 2 frames (too short to train on)
      6. ``images/garbage.png``: random bytes
      7. ``type`` "audio"
      8. no ``text``
      9. no ``file_path``
    """
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12345)
    write_mp4(root / "videos/good.mp4", synthetic_frames(64, 96, 12, seed=7), 24)
    _write_image(root / "images/good.png", synthetic_frames(64, 64, 1, seed=8)[0])
    (root / "videos/empty.mp4").write_bytes(b"")
    (root / "videos/corrupt.mp4").write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    write_mp4(root / "videos/two_frames.mp4", synthetic_frames(64, 64, 2, seed=9), 24)
    (root / "images/garbage.png").write_bytes(rng.integers(0, 256, size=1024, dtype=np.uint8).tobytes())
    (root / "audio").mkdir(exist_ok=True)
    (root / "audio/clip.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    rows: list[dict[str, str]] = [
        {"file_path": "videos/good.mp4", "text": "A small red fox runs across the meadow.", "type": "video"},
        {"file_path": "images/good.png", "text": "A golden owl sleeps near the old bridge.", "type": "image"},
        {"file_path": "videos/missing.mp4", "text": "A file that does not exist.", "type": "video"},
        {"file_path": "videos/empty.mp4", "text": "A zero-byte video.", "type": "video"},
        {"file_path": "videos/corrupt.mp4", "text": "Random bytes named mp4.", "type": "video"},
        {"file_path": "videos/two_frames.mp4", "text": "A clip with only two frames.", "type": "video"},
        {"file_path": "images/garbage.png", "text": "Random bytes named png.", "type": "image"},
        {"file_path": "audio/clip.wav", "text": "A sound, not a picture.", "type": "audio"},
        {"file_path": "videos/good.mp4", "type": "video"},
        {"text": "A row without a file path.", "type": "video"},
    ]
    meta = root / "metadata.json"
    meta.write_text(json.dumps(rows, indent=2) + "\n")
    return meta
