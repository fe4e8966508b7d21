"""Tiny stand-ins for a CogVideoX-Fun model folder and a training dataset, for tests and smoke runs.

:func:`write_tiny_model` writes randomly initialised instances of the *real* classes
(``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``, ``T5EncoderModel``, a trained T5
Unigram tokenizer, the CogVideoX scheduler config) in the diffusers folder layout, so the same
``from_pretrained`` code loads them and a real checkpoint folder. One stand-in per released layout
(:data:`RELEASED`: CogVideoX-Fun-2b-InP, V1.1-5b-InP, V1.5-5b-InP, and a CogVideoX-2b text-to-video
model), with the published structure keys and only widths and depths shrunk. The VAE keeps the real
8x spatial / 4x temporal compression and 16 latent channels; all models together hold ~0.34 M
parameters (1.4 MB on disk). Same seed -> byte-identical files.

:func:`write_synthetic_dataset` and :func:`write_bad_dataset` write small datasets in
CogVideoX-Fun's ``metadata.json`` format (H.264 mp4 clips with moving, frame-identifiable content
and PNG/JPEG images); :func:`synthetic_frames` regenerates the exact source frames of a clip.

Heavy libraries (torch, diffusers, transformers, PyAV) are imported inside the functions that
need them.
"""

from __future__ import annotations

import io
import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cogfun.models import TEXT_LEN
from cogfun.shards import apply_umask
from cogfun.video import write_mp4, write_video

if TYPE_CHECKING:
    from transformers import T5Tokenizer

__all__ = [
    "TEXT_SEQ_LEN",
    "T5_D_MODEL",
    "VAE_SCALING_FACTOR",
    "SCHEDULER_CONFIG",
    "RELEASED",
    "VARIANTS",
    "variant_name",
    "transformer_config",
    "diffusers_kwargs",
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
    "write_video",
    "write_audio",
    "write_media_zoo",
]

PathLike = str | os.PathLike[str]

TEXT_SEQ_LEN = TEXT_LEN  # CogVideoX's T5 sequence length
T5_D_MODEL = 32
VAE_SCALING_FACTOR = 1.15258426  # CogVideoX-2b's value
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


# The released checkpoints cogfun trains, as tiny stand-ins: each transformer config keeps the
# published structure keys (positions, patching, channels, sample sizes, reference noise) and
# shrinks only widths and depths (heads x head dim, layers, time embedding, text width).
#   2b-inp       CogVideoX-Fun-2b-InP: sincos positions, no patch_size_t, in_channels 33
#   5b-inp-v1.1  CogVideoX-Fun-V1.1-5b-InP: 3D RoPE, add_noise_in_inpaint_model, VAE scaling 0.7
#   v1.5-5b-inp  CogVideoX-Fun-V1.5-5b-InP: + patch_size_t 2, patch_bias false, 85 x 384 x 680 sample
#   t2v          CogVideoX-2b text-to-video: in_channels 16, sincos positions
# "inp" is the name the tests and the demo have always used for the 2b-InP layout.
VARIANT_ALIASES = {"inp": "2b-inp"}
RELEASED: dict[str, dict[str, Any]] = {
    "2b-inp": {"in_channels": 2 * LATENT_CHANNELS + 1, "num_attention_heads": 2,
               "use_rotary_positional_embeddings": False, "use_learned_positional_embeddings": False,
               "sample_frames": 49, "sample_height": 60, "sample_width": 90},
    "5b-inp-v1.1": {"in_channels": 2 * LATENT_CHANNELS + 1, "num_attention_heads": 3,
                    "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False,
                    "sample_frames": 49, "sample_height": 60, "sample_width": 90,
                    "add_noise_in_inpaint_model": True},
    "v1.5-5b-inp": {"in_channels": 2 * LATENT_CHANNELS + 1, "num_attention_heads": 3,
                    "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False,
                    "sample_frames": 85, "sample_height": 384, "sample_width": 680,
                    "patch_size_t": 2, "patch_bias": False, "add_noise_in_inpaint_model": True},
    "t2v": {"in_channels": LATENT_CHANNELS, "num_attention_heads": 2,
            "use_rotary_positional_embeddings": False, "use_learned_positional_embeddings": False,
            "sample_frames": 49, "sample_height": 60, "sample_width": 90},
}
VARIANTS = tuple(RELEASED) + tuple(VARIANT_ALIASES)
# Transformer config keys that CogVideoX-Fun's transformer class reads but diffusers' does not (a
# diffusers model built from kwargs cannot take them, so write_tiny_model writes them into config.json).
FUN_ONLY_KEYS = ("add_noise_in_inpaint_model",)
# VAE scaling factor per layout: CogVideoX-2b's VAE config vs the 5b / 1.5 one.
VAE_SCALING = {"2b-inp": VAE_SCALING_FACTOR, "t2v": VAE_SCALING_FACTOR, "5b-inp-v1.1": 0.7, "v1.5-5b-inp": 0.7}


