"""Generating videos with a CogVideoX(-Fun) transformer: `cogfun sample` and validation during
training share every function here (DESIGN §9).

Four steps, each its own function, so that a training process can run only the last two with its
own (LoRA-carrying, possibly sharded) transformer:

1. `encode_inputs`: prompts -> T5 embeddings (T5 loaded, used, freed) and, for the InP models,
   the conditioning channels of each request (mask channel + masked-video latents) with the VAE.
   The conditioning is built by the functions training uses (`cogfun.masks`: `masked_clip`,
   `mask_channel`, `add_reference_noise`), as CogVideoX-Fun's inpaint pipeline builds it: the
   known frames are the image(s), every other pixel is -1 before encoding, both parts are
   multiplied by the VAE scaling factor, and the reference pixels get noise of strength
   `INFERENCE_NOISE_AUG_STRENGTH` when the transformer's raw config asks for it.
   No image = the t2v policy: mask and masked latents all zero (CogVideoX-Fun's all-masked case).
2. (the caller) a transformer; `load_lora` applies a trained LoRA file to a loaded one.
3. `denoise`: diffusers' `CogVideoXPipeline` runs the loop (scheduler, classifier-free guidance,
   progress bar) on a `Denoiser`: the transformer as the pipeline sees a text-to-video
   one, 16 input channels, with the (CFG-doubled) conditioning appended to every call. So the InP
   models need no second copy of the loop; only the conditioning is ours. The positions are the
   transformer's own (`cogfun.positions`: the pipeline's RoPE is replaced), so the final latents are
   those of CogVideoX-Fun's `CogVideoXFunInpaintPipeline` for the same seed, prompts and image
   (tests/test_sampling_parity.py).
4. `decode`: the VAE (loaded only now) -> uint8 frames; `cogfun.video.write_mp4` writes them.

Frame counts: `num_frames` must be 4k+1. CogVideoX 1.5 transformers (`patch_size_t: 2`) need a
latent frame count divisible by the temporal patch: like diffusers' pipeline we generate that many
more latent frames (`Geometry.pad`), then drop them before decoding, so the video has exactly the
asked frames. The extra frames are appended at the END and dropped there (diffusers drops at the
front): CogVideoX-Fun's InP models were trained with the known first frame at latent 0, which
must stay first. With a known last frame (`end_image`) the frame count is trimmed to an even latent
count instead (49 -> 45), as CogVideoX-Fun's inpaint pipeline does: the last frame must sit in the
last latent frame, as in training. The default size of a 1.5 model is CogVideoX-Fun's predict
default, 384 x 672 x its config's sample_frames (85).

Run as `python -m cogfun.sampling SPEC.json`, step 1 alone: the short-lived encoder process of
validation during training (T5 never enters the training process).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cogfun import models
from cogfun.buckets import VAE_SPATIAL, VAE_TEMPORAL, latent_frames, patch_t_frames
from cogfun.config import ConfigError

ADAPTER = "cogfun"
#: Default video size of a CogVideoX 1.5 (`patch_size_t`) model: CogVideoX-Fun's predict scripts' sample_size.
PATCH_T_SAMPLE_SIZE = (384, 672)


# ------------------------------------------------------------------ what to generate

@dataclass(frozen=True)
class Request:
    """One video: a prompt and, for the InP models, the known first (and last) frame."""
    prompt: str
    image: str | None = None
    end_image: str | None = None

    @property
    def policy(self) -> str:
        """The mask policy of training this request matches (cogfun.masks)."""
        return "first_last" if self.end_image else ("i2v" if self.image else "t2v")


@dataclass(frozen=True)
class Geometry:
    """Pixel frames / size of the videos, and the latent frames generated beyond them (CogVideoX 1.5)."""
    frames: int
    height: int
    width: int
    pad: int = 0

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.frames)

    @property
    def generated_frames(self) -> int:
        """Pixel frames of the clip the transformer generates (the asked ones + the padding)."""
        return self.frames + VAE_TEMPORAL * self.pad


def geometry(transformer_config: dict, frames: int | None, height: int | None, width: int | None,
             *, flags: tuple[str, str, str] = ("--num_frames", "--height", "--width"), last_frame_known: bool = False,
             notes: list[str] | None = None) -> Geometry:
    """Validated video geometry; None = the model's own sample size: frames from its config's
    sample_frames; height x width its sample_height x 8 by sample_width x 8 (CogVideoX 1.0), or
    CogVideoX-Fun's predict default 384 x 672 for a `patch_size_t` model (CogVideoX 1.5), whose
    config's sample_height/width size its RoPE grid, not a video. `flags`: the options the three
    values came from, named in the messages.

    CogVideoX 1.5 needs a latent frame count divisible by its temporal patch: by default latent
    frames are generated beyond the asked ones and dropped (`pad`). With `last_frame_known`
    (first + last frame given) the count is trimmed instead, as CogVideoX-Fun's inpaint pipeline
    does (49 -> 45 frames): the known last frame must sit in the last latent frame, as in training,
    where every 1.5 video has an even latent count. A line saying so goes to `notes`."""
    p_t = transformer_config.get("patch_size_t") or 1
    default_hw = PATCH_T_SAMPLE_SIZE if p_t > 1 else (transformer_config.get("sample_height", 60) * VAE_SPATIAL,
                                                      transformer_config.get("sample_width", 90) * VAE_SPATIAL)
    frames = transformer_config.get("sample_frames", 49) if frames is None else frames
    height = default_hw[0] if height is None else height
    width = default_hw[1] if width is None else width
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        lo = (max(frames, 1) - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1
        raise ConfigError(f"{flags[0]} {frames}: must be 4k+1 (the VAE packs 4 frames per latent frame "
                          f"after the first): use {lo} or {lo + VAE_TEMPORAL}")
    models.check_position_frames(models.position_frames_of(transformer_config), frames, flags[0])
    unit = VAE_SPATIAL * transformer_config.get("patch_size", 2)
    for flag, value in zip(flags[1:], (height, width)):
        if value < unit or value % unit:
            raise ConfigError(f"{flag} {value}: must be a positive multiple of {unit} "
                              f"(VAE {VAE_SPATIAL}x times the transformer's {unit // VAE_SPATIAL}x{unit // VAE_SPATIAL} patches)")
    if last_frame_known and latent_frames(frames) % p_t:
        trimmed = patch_t_frames(frames, p_t)
        if trimmed < 1 + VAE_TEMPORAL:
            raise ConfigError(f"{flags[0]} {frames}: with a known last frame this model (patch_size_t {p_t}) needs a "
                              f"latent frame count divisible by {p_t}: use at least {1 + VAE_TEMPORAL * (p_t - 1)}")
        if notes is not None:
            notes.append(f"{flags[0]} {frames} -> {trimmed}: with a known last frame, a patch_size_t {p_t} model "
                         f"(CogVideoX 1.5) needs a latent frame count divisible by {p_t}, so the frame count is "
                         f"trimmed as CogVideoX-Fun's inpaint pipeline trims it, keeping the last frame in the last "
                         f"latent frame as in training")
        frames = trimmed
    return Geometry(frames, height, width, pad=-latent_frames(frames) % p_t)


def default_fps(transformer_config: dict) -> int:
    """The frame rate the model generates at: CogVideoX 1.0 8 fps, CogVideoX 1.5 16 fps."""
    return 16 if transformer_config.get("patch_size_t") else 8


def read_list(value: str | None, what: str) -> list[str]:
    """A list flag: a .txt file (one entry per line, blank lines ignored) or entries separated by '|'."""
    if not value:
        return []
    path = Path(value)
    if path.suffix.lower() == ".txt" and path.is_file():
        items = [line.strip() for line in path.read_text().splitlines()]
    else:
        items = [part.strip() for part in value.split("|")]
    items = [item for item in items if item]
    if not items:
        raise ConfigError(f"{what}: {value!r} holds no entries")
    return items


def requests_for(prompts: list[str], images: list[str], end_images: list[str], family: models.TransformerFamily,
                 *, names: tuple[str, str, str] = ("--prompt", "--image", "--end_image")) -> list[Request]:
    """Requests with their images (one for all prompts or one per prompt), checked against the model.
    `names`: the flags of the prompts, images and end images, for the messages."""
    prompt_flag, image_flag, end_flag = names
    if not prompts:
        raise ConfigError(f"{prompt_flag}: no prompt given")
    if (images or end_images) and not family.inpaint:
        c = family.latent_channels
        raise ConfigError(f"{image_flag}: this is a text-to-video model (in_channels {c}); "
                          f"image-to-video needs a CogVideoX-Fun InP model (in_channels {2 * c + 1})")
    if end_images and not images:
        raise ConfigError(f"{end_flag} needs {image_flag} (first and last frame known, as CogVideoX-Fun)")
    for flag, items in ((image_flag, images), (end_flag, end_images)):
        if items and len(items) not in (1, len(prompts)):
            raise ConfigError(f"{flag}: {len(items)} given for {len(prompts)} prompts; give one for all "
                              f"or one per prompt")
    out = []
    for i, prompt in enumerate(prompts):
        image = (images[i] if len(images) > 1 else images[0]) if images else None
        end = (end_images[i] if len(end_images) > 1 else end_images[0]) if end_images else None
        out.append(Request(prompt, image, end))
    return out


def slug(index: int, prompt: str) -> str:
    """`03-a-red-fox-runs`: the file name stem of video `index`."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-")
    return f"{index:02d}-{words or 'video'}"


