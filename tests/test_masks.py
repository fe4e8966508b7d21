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


def test_cached_noise_response_is_exact_for_a_linear_encoder():
    """encode_conditioning + conditioning reproduce encode(masked + s * sigma * n) exactly when the
    encoder is linear: the cached design's only approximation is the VAE's linearity in sigma."""
    from cogfun import masks

    torch.manual_seed(0)
    weight = torch.randn(16, 3)

    def encode(px):  # a linear "VAE": [B, 3, F, H, W] -> [B, F', 16, H/8, W/8], causal 4x in time
        pooled = torch.nn.functional.avg_pool3d(torch.cat([px[:, :, :1]] * 4 + [px[:, :, 1:]], dim=2), (4, 8, 8))
        return torch.einsum("oc,bcfhw->bfohw", weight, pooled)

    clip = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    keys = ["a_v0", "b_v0"]
    cached = masks.encode_conditioning(encode, clip, ["i2v", "first_last"], clean=encode(clip), keys=keys, seed=7,
                                       reference_noise=True)
    assert sorted(cached) == ["masked_latents.first_last", "masked_latents.i2v",
                              "masked_noise_response.first_last", "masked_noise_response.i2v"]
    tensors = {"latent_mean": encode(clip), **cached}
    for b, key in enumerate(keys):
        for policy in ("i2v", "first_last"):
            masked = masks.masked_clip(clip[b:b + 1], policy)
            n = masks.noise_pattern(masked.shape[1:], 7, key, policy)[None]
            for scale in (0.4, -1.7):   # s * sigma / sigma0
                want = encode(masks.add_reference_noise(masked, scale * masks.REFERENCE_NOISE_SIGMA0, noise=n))
                got = masks.conditioning(policy, tensors, b, frames=9, keep=3, scaling=0.7, noise_scale=scale)
                torch.testing.assert_close(got[:, :, 1:], want * 0.7, atol=1e-5, rtol=1e-5)
                assert torch.equal(got[:, :, :1], masks.mask_channel(policy, 9, 3, 2, 2, 0.7))
    # the pattern is seeded by (seed, key, policy) only: the same alone as in a batch
    alone = masks.encode_conditioning(encode, clip[1:], ["i2v"], clean=encode(clip[1:]), keys=keys[1:], seed=7,
                                      reference_noise=True)
    assert torch.equal(alone["masked_noise_response.i2v"][0], cached["masked_noise_response.i2v"][1])
    plain = masks.encode_conditioning(encode, clip, ["i2v"], clean=encode(clip), keys=keys, seed=7,
                                      reference_noise=False)
    assert list(plain) == ["masked_latents.i2v"]
    assert not masks.conditioning("t2v", tensors, 0, frames=9, keep=2, scaling=0.7).any()