def variant_name(variant: str) -> str:
    """The released layout a variant name stands for ("inp" -> "2b-inp"); raises on unknown names."""
    name = VARIANT_ALIASES.get(variant, variant)
    if name not in RELEASED:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    return name


def transformer_config(variant: str = "inp", *, rotary: bool | None = None) -> dict[str, Any]:
    """The tiny transformer's config.json content (diffusers kwargs + CogVideoX-Fun's own keys).

    ``variant``: one of :data:`VARIANTS` (see :data:`RELEASED`). ``rotary`` overrides the layout's
    position embedding (True: 3D RoPE as CogVideoX-5b). sample_* are latent sizes, as in the real
    config. Pass it through :func:`diffusers_kwargs` to construct the diffusers class.
    """
    layout = RELEASED[variant_name(variant)]
    cfg = {
        "attention_head_dim": 16,
        "out_channels": LATENT_CHANNELS,
        "time_embed_dim": 32,
        "text_embed_dim": T5_D_MODEL,
        "num_layers": 2,
        "patch_size": 2,
        "max_text_seq_length": TEXT_SEQ_LEN,
        **layout,
    }
    if rotary is not None:
        cfg["use_rotary_positional_embeddings"] = rotary
    return cfg


def diffusers_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys diffusers' CogVideoXTransformer3DModel does not take."""
    return {k: v for k, v in config.items() if k not in FUN_ONLY_KEYS}


def vae_config(variant: str = "inp") -> dict[str, Any]:
    """Constructor kwargs of the tiny AutoencoderKLCogVideoX: 4 blocks (8x spatial), 4x temporal;
    the layout's scaling factor (2b: 1.15258426, 5b and 1.5: 0.7)."""
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
        "scaling_factor": VAE_SCALING[variant_name(variant)],
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


def build_tiny_components(variant: str = "inp", *, seed: int = 0, rotary: bool | None = None) -> dict[str, Any]:
    """In-memory tiny components: transformer, vae, text_encoder, tokenizer, scheduler.

    ``variant``/``rotary``: as :func:`transformer_config` (the transformer is diffusers' class, so
    CogVideoX-Fun-only keys such as ``add_noise_in_inpaint_model`` are not on it: they live in the
    config.json :func:`write_tiny_model` writes). Each model is constructed right after ``torch.manual_seed(seed)`` inside a forked RNG, so
    the caller's global RNG state is left untouched. Models are in eval mode, float32.
    """
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tcfg = transformer_config(variant, rotary=rotary)  # validates variant before any work
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**diffusers_kwargs(tcfg))
        torch.manual_seed(seed)
        vae = AutoencoderKLCogVideoX(**vae_config(variant))
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