# ------------------------------------------------------------------ step 1: text + conditioning

def load_image(path: str, height: int, width: int):
    """An image as the first/last frame: EXIF-oriented RGB, resized to cover height x width (aspect
    kept) and center-cropped, as training clips are; float [3, 1, H, W] in [-1, 1]."""
    from cogfun import video
    from cogfun.buckets import cover_crop

    try:
        info = video.probe_image(path)
        resize_hw, crop = cover_crop(info.height, info.width, height, width)
        return video.frames_to_tensor(video.decode_image(path, resize_hw, crop))
    except video.MediaError as exc:
        raise ConfigError(f"{path}: {exc.reason}") from None


def inpaint_condition(vae, request: Request, geo: Geometry, *, reference_noise: bool, generator):
    """The InP conditioning [1, F'', 1 + C, h, w] (mask channel, masked-video latents), F'' = the
    generated latent frames; built as in training, padding latent frames fully masked."""
    import torch

    from cogfun.masks import INFERENCE_NOISE_AUG_STRENGTH, add_reference_noise, mask_channel, masked_clip

    scaling = vae.config.scaling_factor
    channels = vae.config.latent_channels
    h, w = geo.height // VAE_SPATIAL, geo.width // VAE_SPATIAL
    latent = geo.latent_frames + geo.pad
    if request.policy == "t2v":
        return torch.zeros(1, latent, 1 + channels, h, w)
    first = load_image(request.image, geo.height, geo.width)
    clip = first.expand(3, geo.frames, geo.height, geo.width).clone()
    if request.end_image:
        clip[:, -1:] = load_image(request.end_image, geo.height, geo.width)
    masked = masked_clip(clip[None], request.policy)
    if geo.pad:  # the generated extra frames continue the masked part
        masked = torch.cat([masked, torch.full((1, 3, VAE_TEMPORAL * geo.pad, geo.height, geo.width), -1.0)], dim=2)
    if reference_noise:
        masked = add_reference_noise(masked, INFERENCE_NOISE_AUG_STRENGTH, generator=generator)
    masked_latents = models.encode_clips(vae, masked)[0].float().cpu() * scaling
    mask = mask_channel(request.policy, geo.frames, geo.latent_frames, h, w, scaling)
    mask = torch.cat([mask, torch.zeros(1, geo.pad, 1, h, w)], dim=1)
    return torch.cat([mask, masked_latents], dim=2)


