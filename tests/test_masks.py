"""Mask policies: CogVideoX-Fun's mask distribution, covered and rebuilt exactly; reference-video noise."""

import random

import pytest
import torch
import torch.nn.functional as F

from cogfun import masks
from cogfun.masks import add_reference_noise, draw_reference_sigma, masked_clip

# ------------------------------------------------------------------ the reference, written from its description
# get_random_mask (VideoX-Fun): mask 1 = to generate. Videos: 0 block 5 %, 1 all 20 %, 2 first k=1..4 known
# 20 %, 3 first+last k=1..4 known 20 %, 4 block in a frame range 5 %, 5 per-pixel noise 5 %, 6 small blocks in
# random frames 5 %, 7 ellipse in frame 0 10 %, 8 circle in frame 0 5 %, 9 random whole frames 5 %.
# Images: block 20 %, all 70 %, ellipse 5 %, circle 5 %.
REF_VIDEO = {"block": .05, "all": .20, "first": .20, "first_last": .20, "block_range": .05, "pixel_noise": .05,
             "small_blocks": .05, "ellipse": .10, "circle": .05, "random_frames": .05}
REF_IMAGE = {"block": .20, "all": .70, "ellipse": .05, "circle": .05}


def reference_draw(rng: random.Random, frames: int) -> tuple:
    """One reference draw's signature: (family, k) with k the known frames at each end (else None)."""
    table = REF_IMAGE if frames == 1 else REF_VIDEO
    family = rng.choices(list(table), weights=list(table.values()))[0]
    k = rng.randint(1, 4) if family in ("first", "first_last") else None
    return family, k


def signature(policy: str, geometry: dict) -> tuple:
    """What reference draw a cached policy's geometry is."""
    if policy in ("i2v", "first_n"):
        return "first", geometry.get("k", 1)
    if policy in ("first_last", "first_last_n"):
        return "first_last", geometry.get("k", 1)
    if policy == "ellipse":
        return geometry["shape"], None
    return policy, None


def cached_support(policies, frames: int) -> dict[tuple, set[str]]:
    """Reference draw signature -> the cached policies whose stored geometries produce it."""
    support: dict[tuple, set[str]] = {("all", None): {"t2v"}}
    for i in range(300):
        for policy, geometry in masks.draw_geometries(policies, frames, 64, 96, seed=1, key=f"k{i}_v0").items():
            support.setdefault(signature(policy, geometry), set()).add(policy)
    return support


def sampled_coverage(policies, frames: int, n: int = 100_000) -> tuple[float, dict]:
    """Share of reference draws some cached policy reproduces, and the share each policy takes (the most
    specific policy first: i2v / first_last take k = 1 when cached)."""
    rng = random.Random(0)
    support = cached_support(policies, frames)
    taken: dict[str, int] = {}
    covered = 0
    for _ in range(n):
        sig = reference_draw(rng, frames)
        owners = support.get(sig, set())
        if owners:
            covered += 1
            owner = sorted(owners, key=lambda p: p in ("first_n", "first_last_n"))[0]
            taken[owner] = taken.get(owner, 0) + 1
    return covered / n, {p: c / n for p, c in taken.items()}


def test_default_policies_cover_80_percent_of_the_reference_for_videos_and_images():
    before = ["i2v", "first_last"]                       # cogfun's cached set before issue 13
    after = list(masks.DEFAULT_POLICIES)
    video_before, _ = sampled_coverage(before, 49)
    video_after, video_taken = sampled_coverage(after, 49)
    image_before, _ = sampled_coverage(before, 1)
    image_after, image_taken = sampled_coverage(after, 1)
    assert video_before < 0.32 and image_before < 0.72       # 30 % / 70 % (t2v alone for images)
    assert video_after >= 0.83 and image_after >= 0.99       # 85 % / 100 %
    assert abs(video_after - masks.coverage(after, 49)) < 0.005 and masks.coverage(after, 1) == 1.0
    # default draw weights are the reference's mass of what each policy stands for
    for frames, taken in ((49, video_taken), (1, image_taken)):
        weights = masks.default_weights(after, frames)
        assert set(weights) == set(taken), frames
        for policy, share in taken.items():
            assert abs(weights[policy] - share) < 0.005, (frames, policy, weights[policy], share)
    assert masks.coverage(masks.POLICIES, 49) == pytest.approx(1.0)