def write_tiny_model(path: PathLike, variant: str = "inp", *, seed: int = 0, rotary: bool | None = None) -> Path:
    """Write a tiny CogVideoX(-Fun) model folder (diffusers layout, safetensors) and return it.

    Layout: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/.
    ``variant``: a released layout of :data:`RELEASED` ("2b-inp" = "inp", "5b-inp-v1.1",
    "v1.5-5b-inp", "t2v"). transformer/config.json carries the layout's CogVideoX-Fun-only keys
    (``add_noise_in_inpaint_model``) as the released files do.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_components(variant, seed=seed, rotary=rotary)
    parts["transformer"].save_pretrained(root / "transformer", safe_serialization=True)
    fun_only = {k: v for k, v in transformer_config(variant, rotary=rotary).items() if k in FUN_ONLY_KEYS}
    if fun_only:  # not a diffusers kwarg, so not in the config save_pretrained wrote
        config_file = root / "transformer" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fun_only}, indent=2,
                                          sort_keys=True) + "\n")
    parts["vae"].save_pretrained(root / "vae", safe_serialization=True)
    parts["text_encoder"].save_pretrained(root / "text_encoder", safe_serialization=True)
    parts["tokenizer"].save_pretrained(root / "tokenizer")
    parts["scheduler"].save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(_model_index(), indent=2, sort_keys=True) + "\n")
    apply_umask(root)  # save_pretrained's safetensors weights are 0600 whatever the umask
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


def write_audio(path: PathLike, seconds: float = 0.5, *, codec: str = "aac", fmt: str = "mp4",
                cover: np.ndarray | None = None, empty_video: bool = False) -> None:
    """A sine tone (an audio-only file); `cover`: an RGB image muxed as attached cover art;
    `empty_video`: plus a video track holding no frame (Matroska keeps such a track, mp4 drops it)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = 16000
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        art = None
        if empty_video:
            empty = container.add_stream("libx264", rate=12)
            empty.width, empty.height, empty.pix_fmt = 64, 32, "yuv420p"
        if cover is not None:
            art = container.add_stream("mjpeg", rate=1)
            art.width, art.height, art.pix_fmt = cover.shape[1], cover.shape[0], "yuvj420p"
            art.disposition = av.stream.Disposition.attached_pic
        tone = np.sin(np.arange(int(seconds * rate), dtype=np.float32) * (2 * np.pi * 440 / rate))
        size = stream.codec_context.frame_size or 1024
        for start in range(0, len(tone), size):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + size].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if art is not None:
            vf = av.VideoFrame.from_ndarray(cover, format="rgb24").reformat(format="yuvj420p")
            vf.pts = 0
            for packet in [*art.encode(vf), *art.encode()]:
                container.mux(packet)


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


# An Ultra HDR JPEG's XMP names the gain-map version (what Pillow looks for to read such a file as a JPEG).
ULTRA_HDR_XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                 b'<rdf:Description xmlns:hdrgm="http://ns.adobe.com/hdr-gain-map/1.0/" hdrgm:Version="1.0"/>'
                 b'</rdf:RDF></x:xmpmeta>')


