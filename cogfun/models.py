"""Loading and running the CogVideoX-Fun components, the way a real checkpoint folder is laid out.

`pretrained_model_name_or_path/` holds transformer/, vae/, text_encoder/, tokenizer/, scheduler/
(diffusers layout). Precompute uses the VAE and T5 (never together); training uses only the
transformer and the scheduler config. Config reads (`read_component_config`) need no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TEXT_LEN = 226  # CogVideoX: T5 tokens, padded, no attention mask


def dtype_of(mixed_precision: str):
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def component_dir(model: str | Path, name: str) -> Path:
    path = Path(model) / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: missing. --pretrained_model_name_or_path must be a diffusers-layout CogVideoX-Fun folder "
            f"with transformer/, vae/, text_encoder/, tokenizer/ and scheduler/")
    return path


def read_component_config(model: str | Path, name: str) -> dict:
    cfg = component_dir(model, name) / ("scheduler_config.json" if name == "scheduler" else "config.json")
    return json.loads(cfg.read_text())


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files (*.safetensors)")
    return files


def hash_weights(folder: Path, cache_file: Path | None = None) -> str:
    """SHA-256 over a component's weight files; cached by (path, size, mtime) in `cache_file`."""
    cache: dict = {}
    if cache_file is not None and cache_file.is_file():
        cache = json.loads(cache_file.read_text())
    files = _weight_files(folder)
    stamp = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    if stamp in cache:
        return cache[stamp]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if cache_file is not None:
        cache[stamp] = digest
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return digest


def model_identity(model: str | Path, cache_file: Path | None = None) -> dict:
    """What precompute's output depends on: encoder weights + the configs the trainer must match."""
    vae_cfg = read_component_config(model, "vae")
    te_cfg = read_component_config(model, "text_encoder")
    return {
        "path": str(Path(model).resolve()),
        "vae_sha256": hash_weights(component_dir(model, "vae"), cache_file),
        "text_encoder_sha256": hash_weights(component_dir(model, "text_encoder"), cache_file),
        "tokenizer_sha256": _hash_small_dir(component_dir(model, "tokenizer")),
        "scaling_factor": vae_cfg.get("scaling_factor", 1.15258426),
        "latent_channels": vae_cfg.get("latent_channels", 16),
        "text_dim": te_cfg["d_model"],
    }


def _hash_small_dir(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- text encoder

def load_text_encoder(model: str | Path, dtype, device, *, offload: bool = False):
    """Tokenizer + T5 encoder; with `offload` the weights stay on the CPU and each layer is moved
    to `device` only while it runs (T5-XXL on a small GPU)."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(component_dir(model, "tokenizer"))
    encoder = T5EncoderModel.from_pretrained(component_dir(model, "text_encoder"), torch_dtype=dtype)
    encoder.requires_grad_(False).eval()
    if offload and device.type != "cpu":
        from accelerate import cpu_offload

        cpu_offload(encoder, execution_device=device)
    else:
        encoder.to(device)
    return tokenizer, encoder


def encode_prompts(tokenizer, encoder, texts: list[str]):
    """T5 embeddings [B, 226, D] of padded prompts, no attention mask (CogVideoX's convention)."""
    import torch

    ids = tokenizer(texts, padding="max_length", max_length=TEXT_LEN, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    device = getattr(encoder, "_hf_hook", None)
    device = device.execution_device if device is not None else encoder.device
    with torch.no_grad():
        return encoder(ids.to(device))[0]


# ---------------------------------------------------------------- VAE

def load_vae(model: str | Path, dtype, device, *, slicing: bool = False):
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(component_dir(model, "vae"), torch_dtype=dtype)
    vae.requires_grad_(False).eval().to(device)
    if slicing:
        vae.enable_slicing()  # exact: splits the batch, same numbers
    return vae


def encode_clips(vae, pixels):
    """pixels [B, 3, F, H, W] in [-1, 1] -> posterior (mean, logvar) each [B, F', 16, H/8, W/8]."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean.permute(0, 2, 1, 3, 4), dist.logvar.permute(0, 2, 1, 3, 4)


# ---------------------------------------------------------------- transformer / scheduler

def load_transformer(model: str | Path, dtype):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(component_dir(model, "transformer"), torch_dtype=dtype)


def load_scheduler(model: str | Path):
    """DDPM with the model's own settings (v-prediction, zero terminal SNR for CogVideoX)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(component_dir(model, "scheduler"))


def load_sampling_scheduler(model: str | Path):
    """The sampler the model folder names (scheduler_config.json `_class_name`: CogVideoXDDIMScheduler
    for CogVideoX(-Fun) 2b, CogVideoXDPMScheduler for 5b), with the folder's settings."""
    import diffusers

    name = read_component_config(model, "scheduler").get("_class_name", "CogVideoXDDIMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise FileNotFoundError(f"{component_dir(model, 'scheduler')}: unknown scheduler class {name!r} "
                                f"in scheduler_config.json")
    return cls.from_pretrained(component_dir(model, "scheduler"))