def encode_inputs(model: str | Path, requests: list[Request], negative_prompt: str, geo: Geometry, *, dtype,
                  device, seed: int, low_vram: bool = False, vae=None) -> dict:
    """Step 1: {"prompt_embeds.<i>", "negative_prompt_embeds", "condition.<i>" (InP models)} on the CPU.

    T5 is loaded, used and freed here. For an InP model the VAE then encodes the conditioning (pass
    `vae` to reuse a loaded one: it is moved to `device` once T5 is freed; otherwise one is loaded
    and freed).
    """
    import torch

    texts = [r.prompt for r in requests] + [negative_prompt]
    tokenizer, encoder = models.load_text_encoder(model, dtype, device, offload=low_vram)
    embeds = models.encode_prompts(tokenizer, encoder, texts).to("cpu", torch.bfloat16)
    del tokenizer, encoder
    free_memory()
    out = {f"prompt_embeds.{i}": embeds[i].clone() for i in range(len(requests))}
    out["negative_prompt_embeds"] = embeds[-1].clone()
    family = models.transformer_family(model)  # the raw config: diffusers drops add_noise_in_inpaint_model
    if family.inpaint:
        own = vae is None
        vae = models.load_vae(model, dtype, device, slicing=True) if own else vae.to(device)
        for i, request in enumerate(requests):
            generator = torch.Generator().manual_seed(seed)
            out[f"condition.{i}"] = inpaint_condition(vae, request, geo, reference_noise=family.reference_noise,
                                                      generator=generator)
        if own:
            del vae
            free_memory()
    return out


