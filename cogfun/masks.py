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
"""

from __future__ import annotations

# Policies whose conditioning stays valid when a latent-frame prefix is kept (random_frame_crop):
PREFIX_SAFE = ("t2v", "i2v", "first_k")

# CogVideoX-Fun's reference-video noise (`add_noise_in_inpaint_model: true` in a transformer config):
# in training, sigma = exp(N(-3, 0.5)) per sample; at inference a fixed `noise_aug_strength`.
REFERENCE_NOISE_LOG_MEAN = -3.0
REFERENCE_NOISE_LOG_STD = 0.5
INFERENCE_NOISE_AUG_STRENGTH = 0.0563


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


def add_reference_noise(pixels, sigma, *, generator=None):
    """CogVideoX-Fun's `add_noise_to_reference_video`: masked clip [B, 3, F, H, W] (masked pixels are
    exactly -1) + N(0, sigma_b^2) noise on the known pixels only; masked pixels stay -1.

    `sigma`: a float or a [B] tensor (one value per sample).
    """
    import torch

    sigma = torch.as_tensor(sigma, dtype=pixels.dtype, device=pixels.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(pixels.shape[0])
    noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
    noise = noise * sigma.view(-1, *([1] * (pixels.dim() - 1)))
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


def conditioning(policy: str, tensors: dict, b: int, *, frames: int, keep: int, scaling: float, device=None):
    """Sample b's conditioning [1, keep, 1 + C, h, w] (mask channel + cached masked latents, both x scaling).

    `tensors`: the batch's cached tensors [B, F', ...]; `frames`: the pixel frames the policy was
    applied to; `keep`: latent frames kept. `t2v` is all zeros.
    """
    import torch

    latents = tensors["latent_mean"]
    channels, h, w = latents.shape[-3:]
    if policy == "t2v":
        return torch.zeros(1, keep, 1 + channels, h, w, device=device)
    masked = tensors[f"masked_latents.{policy}"][b:b + 1, :keep].float()
    mask = mask_channel(policy, frames, keep, h, w, scaling, device=device)
    return torch.cat([mask, masked * scaling], dim=2)