def test_geometries_follow_the_reference_conditional_draws():
    """Within a policy, the stored geometry is drawn as the reference draws it: first_n takes k = 1..4
    uniformly (2..4 when i2v is cached too), ellipse is an ellipse 2/3 and a circle 1/3 of the time
    (half and half for images); random_frames never hides all or nothing; images cache block + ellipse."""
    def counts(policies, policy, frames, what):
        out: dict = {}
        for i in range(1200):
            g = masks.draw_geometries(policies, frames, 64, 96, seed=3, key=f"c{i}_v0")[policy]
            out[what(g)] = out.get(what(g), 0) + 1
        return out

    ks = counts(["first_n"], "first_n", 49, lambda g: g["k"])
    assert sorted(ks) == [1, 2, 3, 4] and min(ks.values()) > 250
    assert sorted(counts(["i2v", "first_n"], "first_n", 49, lambda g: g["k"])) == [2, 3, 4]
    assert sorted(counts(["first_last_n"], "first_last_n", 5, lambda g: g["k"])) == [1, 2]  # 2k < 5 frames
    shapes = counts(["ellipse"], "ellipse", 49, lambda g: g["shape"])
    assert 0.6 < shapes["ellipse"] / 1200 < 0.73
    shapes = counts(["ellipse"], "ellipse", 1, lambda g: g["shape"])
    assert 0.43 < shapes["ellipse"] / 1200 < 0.57
    hidden = counts(["random_frames"], "random_frames", 5, lambda g: sum(g["masked"]))
    assert set(hidden) == {1, 2, 3, 4}
    assert masks.sample_policies(masks.POLICIES, 1) == ["block", "ellipse"]
    assert masks.draw_geometries(["i2v", "first_last"], 1, 64, 64, seed=0, key="x_v0") == {}


# ------------------------------------------------------------------ the reference way of building a mask