def free_memory() -> None:
    """Give freed memory back: the CUDA cache, or on the CPU glibc's free lists (without malloc_trim
    a training process keeps the VAE decode's freed buffers, hundreds of MB, resident for good)."""
    import ctypes
    import ctypes.util
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


# ------------------------------------------------------------------ step 2: LoRA

def find_lora_file(path: str | Path) -> Path:
    """The LoRA file behind --lora: a file, or in a dir (output dir, checkpoint-<N>/) the diffusers
    file, else the kohya one."""
    from cogfun.lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise ConfigError(f"--lora {path}: no {LORA_WEIGHT_NAME} (or the kohya file) in this folder"
                          + (f"; it holds {', '.join(found[:5])}: pass the file itself" if found else ""))
    raise FileNotFoundError(f"--lora {path}: no such file or folder")


def load_lora(transformer, path: str | Path, scale: float = 1.0) -> dict:
    """Apply a cogfun LoRA file (diffusers, kohya or core-ComfyUI format) to a loaded transformer through
    diffusers/peft, with the file's alpha/rank; `scale` multiplies it (diffusers' set_adapters weight).
    Returns what was loaded (file, format, rank, alpha, scale)."""
    from diffusers import CogVideoXPipeline
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    from cogfun.lora import (COMFY_PREFIX, KOHYA_PREFIX, PREFIX, from_comfyui, from_kohya, load_lora_file,
                             lora_adapter_config)

    file = find_lora_file(path)
    tensors, header = load_lora_file(file)
    kohya = any(k.startswith(KOHYA_PREFIX[:-1]) for k in tensors)
    if kohya or any(k.startswith(COMFY_PREFIX) for k in tensors):
        sd, rank, alpha = (from_kohya(tensors, [n for n, _ in transformer.named_modules() if n]) if kohya
                           else from_comfyui(tensors))
        targets = sorted({k[len(PREFIX) + 1:].rsplit(".lora_", 1)[0] for k in sd})
        metadata = _pack_dict_with_prefix(lora_adapter_config(rank=rank, alpha=alpha, target_modules=targets), PREFIX)
        kind = "kohya" if kohya else "comfyui"
    else:
        # what diffusers' load_lora_weights reads: tensors + the lora_adapter_metadata header (alpha)
        sd, metadata = CogVideoXPipeline.lora_state_dict(str(file.parent), weight_name=file.name,
                                                         return_lora_metadata=True)
        if not metadata:
            raise ConfigError(f"--lora {file}: no lora_adapter_metadata in the file header, so its alpha is "
                              f"unknown (diffusers would silently use alpha = rank)")
        rank, alpha = int(metadata[f"{PREFIX}.r"]), float(metadata[f"{PREFIX}.lora_alpha"])
        kind = "diffusers"
    CogVideoXPipeline.load_lora_into_transformer(sd, transformer=transformer, adapter_name=ADAPTER, metadata=metadata)
    if scale != 1.0:
        transformer.set_adapters([ADAPTER], weights=[scale])
    return {"file": str(file), "format": kind, "rank": rank, "alpha": alpha, "scale": scale}


