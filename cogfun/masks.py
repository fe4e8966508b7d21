"""Inpaint / i2v mask policies.

CogVideoX-Fun draws a random pixel mask every step and VAE-encodes the masked clip every step.
We cache the masked-clip latents for a fixed set of temporal policies instead (DESIGN §3) and
rebuild the 1-channel mask at train time exactly as CogVideoX-Fun does (`resize_mask`: first
frame on its own, the rest trilinearly resized to the remaining latent frames), multiplied by
the VAE scaling factor like the masked latents.

Policies (pixel frames known to the model; everything else is masked to -1 before encoding):
  t2v         nothing known; mask channel and masked latents are all zero (not cached)
  i2v         the first frame
  first_k     the first 1 + 4*((F'-1)//2) frames (the first half of the latent groups)
  first_last  the first and the last frame

Reference-video noise (`add_noise_in_inpaint_model: true`, CogVideoX-Fun V1.1 / V1.5 InP): its
trainer adds N(0, sigma^2) to the known pixels before every masked-clip encode, sigma =
exp(N(-3, 0.5)) per sample and step. cogfun caches, per policy, the clean masked-clip latents m0
AND the latent response to one seeded noise pattern n at sigma0 = exp(-3):
d = E(masked + sigma0 * n) - E(masked). Each step draws sigma (the exact training distribution)
and a sign s = +-1 per sample and feeds m0 + s * (sigma / sigma0) * d: the encode of
masked + s * sigma * n, linearised in sigma around the clean clip. +-n are equally likely noise
draws, so the first-order effect of the noise cancels in expectation as it does with fresh noise,
and the conditioning's spread follows sigma step by step. Cost: one more VAE encode and one more
cached latent per policy. The measured closeness to fresh per-step noise is in bench/README.md
(`bench/reference_noise.py`).

Precompute calls `encode_conditioning`, train calls `conditioning`; both build on `masked_clip`
and `mask_channel`, where a policy is defined, so a new policy slots in there.
"""

from __future__ import annotations

import hashlib
import math

# Policies whose conditioning stays valid when a latent-frame prefix is kept (random_frame_crop):
PREFIX_SAFE = ("t2v", "i2v", "first_k")

# CogVideoX-Fun's reference-video noise (`add_noise_in_inpaint_model: true` in a transformer config):
# in training, sigma = exp(N(-3, 0.5)) per sample; at inference a fixed `noise_aug_strength`.
REFERENCE_NOISE_LOG_MEAN = -3.0
REFERENCE_NOISE_LOG_STD = 0.5
INFERENCE_NOISE_AUG_STRENGTH = 0.0563
# The cached noise response is taken at the median training sigma.
REFERENCE_NOISE_SIGMA0 = math.exp(REFERENCE_NOISE_LOG_MEAN)
MASKED = "masked_latents"          # cached tensor names: f"{MASKED}.{policy}", f"{NOISE_RESPONSE}.{policy}"
NOISE_RESPONSE = "masked_noise_response"


def reference_noise_design() -> dict:
    """The cached reference-noise design, as recorded in the manifest and the precompute fingerprint."""
    return {"design": "linear-response", "sigma0": REFERENCE_NOISE_SIGMA0,
            "sigma_log_mean": REFERENCE_NOISE_LOG_MEAN, "sigma_log_std": REFERENCE_NOISE_LOG_STD,
            "patterns_per_policy": 1, "pattern_seed": "sha256(seed:sample key:policy)",
            "tensors": f"{MASKED}.<policy> (clean), {NOISE_RESPONSE}.<policy> (response at sigma0)"}