def write_media_zoo(root: PathLike, *, height: int = 32, width: int = 64, frames: int = 12, seed: int = 5) -> Path:
    """Write one small real file of each kind real datasets hold, and ``root/metadata.json``.

    Every video and animation shows ``synthetic_frames(height, width, frames, seed=seed)`` (the
    MPEG-1 clip at 24 fps, the others at 12 fps or 80 ms a frame; the Matroska clip has twice the
    frames, B-frames and a keyframe every 8); every photo shows its first frame. Files (rows; a
    ``type`` of ``video`` unless it says image):

    h264.mp4 · rot90.mp4 (display matrix: 90 degrees counter-clockwise) · rot90_hflip.mp4 (and
    mirrored) · av1.mp4 (SVT-AV1) · vp9.webm · h264.mkv · mpeg1.mpg · hevc10.mp4 (x265, 10 bit;
    needs width >= 64) · two_streams.mp4 (a half-size thumbnail track first, then the picture) ·
    anim.gif, anim.png (APNG), anim.webp (Pillow, 80 ms a frame; the GIF also as an image) ·
    photo.heic (EXIF orientation 6: shown rotated 90 degrees clockwise) · photo.avif (orientation 8) ·
    ultrahdr.jpg (a JPEG + a gain-map JPEG, MPF and hdrgm XMP as Android writes) · appended.jpg (a
    JPEG with a second JPEG appended) · cut_marker.jpg (its last byte cut: every row present) ·
    cut_scan.jpg (cut inside the scan data) · audio.mp4 (AAC only) · cover_audio.mp4 (AAC + cover
    art) · no_frames.mkv (AAC + a video track without frames) · tiny.png (8x8).
    """
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()  # HEIF saving
    root = Path(root)
    zoo = root / "zoo"
    zoo.mkdir(parents=True, exist_ok=True)
    clip = synthetic_frames(height, width, frames, seed=seed)
    quality = {"libx264": {"crf": "12", "preset": "veryfast"}, "libsvtav1": {"crf": "20", "preset": "12"},
               "libvpx-vp9": {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"},
               "mpeg1video": {"b": "2M"}, "libx265": {"crf": "12", "x265-params": "log-level=error"}}
    for name, codec, fmt, pix_fmt, extra in [
        ("h264.mp4", "libx264", "mp4", "yuv420p", {}),
        ("rot90.mp4", "libx264", "mp4", "yuv420p", {"rotation": 90}),
        ("rot90_hflip.mp4", "libx264", "mp4", "yuv420p", {"rotation": 90, "hflip": True}),
        ("av1.mp4", "libsvtav1", "mp4", "yuv420p", {}),
        ("vp9.webm", "libvpx-vp9", "webm", "yuv420p", {}),
        ("hevc10.mp4", "libx265", "mp4", "yuv420p10le", {}),
        ("two_streams.mp4", "libx264", "mp4", "yuv420p",
         {"extra_streams": [synthetic_frames(height // 2, width // 2, frames, seed=seed + 1)]}),
    ]:
        write_video(zoo / name, clip, 12, codec=codec, fmt=fmt, pix_fmt=pix_fmt, options=quality[codec], **extra)
    write_video(zoo / "mpeg1.mpg", clip, 24, codec="mpeg1video", fmt="mpeg", options=quality["mpeg1video"])
    write_video(zoo / "h264.mkv", synthetic_frames(height, width, 2 * frames, seed=seed), 12, fmt="matroska",
                options={"crf": "12", "preset": "veryfast", "g": "8", "bf": "2"})
    images = [Image.fromarray(f) for f in clip]
    for name in ("anim.gif", "anim.png", "anim.webp"):
        images[0].save(zoo / name, save_all=True, append_images=images[1:], duration=80, loop=0,
                       **({"lossless": True} if name.endswith("webp") else {}))
    for name, fmt, orientation in [("photo.heic", "HEIF", 6), ("photo.avif", "AVIF", 8)]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        images[0].save(zoo / name, fmt, exif=exif.tobytes(), quality=95)
    gain_map = Image.fromarray(clip[-1]).convert("L").resize((width // 4, height // 4))
    images[0].save(zoo / "ultrahdr.jpg", "MPO", save_all=True, append_images=[gain_map], xmp=ULTRA_HDR_XMP,
                   quality=95)
    jpeg = io.BytesIO()
    images[0].save(jpeg, "JPEG", quality=95)
    second = io.BytesIO()
    gain_map.save(second, "JPEG")
    (zoo / "appended.jpg").write_bytes(jpeg.getvalue() + second.getvalue())
    (zoo / "cut_marker.jpg").write_bytes(jpeg.getvalue()[:-1])
    (zoo / "cut_scan.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 5])
    write_audio(zoo / "audio.mp4")
    write_audio(zoo / "cover_audio.mp4", cover=clip[0])
    write_audio(zoo / "no_frames.mkv", fmt="matroska", empty_video=True)
    Image.fromarray(clip[0][:8, :8]).save(zoo / "tiny.png")
    images_rows = {"photo.heic", "photo.avif", "ultrahdr.jpg", "appended.jpg", "cut_marker.jpg", "cut_scan.jpg",
                   "tiny.png"}
    names = ["h264.mp4", "rot90.mp4", "rot90_hflip.mp4", "av1.mp4", "vp9.webm", "h264.mkv", "mpeg1.mpg",
             "hevc10.mp4", "two_streams.mp4", "anim.gif", "anim.png", "anim.webp", "audio.mp4", "cover_audio.mp4",
             "no_frames.mkv",
             *sorted(images_rows)]
    rows = [{"file_path": f"zoo/{n}", "text": f"The zoo's {n}.", "type": "image" if n in images_rows else "video"}
            for n in names]
    rows.append({"file_path": "zoo/anim.gif", "text": "The GIF's first frame.", "type": "image"})
    meta = root / "metadata.json"
    meta.write_text(json.dumps(rows, indent=2) + "\n")
    return meta