# ------------------------------------------------------------------ step 3: denoise

def _denoiser_class():
    import torch
    from diffusers.configuration_utils import FrozenDict

    class Denoiser(torch.nn.Module):
        """The transformer as diffusers' CogVideoXPipeline sees a text-to-video one.

        Its config says in_channels = latent channels; every call appends the InP conditioning
        (mask channel + masked-video latents), repeated over the batch (classifier-free guidance
        doubles it, as CogVideoX-Fun does), to the noisy latents. `device` is the execution device
        (where the pipeline puts its latents, also under offload hooks).
        """

        def __init__(self, transformer, condition, device):
            super().__init__()
            self.transformer = transformer
            self.condition = condition
            config = dict(transformer.config)
            config["in_channels"] = transformer.config.out_channels
            self.config = FrozenDict(config)
            self.device = torch.device(device)

        @property
        def dtype(self):
            return next(self.transformer.parameters()).dtype

        def cache_context(self, name):
            return self.transformer.cache_context(name)

        def forward(self, hidden_states, **kwargs):
            if self.condition is not None:
                cond = self.condition.to(hidden_states.device, hidden_states.dtype)
                hidden_states = torch.cat([hidden_states, cond.expand(hidden_states.shape[0], *cond.shape[1:])], dim=2)
            return self.transformer(hidden_states=hidden_states, **kwargs)

    return Denoiser


def denoise(transformer, scheduler, prompt_embeds, negative_prompt_embeds, condition, geo: Geometry, *,
            steps: int, guidance_scale: float, seed: int, device, dtype, progress: bool = True,
            desc: str = "denoise"):
    """Step 3: latents [1, F', C, h, w] (scaled, the padding frames dropped) of one video.

    `transformer`: a CogVideoXTransformer3DModel (LoRA-carrying, possibly FSDP-sharded: then every
    rank must call this the same number of times). `condition`: from `encode_inputs` for an InP
    model (None for a text-to-video one). `scheduler`: the model folder's (`load_sampling_scheduler`);
    a fresh copy is used per call. The noise comes from a generator seeded with `seed` alone.
    """
    import torch
    from diffusers import CogVideoXPipeline

    model = _denoiser_class()(transformer, condition, device)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=type(scheduler).from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=not progress, desc=desc, leave=False, dynamic_ncols=True)
    gen_device = device if torch.device(device).type == "cuda" else "cpu"
    latents = pipe(prompt_embeds=prompt_embeds[None].to(device, dtype),
                   negative_prompt_embeds=negative_prompt_embeds[None].to(device, dtype),
                   num_frames=geo.generated_frames, height=geo.height, width=geo.width,
                   num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=torch.Generator(gen_device).manual_seed(seed),
                   output_type="latent", return_dict=False)[0]
    return latents[:, :geo.latent_frames]


# ------------------------------------------------------------------ step 4: decode

def decode(vae, latents):
    """Step 4: latents [1, F', C, h, w] -> uint8 frames [4 (F' - 1) + 1, H, W, 3] (diffusers' decode + postprocess).

    diffusers' CogVideoX VAE decodes latent frames in chunks of two after an odd first chunk; for
    an even F' its first chunk is even and is upsampled as if no frame were the first, giving 4 F'
    frames. Then the last latent frame is decoded twice and the 4 frames it adds are dropped:
    4 (F' - 1) + 1 frames, frame 0 from latent 0 and frames 4k-3..4k from latent k, as
    CogVideoX-Fun's own decoder (first latent alone) gives them.
    """
    import numpy as np
    import torch
    from diffusers import CogVideoXPipeline

    n = latents.shape[1]
    if n % 2 == 0:
        latents = torch.cat([latents, latents[:, -1:]], dim=1)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=None, scheduler=None)
    with torch.no_grad():
        video = pipe.decode_latents(latents.to(vae.device, vae.dtype))[:, :, :VAE_TEMPORAL * (n - 1) + 1]
    frames = pipe.video_processor.postprocess_video(video.float(), output_type="np")[0]
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ the short-lived encoder process

