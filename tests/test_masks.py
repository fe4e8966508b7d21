"""Mask policies and CogVideoX-Fun's reference-video noise."""

import torch

from cogfun.masks import add_reference_noise, draw_reference_sigma, masked_clip


def test_reference_noise_only_on_known_pixels_with_per_sample_sigma():
    torch.manual_seed(0)
    clip = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    masked = masked_clip(clip, "first_last")
    out = add_reference_noise(masked, torch.tensor([0.02, 0.2]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :, 1:-1], masked[:, :, 1:-1])          # masked frames stay exactly -1
    delta = (out - masked)[:, :, [0, -1]]
    assert abs(delta[0].std().item() - 0.02) < 0.002 and abs(delta[1].std().item() - 0.2) < 0.02
    again = add_reference_noise(masked, torch.tensor([0.02, 0.2]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)                                      # seeded: reproducible


def test_training_sigma_is_lognormal_minus3_half():
    log_sigma = draw_reference_sigma(200_000, generator=torch.Generator().manual_seed(0)).log()
    assert abs(log_sigma.mean().item() + 3.0) < 0.01 and abs(log_sigma.std().item() - 0.5) < 0.01
