"""Loading and running the CogVideoX-Fun components, the way a real checkpoint folder is laid out.

`pretrained_model_name_or_path/` holds transformer/, vae/, text_encoder/, tokenizer/, scheduler/
(diffusers layout). Precompute uses the VAE and T5 (never together); training uses only the
transformer and the scheduler config. Config reads (`read_component_config`) need no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

TEXT_LEN = 226  # CogVideoX: T5 tokens, padded, no attention mask

# transformer/config.json keys that CogVideoX-Fun's transformer class reads and diffusers' class
# ignores (with a warning), which cogfun implements itself.
FUN_KEYS = ("add_noise_in_inpaint_model",)
# Keys diffusers' class takes but cogfun's training does not feed, refused when set.
UNSUPPORTED_KEYS = {"ofs_embed_dim": "the ofs embedding of CogVideoX 1.5 image-to-video models (another "
                                     "conditioning than CogVideoX-Fun's InP)"}


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


class ModelError(ValueError):
    """A model folder cogfun cannot train (the message says why and what to use instead)."""


@dataclass(frozen=True)
class TransformerFamily:
    """What the data and the training maths depend on in a transformer config (no weights read).

    `patch_size_t` (CogVideoX 1.5: 2): latent frames are patched in pairs, so every video sample
    needs a multiple of it (`latent_multiple`); `reference_noise`: CogVideoX-Fun's
    `add_noise_in_inpaint_model` (noise on the reference pixels before the masked-clip encode);
    `position_frames`: the most latent frames the model's positions cover (sincos models: the
    stored table's, `position_frames_of`; None with RoPE).
    """
    in_channels: int
    latent_channels: int
    patch_size_t: int | None
    reference_noise: bool
    position_frames: int | None = None

    @property
    def latent_multiple(self) -> int:
        return self.patch_size_t or 1

    @property
    def inpaint(self) -> bool:
        """A CogVideoX-Fun InP model (noisy latents + mask + masked-video latents), else text-to-video."""
        return self.in_channels == 2 * self.latent_channels + 1


def transformer_family(model: str | Path) -> TransformerFamily:
    """Read and vet transformer/config.json: every key that changes the maths is either known to
    diffusers' class or implemented by cogfun (`FUN_KEYS`); anything else, an unsupported key, or
    in_channels that fit neither text-to-video (16) nor InP (33) raises ModelError naming it."""
    import inspect

    from diffusers import CogVideoXTransformer3DModel

    raw = read_component_config(model, "transformer")
    where = component_dir(model, "transformer") / "config.json"
    known = set(inspect.signature(CogVideoXTransformer3DModel.__init__).parameters) - {"self"}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in known and k not in FUN_KEYS)
    if unknown:
        raise ModelError(f"{where}: unknown transformer config key(s) {', '.join(unknown)}: cogfun neither "
                         f"implements nor ignores keys that may change the model's maths. If a key is "
                         f"only a note, remove it from the file.")
    for key, what in UNSUPPORTED_KEYS.items():
        if raw.get(key):
            raise ModelError(f"{where}: {key}={raw[key]!r} ({what}) is not supported by cogfun")
    latent = int(raw.get("out_channels") or 16)
    in_channels = int(raw.get("in_channels", 16))
    if in_channels == 2 * latent:
        raise ModelError(f"{where}: in_channels {in_channels} = {latent} noisy + {latent} control/reference "
                         f"latents: a CogVideoX-Fun Control or Pose model (or a CogVideoX image-to-video model). "
                         f"That is another task, which cogfun does not train; use a CogVideoX-Fun InP model "
                         f"(in_channels {2 * latent + 1}) with --train_mode inpaint/i2v, or a text-to-video model "
                         f"(in_channels {latent}) with --train_mode normal")
    if in_channels not in (latent, 2 * latent + 1):
        raise ModelError(f"{where}: in_channels {in_channels} fits neither --train_mode normal ({latent}: "
                         f"text-to-video) nor inpaint/i2v ({2 * latent + 1}: CogVideoX-Fun InP)")
    p_t = raw.get("patch_size_t")
    return TransformerFamily(in_channels=in_channels, latent_channels=latent,
                             patch_size_t=int(p_t) if p_t and int(p_t) > 1 else None,
                             reference_noise=bool(raw.get("add_noise_in_inpaint_model", False)),
                             position_frames=position_frames_of(raw))


def position_frames_of(transformer_config: dict) -> int | None:
    """The most latent frames a model without RoPE can take: CogVideoX-Fun's class stretches its
    stored sincos table over height and width only, so the table's (sample_frames - 1) / 4 + 1
    frames (49 -> 13) bound every input (`cogfun.positions`). None for RoPE models (any length)."""
    if transformer_config.get("use_rotary_positional_embeddings", False):
        return None
    ratio = transformer_config.get("temporal_compression_ratio", 4)
    return (transformer_config.get("sample_frames", 49) - 1) // ratio + 1


def check_position_frames(position_frames: int | None, frames: int, flag: str) -> None:
    """Refuse `frames` pixel frames (from `flag`) beyond what the model's positions cover
    (`position_frames_of`), before any work, naming the largest count that fits."""
    if position_frames is None or (frames - 1) // 4 + 1 <= position_frames:
        return
    raise ModelError(f"{flag} {frames}: this model has sincos positions (no RoPE) stored for "
                     f"{position_frames} latent frames ({(position_frames - 1) * 4 + 1} frames: its transformer "
                     f"config's sample_frames); CogVideoX-Fun's transformer class cannot run longer inputs and "
                     f"neither does cogfun's: use at most {(position_frames - 1) * 4 + 1}")


def check_model_fits(model: str | Path, train_mode: str) -> TransformerFamily:
    """Refuse, before any encoding, a model whose parts do not fit each other or `train_mode`
    (config.json reads only): the transformer's in_channels against the mode (16 for normal,
    2 x latent + 1 = 33 for inpaint / i2v), the VAE's latent channels against the transformer's
    out_channels, T5's width against its text_embed_dim. These are the checks `cogfun train` makes
    of the shards; precompute and inspect-buckets make them first. Returns the family."""
    family = transformer_family(model)
    tcfg = read_component_config(model, "transformer")
    problems = []
    want = 2 * family.latent_channels + 1 if train_mode in ("inpaint", "i2v") else family.latent_channels
    if family.in_channels != want:
        hint = ("an InP model needs --train_mode inpaint (or i2v)" if family.inpaint else
                "a text-to-video model needs --train_mode normal")
        problems.append(f"in_channels: --train_mode {train_mode} needs {want}, the transformer has "
                        f"{family.in_channels} ({hint})")
    vae_latent = read_component_config(model, "vae").get("latent_channels", 16)
    if vae_latent != family.latent_channels:
        problems.append(f"latent channels: the VAE makes {vae_latent}, the transformer's out_channels is "
                        f"{family.latent_channels}")
    text_dim = read_component_config(model, "text_encoder").get("d_model")
    if text_dim is not None and text_dim != tcfg.get("text_embed_dim", 4096):
        problems.append(f"text dim: T5 gives {text_dim}, the transformer's text_embed_dim is "
                        f"{tcfg.get('text_embed_dim', 4096)}")
    if problems:
        raise ModelError(f"{model} does not fit this run (nothing was encoded):\n  " + "\n  ".join(problems))
    return family


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
    """The transformer as CogVideoX-Fun's own class runs it (`cogfun.positions.FunTransformer`:
    diffusers' class and weights, CogVideoX-Fun's positions at every size, the CogVideoX 1.5 padding
    of a 1-latent-frame input built in). Callers pass no `image_rotary_emb` and pad nothing."""
    from cogfun.positions import FunTransformer

    return FunTransformer.from_pretrained(component_dir(model, "transformer"), torch_dtype=dtype)


def load_transformer_weights(transformer, path: str | Path) -> tuple[list[str], list[str]]:
    """--transformer_path: a .safetensors state dict loaded over the transformer (non-strict, as
    CogVideoX-Fun does); returns (missing, unexpected) keys. Pickled checkpoints are refused."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"--transformer_path {path}: only .safetensors files are read (a .bin/.pt/.pth checkpoint "
                         f"is a pickle, which cogfun never loads); convert it, e.g. "
                         f"safetensors.torch.save_file(torch.load(p, weights_only=True), 'transformer.safetensors')")
    if not path.is_file():
        raise ModelError(f"--transformer_path {path}: no such file")
    state = load_file(str(path))
    result = transformer.load_state_dict(state, strict=False)
    if not set(state) - set(result.unexpected_keys):
        raise ModelError(f"--transformer_path {path}: none of its {len(state)} tensors is a parameter of the "
                         f"transformer (e.g. {next(iter(state), '-')!r}); is it a transformer checkpoint?")
    return list(result.missing_keys), list(result.unexpected_keys)


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