def spec_fingerprint(spec: dict) -> str:
    """What the encoded inputs depend on: the spec (device and output paths aside) and the
    (path, size, mtime) of every T5 / tokenizer / VAE file."""
    from cogfun.shards import digest

    stamps = []
    for part in ("text_encoder", "tokenizer", "vae"):
        folder = models.component_dir(spec["model"], part)
        for p in sorted(folder.iterdir()):
            if p.is_file():
                stamps.append([str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns])
    images = []
    for r in spec["requests"]:
        for img in (r.get("image"), r.get("end_image")):
            if img:
                st = Path(img).stat()
                images.append([str(Path(img).resolve()), st.st_size, st.st_mtime_ns])
    kept = {k: v for k, v in spec.items() if k not in ("device", "out")}
    return digest({"spec": kept, "weights": stamps, "images": images})


def run_spec(spec: dict) -> None:
    """Encode what `spec` asks for into spec["out"] (safetensors, with the user's umask) + <out>.json."""
    import torch

    from cogfun.shards import save_tensors, write_json_atomic

    geo = Geometry(**spec["geometry"])
    requests = [Request(**r) for r in spec["requests"]]
    tensors = encode_inputs(spec["model"], requests, spec["negative_prompt"], geo,
                            dtype=models.dtype_of(spec["mixed_precision"]), device=torch.device(spec["device"]),
                            seed=spec["seed"], low_vram=spec.get("low_vram", False))
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, out)
    write_json_atomic(out.with_suffix(".json"), {"fingerprint": spec["fingerprint"], "spec": spec})


def make_spec(model: str | Path, requests: list[Request], negative_prompt: str, geo: Geometry, *, seed: int,
              mixed_precision: str, device: str, out: Path, low_vram: bool = False) -> dict:
    spec = {"model": str(Path(model).resolve()), "requests": [asdict(r) for r in requests],
            "negative_prompt": negative_prompt, "geometry": asdict(geo), "seed": seed,
            "mixed_precision": mixed_precision, "low_vram": low_vram, "device": device, "out": str(out)}
    spec["fingerprint"] = spec_fingerprint(spec)
    return spec


def cached_inputs(spec: dict) -> dict | None:
    """The tensors of a previous run of the same spec (same prompts, images, size, T5/VAE weights), or None."""
    from safetensors.torch import load_file

    out = Path(spec["out"])
    meta = out.with_suffix(".json")
    if not (out.is_file() and meta.is_file()):
        return None
    if json.loads(meta.read_text()).get("fingerprint") != spec["fingerprint"]:
        return None
    return load_file(str(out))


def encode_in_subprocess(spec: dict, *, timeout: float | None = None) -> dict:
    """Run step 1 in a short-lived process (`python -m cogfun.sampling`): its T5 and VAE leave with it.

    The launcher's distributed variables are removed from its environment: it is a plain single
    process on `spec["device"]`. Returns the tensors it wrote.
    """
    import subprocess

    from safetensors.torch import load_file

    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_file = out.with_name(out.stem + ".spec.json")
    spec_file.write_text(json.dumps(spec, indent=2))
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID") and not k.startswith("ACCELERATE_")}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "cogfun.sampling", str(spec_file)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"encoding the validation prompts failed (exit {proc.returncode}; "
                           f"spec {spec_file}):\n{proc.stderr[-4000:]}")
    return load_file(str(out))


if __name__ == "__main__":
    run_spec(json.loads(Path(sys.argv[1]).read_text()))