def known_frames(policy: str, frames: int) -> list[bool]:
    """Per pixel frame: is it given to the model (True) or masked (False)?"""
    known = [False] * frames
    if policy == "t2v":
        return known
    if policy == "i2v":
        known[0] = True
    elif policy == "first_k":
        latent = (frames - 1) // 4 + 1
        k = 1 + 4 * ((latent - 1) // 2)
        for i in range(k):
            known[i] = True
    elif policy == "first_last":
        known[0] = True
        known[-1] = True
    else:
        raise ValueError(f"unknown mask policy {policy!r}")
    return known


def masked_clip(pixels, policy: str):
    """pixels [..., 3, F, H, W] in [-1, 1] -> the same clip with masked frames set to -1."""
    import torch

    keep = torch.tensor(known_frames(policy, pixels.shape[-3]), dtype=torch.bool, device=pixels.device)
    keep = keep.view(*([1] * (pixels.dim() - 3)), -1, 1, 1)
    return torch.where(keep, pixels, torch.full_like(pixels, -1.0))


def draw_reference_sigma(batch: int, *, generator=None, device=None):
    """Per-sample training sigma of the reference noise: exp(N(-3, 0.5)), shape [batch]."""
    import torch

    z = torch.randn(batch, generator=generator, device=device)
    return torch.exp(REFERENCE_NOISE_LOG_MEAN + REFERENCE_NOISE_LOG_STD * z)


def add_reference_noise(pixels, sigma, *, generator=None, noise=None):
    """CogVideoX-Fun's `add_noise_to_reference_video`: masked clip [B, 3, F, H, W] (masked pixels are
    exactly -1) + N(0, sigma_b^2) noise on the known pixels only; masked pixels stay -1.

    `sigma`: a float or a [B] tensor (one value per sample). `noise`: the N(0, 1) draw to use
    (shape of `pixels`); drawn from `generator` when not given.
    """
    import torch

    sigma = torch.as_tensor(sigma, dtype=pixels.dtype, device=pixels.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(pixels.shape[0])
    if noise is None:
        noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
    noise = noise.to(pixels) * sigma.view(-1, *([1] * (pixels.dim() - 1)))
    return pixels + torch.where(pixels == -1, torch.zeros_like(noise), noise)


def is_identity(policy: str, frames: int) -> bool:
    """True when the policy masks nothing (the masked clip is the clip itself)."""
    return all(known_frames(policy, frames))


def resize_mask(mask, latent_shape):
    """CogVideoX-Fun's resize_mask: mask [B, 1, F, H, W] -> [B, 1, F', h, w] (first frame alone)."""
    import torch
    import torch.nn.functional as F

    f_lat, h, w = latent_shape[-3:]
    first = F.interpolate(mask[:, :, :1], size=(1, h, w), mode="trilinear", align_corners=False)
    if f_lat == 1:
        return first
    rest = F.interpolate(mask[:, :, 1:], size=(f_lat - 1, h, w), mode="trilinear", align_corners=False)
    return torch.cat([first, rest], dim=2)


def mask_channel(policy: str, frames: int, f_lat: int, h: int, w: int, scaling_factor: float,
                 *, dtype=None, device=None):
    """The conditioning mask channel [1, F', 1, h, w] (transformer layout): 1 = known, x scaling.

    `frames` is the pixel frame count the policy was applied to, F' the latent frames kept.
    """
    import torch

    known = torch.tensor(known_frames(policy, frames), dtype=torch.float32, device=device)
    pixel = known.view(1, 1, frames, 1, 1).expand(1, 1, frames, 8, 8)  # temporal-only masks
    full_lat = (frames - 1) // 4 + 1
    small = resize_mask(pixel, (full_lat, 1, 1))[:, :, :f_lat]
    out = small.expand(1, 1, f_lat, h, w).permute(0, 2, 1, 3, 4) * scaling_factor
    return out.to(dtype=dtype or torch.float32)


# ---------------------------------------------------------------- precompute: what is cached

def noise_pattern(shape, seed: int, key: str, policy: str):
    """The seeded N(0, 1) pixel noise pattern of one sample and policy (CPU, float32): the same on
    any rank, batch composition or device."""
    import torch

    digest = hashlib.sha256(f"{seed}:{key}:{policy}".encode()).hexdigest()
    gen = torch.Generator().manual_seed(int(digest[:15], 16))
    return torch.randn(shape, generator=gen)


def encode_conditioning(encode, pixels, policies: list[str], *, clean, keys: list[str], seed: int,
                        reference_noise: bool) -> dict:
    """The cached conditioning of one bucket batch: {tensor name: [B, F', C, h, w]}.

    `encode`: pixels [B, 3, F, H, W] -> posterior mean [B, F', C, h, w] (the VAE); `pixels` on the
    CPU in [-1, 1]; `clean`: the clips' own means (reused when a policy masks nothing). Per policy,
    `masked_latents.<policy>` = the masked clip's mean; with `reference_noise`, also
    `masked_noise_response.<policy>` = encode(masked + sigma0 * n) - encode(masked), n the seeded
    `noise_pattern` of each sample, noise on known pixels only (float32 difference).
    """
    import torch

    out = {}
    frames = pixels.shape[2]
    for policy in policies:
        masked = masked_clip(pixels, policy)
        mean = clean if is_identity(policy, frames) else encode(masked)  # same input, same encode
        out[f"{MASKED}.{policy}"] = mean
        if reference_noise:
            noise = torch.stack([noise_pattern(masked.shape[1:], seed, k, policy) for k in keys])
            noisy = add_reference_noise(masked, REFERENCE_NOISE_SIGMA0, noise=noise)
            out[f"{NOISE_RESPONSE}.{policy}"] = encode(noisy).float() - mean.float()
    return out


# ---------------------------------------------------------------- train: what the transformer sees

def conditioning(policy: str, tensors: dict, b: int, *, frames: int, keep: int, scaling: float,
                 noise_scale=None, device=None):
    """Sample b's conditioning [1, keep, 1 + C, h, w] (mask channel + masked latents, both x scaling).

    `tensors`: the batch's cached tensors [B, F', ...]; `frames`: the pixel frames the policy was
    applied to; `keep`: latent frames kept (random_frame_crop prefix); `noise_scale`: s * sigma /
    sigma0 of this sample's reference noise (None: the model has none), applied to the cached
    noise response. `t2v` is all zeros.
    """
    import torch

    latents = tensors["latent_mean"]
    channels, h, w = latents.shape[-3:]
    if policy == "t2v":
        return torch.zeros(1, keep, 1 + channels, h, w, device=device)
    masked = tensors[f"{MASKED}.{policy}"][b:b + 1, :keep].float()
    if noise_scale is not None:
        masked = masked + noise_scale * tensors[f"{NOISE_RESPONSE}.{policy}"][b:b + 1, :keep].float()
    mask = mask_channel(policy, frames, keep, h, w, scaling, device=device)
    return torch.cat([mask, masked * scaling], dim=2)