def reference_mask(policy: str, g: dict, f: int, h: int, w: int) -> torch.Tensor:
    """The mask get_random_mask builds for these parameters (its own statements, our parameters)."""
    mask = torch.zeros((f, 1, h, w), dtype=torch.uint8)
    if policy in ("i2v", "first_n"):
        mask[g.get("k", 1):, :, :, :] = 1
    elif policy in ("first_last", "first_last_n"):
        k = g.get("k", 1)
        mask[k:-k, :, :, :] = 1
    elif policy == "random_frames":
        for idx in range(f):
            if g["masked"][idx]:
                mask[idx, :, :, :] = 1
    elif policy == "block":
        mask[:, :, g["y0"]:g["y1"], g["x0"]:g["x1"]] = 1
    elif policy == "block_range":
        mask[g["t0"]:g["t1"], :, g["y0"]:g["y1"], g["x0"]:g["x1"]] = 1
    elif policy == "pixel_noise":
        mask = torch.randint(0, 2, (f, 1, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(g["seed"]))
    elif policy == "small_blocks":
        for i, y0, y1, x0, x1 in g["blocks"]:
            mask[i, 0, y0:y1, x0:x1] = 1
    elif policy == "ellipse":
        y_grid, x_grid = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                        indexing="ij")
        if g["shape"] == "circle":
            mask[0, 0, :, :] = ((y_grid - g["cy"]) ** 2 + (x_grid - g["cx"]) ** 2 < g["r"] ** 2).to(torch.uint8)
        else:
            mask[0, 0, :, :] = (((y_grid - g["cy"]) ** 2) / (g["b"] ** 2)
                                + ((x_grid - g["cx"]) ** 2) / (g["a"] ** 2) < 1).to(torch.uint8)
    elif policy == "first_k":
        mask[1 + 4 * (((f - 1) // 4) // 2):] = 1
    return mask


def reference_resize(mask: torch.Tensor, latent_size) -> torch.Tensor:
    """train_lora.py's resize_mask (process_first_frame_only) on [B, C, F, H, W]."""
    target = list(latent_size)
    first = F.interpolate(mask[:, :, 0:1], size=[1] + target[1:], mode="trilinear", align_corners=False)
    if target[0] - 1 == 0:
        return first
    rest = F.interpolate(mask[:, :, 1:], size=[target[0] - 1] + target[1:], mode="trilinear", align_corners=False)
    return torch.cat([first, rest], dim=2)


@pytest.mark.parametrize("policy", masks.POLICIES)
def test_mask_channel_equals_the_reference_resize_for_the_same_geometry(policy):
    """For every policy and many seeded geometries, on a video (also frame-cropped: the reference cuts the
    pixel mask to the kept frames, then resizes) and an image: the rebuilt mask channel is bit-equal to
    resize_mask(1 - mask) x scaling of the reference's mask, and the masked clip to pixels*(1-m) - m."""
    scaling = 0.7
    pixels = torch.rand(3, 17, 48, 80) * 2 - 1
    for frames in (17, 1):
        h, w = 48 // 8, 80 // 8
        for i in range(8):
            geometry = masks.draw_geometries([policy], frames, 48, 80, seed=i, key=f"s{i}_v0").get(policy)
            if geometry is None:
                assert frames == 1 and policy not in ("block", "ellipse")   # an image caches no copy
                continue
            ref = reference_mask(policy, geometry, frames, 48, 80)
            assert torch.equal(masks.pixel_mask(policy, geometry, frames, 48, 80), ref)
            clip = pixels[:, :frames]
            want_px = clip * (1 - ref.permute(1, 0, 2, 3)) + torch.ones_like(clip) * -1 * ref.permute(1, 0, 2, 3)
            assert torch.equal(masked_clip(clip[None], policy, geometry)[0], want_px)
            f_lat = (frames - 1) // 4 + 1
            for keep in sorted({f_lat, max(1, f_lat - 2)}):
                px = (keep - 1) * 4 + 1
                known = 1 - ref[:px].permute(1, 0, 2, 3)[None].float()   # "b f c h w -> b c f h w", 1 - mask
                want = reference_resize(known, (keep, h, w)) * scaling
                got = masks.mask_channel(policy, frames, keep, h, w, scaling, geometry=geometry)
                assert torch.equal(got, want.permute(0, 2, 1, 3, 4)), (policy, frames, keep, i)


def test_parse_weights():
    assert masks.parse_weights("i2v=0.6, t2v=0.1") == {"i2v": 0.6, "t2v": 0.1}
    for bad in ("i2v", "bogus=1", "i2v=x", "i2v=-1"):
        with pytest.raises(ValueError, match="mask_policy_weights"):
            masks.parse_weights(bad)
    assert masks.weights_for(["i2v", "first_n"], 49, {"i2v": 0.6}) == {"t2v": 0.2, "i2v": 0.6, "first_n": pytest.approx(0.15)}


# ------------------------------------------------------------------ reference-video noise

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
    torch.manual_seed(0)
    weight = torch.randn(16, 3)

    def encode(px):  # a linear "VAE": [B, 3, F, H, W] -> [B, F', 16, H/8, W/8], causal 4x in time
        pooled = torch.nn.functional.avg_pool3d(torch.cat([px[:, :, :1]] * 4 + [px[:, :, 1:]], dim=2), (4, 8, 8))
        return torch.einsum("oc,bcfhw->bfohw", weight, pooled)

    clip = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    keys = ["a_v0", "b_v0"]
    policies = ["i2v", "first_last", "block"]
    geometries = [masks.draw_geometries(policies, 9, 16, 16, seed=7, key=k) for k in keys]
    cached = masks.encode_conditioning(encode, clip, geometries, keys=keys, seed=7, reference_noise=True)
    assert sorted(cached) == sorted(f"{name}.{p}" for p in policies for name in (masks.MASKED, masks.NOISE_RESPONSE))
    tensors = {"latent_mean": encode(clip), **cached}
    for b, key in enumerate(keys):
        for policy in policies:
            masked = masks.masked_clip(clip[b:b + 1], policy, geometries[b][policy])
            n = masks.noise_pattern(masked.shape[1:], 7, key, policy)[None]
            for scale in (0.4, -1.7):   # s * sigma / sigma0
                want = encode(masks.add_reference_noise(masked, scale * masks.REFERENCE_NOISE_SIGMA0, noise=n))
                got = masks.conditioning(policy, tensors, b, frames=9, keep=3, scaling=0.7, noise_scale=scale,
                                         geometry=geometries[b][policy])
                torch.testing.assert_close(got[:, :, 1:], want * 0.7, atol=1e-5, rtol=1e-5)
                assert torch.equal(got[:, :, :1], masks.mask_channel(policy, 9, 3, 2, 2, 0.7,
                                                                     geometry=geometries[b][policy]))
    # the pattern is seeded by (seed, key, policy) only: the same alone as in a batch
    alone = masks.encode_conditioning(encode, clip[1:], geometries[1:], keys=keys[1:], seed=7, reference_noise=True)
    assert torch.equal(alone["masked_noise_response.i2v"][0], cached["masked_noise_response.i2v"][1])
    plain = masks.encode_conditioning(encode, clip, [{"i2v": {}}] * 2, keys=keys, seed=7, reference_noise=False)
    assert list(plain) == ["masked_latents.i2v"]
    assert not masks.conditioning("t2v", tensors, 0, frames=9, keep=2, scaling=0.7).any()
    black = {"latent_mean": tensors["latent_mean"], masks.BLACK_LATENTS: encode(masks.black_clip(9, 16, 16))}
    got = masks.conditioning(masks.BLACK, black, 1, frames=9, keep=2, scaling=0.7)
    assert not got[:, :, :1].any() and torch.equal(got[:, :, 1:], black[masks.BLACK_LATENTS][:, :2] * 0.7)


# ------------------------------------------------------------------ train-time draws

def drawn_policies(frames: int, cfg, calls: int = 150, bsz: int = 8) -> list[str]:
    """The policies batch_inputs draws for a bucket of `frames`-frame samples, read back from the
    conditioning (each cached policy's masked latents hold its own constant; black clip latents 100)."""
    from diffusers import DDPMScheduler

    from cogfun.stages.train import batch_inputs

    policies = list(masks.DEFAULT_POLICIES)
    f_lat = (frames - 1) // 4 + 1
    cached = masks.sample_policies(policies, frames)
    tensors = {"latent_mean": torch.zeros(bsz, f_lat, 16, 4, 4), "latent_logvar": torch.zeros(bsz, f_lat, 16, 4, 4),
               "prompt_embeds": torch.zeros(bsz, 226, 8)}
    value = {}
    for i, p in enumerate(cached):
        tensors[f"{masks.MASKED}.{p}"] = torch.full((bsz, f_lat, 16, 4, 4), float(i + 1))
        value[float(i + 1)] = p
    value[100.0], value[0.0] = masks.BLACK, "t2v"
    metas = [{"frames": frames, "bucket": f"32x32x{frames}",
              "masks": masks.draw_geometries(policies, frames, 32, 32, seed=0, key=f"k{b}_v0")} for b in range(bsz)]
    black = {f"32x32x{frames}": torch.full((f_lat, 16, 4, 4), 100.0)}
    out = []
    for call in range(calls):
        batch = {"tensors": tensors, "metas": metas, "batch_id": call}
        model_in = batch_inputs(batch, epoch=0, cfg=cfg, scheduler=DDPMScheduler(), scaling=1.0, policies=policies,
                                null_prompt=torch.zeros(226, 8), device="cpu", dtype=torch.float32, black=black)[0]
        out += [value[round(float(model_in[b, 0, 17, 0, 0]), 3)] for b in range(bsz)]
    return out


def test_training_draws_the_reference_weights_and_the_black_clip():
    from collections import Counter

    from cogfun.config import TrainConfig
    from cogfun.stages.train import mask_weights

    cfg = TrainConfig(train_mode="inpaint", caption_dropout=0.0, seed=1)
    for frames in (9, 1):
        counts = Counter(drawn_policies(frames, cfg))
        n = sum(counts.values())
        weights = masks.default_weights(masks.DEFAULT_POLICIES, frames)
        total = sum(weights.values())
        assert set(counts) == set(weights) | {masks.BLACK}, counts      # images: t2v, block, ellipse only
        for policy, w in weights.items():
            share = (counts[policy] + (counts[masks.BLACK] if policy == "t2v" else 0)) / n
            assert abs(share - w / total) < 0.045, (frames, policy, share, w / total)
        black_share = counts[masks.BLACK] / (counts[masks.BLACK] + counts["t2v"])
        assert 0.03 < black_share < 0.2, black_share                     # CogVideoX-Fun: 10 % of all-masked steps
    # --mask_policy_weights: an i2v-focused mix; a weight for a policy the shards lack is refused
    focused = TrainConfig(train_mode="inpaint", caption_dropout=0.0, seed=1, mask_policy_weights="first_n=1,t2v=0,"
                          "first_last_n=0,block=0,block_range=0,ellipse=0")
    assert set(drawn_policies(9, focused, calls=20)) == {"first_n"}
    with pytest.raises(Exception, match="do not cache"):
        mask_weights(TrainConfig(train_mode="inpaint", mask_policy_weights="i2v=1"), list(masks.DEFAULT_POLICIES))
    with pytest.raises(Exception, match="no image conditioning"):       # images would have nothing to draw
        mask_weights(focused, list(masks.DEFAULT_POLICIES))
    assert mask_weights(TrainConfig(train_mode="inpaint", mask_policy_weights="first_n=0.6"),
                        list(masks.DEFAULT_POLICIES))["video"]["first_n"] == 0.6


def test_shards_without_mask_geometry_are_refused_for_inpaint():
    """Inpaint shards of an older cogfun (temporal masks, no stored geometry, image copies) are refused
    with what to do; this cogfun's are accepted."""
    from types import SimpleNamespace

    from cogfun.shards import ShardError
    from cogfun.stages.train import check_shards_fit

    tcfg = SimpleNamespace(out_channels=16, text_embed_dim=32, in_channels=33)
    manifest = {"model": {"latent_channels": 16, "text_dim": 32}, "mask_policies": ["i2v", "first_last"]}
    with pytest.raises(ShardError, match="mask design.*re-run precompute"):
        check_shards_fit(manifest, tcfg, "inpaint")
    check_shards_fit({**manifest, "mask_design": masks.MASK_DESIGN}, tcfg, "inpaint")
