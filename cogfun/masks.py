"""Inpaint / i2v mask policies: CogVideoX-Fun's random masks, cached.

CogVideoX-Fun (`get_random_mask` in VideoX-Fun) draws a random pixel mask per sample and step
(1 = to generate, masked pixels set to -1) and VAE-encodes the masked clip every step. We cache the
masked-clip latents for a recorded set of *policies* instead (DESIGN §3). Each policy stands for
part of the reference's mask distribution; per sample and policy, precompute draws the mask's
geometry with a seeded RNG (seed, sample key, policy) exactly as the reference draws it, stores it
in the sample's json and encodes that masked clip; train rebuilds the pixel mask from the stored
geometry and resizes it exactly as CogVideoX-Fun does (`resize_mask`: 1 - mask, first frame on its
own, the rest trilinearly resized to the remaining latent frames), times the VAE scaling factor.

The reference's families (videos; images in brackets) and the policy that caches each:
  all masked            20 % [70 %]  t2v (not cached: conditioning zeroed; 10 % of these steps get
                                     mask 0 + the latents of an all -1 clip, cached once per bucket)
  first k known, k=1     5 %         i2v
  first k known, k=2..4 15 %         first_n (also k=1 when i2v is not cached)
  first+last k, k=1      5 %         first_last
  first+last k, k=2..4  15 %         first_last_n (also k=1 when first_last is not cached)
  random whole frames    5 %         random_frames
  block, all frames      5 % [20 %]  block
  block, frame range     5 %         block_range
  ellipse / circle in frame 0 (all other frames known)  10 % + 5 % [5 % + 5 %]  ellipse
  per-pixel noise        5 %         pixel_noise
  small blocks, random frames  5 %   small_blocks
  (cogfun's own, not in the reference: first_k = the first half of the latent groups known)
A draw whose mask hides nothing (first+last k with 2k >= F frames, random frames none masked) is
a copy task; cogfun never caches one: those draws are left out of the geometry. Image samples
(1 frame) cache only the policies of the image distribution (block, ellipse); every other policy
would be the identity there.

Default draw weights at train time are the reference's mass of what each cached policy stands for
(`default_weights`); `coverage` is that mass summed, t2v included. Users may override them
(`--mask_policy_weights`).

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

Precompute calls `draw_geometries` and `encode_conditioning`, train calls `conditioning`; all build
on `pixel_mask` (where a policy's mask is defined) and `mask_channel`.
"""

from __future__ import annotations

import hashlib
import math
import random

# Every policy, in a fixed order (the config's choices). t2v needs no cache.
POLICIES = ("i2v", "first_n", "first_last", "first_last_n", "random_frames", "block", "block_range",
            "ellipse", "pixel_noise", "small_blocks", "first_k")
# The default cached set: >= 80 % of the reference's mask mass for videos (85 %) and images (100 %)
# at the fewest encodes (5 per video, 2 per image).
DEFAULT_POLICIES = ("first_n", "first_last_n", "block", "block_range", "ellipse")
SPATIAL = ("block", "block_range", "ellipse", "pixel_noise", "small_blocks")
# Policies whose conditioning stays what it says when a latent-frame prefix is kept (random_frame_crop):
PREFIX_SAFE = ("t2v", "i2v", "first_k", "first_n", "random_frames") + SPATIAL
FIRST_K_WEIGHT = 0.2        # first_k is not in the reference: its weight when cached
BLACK_SHARE = 0.1           # reference: 10 % of all-masked steps get mask 0 + an all -1 clip's latents
BLACK = "t2v_black"         # that conditioning's name in draws; its latents: `black_latents` per bucket
# The mask design, recorded in the manifest and the precompute fingerprint: a change of the rules
# that draw or build masks must change it.
MASK_DESIGN = "cogvideox-fun-get_random_mask/1"

# The reference's draws: (family, k, probability). k: frames known at each end (None: no k).
VIDEO_DRAWS = (("block", None, 0.05), ("all", None, 0.20),
               *(("first", k, 0.05) for k in (1, 2, 3, 4)), *(("first_last", k, 0.05) for k in (1, 2, 3, 4)),
               ("block_range", None, 0.05), ("pixel_noise", None, 0.05), ("small_blocks", None, 0.05),
               ("ellipse", None, 0.10), ("circle", None, 0.05), ("random_frames", None, 0.05))
IMAGE_DRAWS = (("block", None, 0.20), ("all", None, 0.70), ("ellipse", None, 0.05), ("circle", None, 0.05))
# CogVideoX-Fun's reference-video noise (`add_noise_in_inpaint_model: true` in a transformer config):
# in training, sigma = exp(N(-3, 0.5)) per sample; at inference a fixed `noise_aug_strength`.
REFERENCE_NOISE_LOG_MEAN = -3.0
REFERENCE_NOISE_LOG_STD = 0.5
INFERENCE_NOISE_AUG_STRENGTH = 0.0563
# The cached noise response is taken at the median training sigma.
REFERENCE_NOISE_SIGMA0 = math.exp(REFERENCE_NOISE_LOG_MEAN)
MASKED = "masked_latents"          # cached tensor names: f"{MASKED}.{policy}", f"{NOISE_RESPONSE}.{policy}"
NOISE_RESPONSE = "masked_noise_response"
BLACK_LATENTS = "black_latents"    # the all -1 clip's latents of a bucket (train puts them in a batch's tensors)


def cached_name(kind: str, policy: str, variant: int = 0) -> str:
    """The tensor name of a cached conditioning: f"{kind}.{policy}", and for the k-th extra mask
    geometry of --masks_per_policy (k >= 1) f"{kind}.{policy}@{k}"."""
    return f"{kind}.{policy}" + (f"@{variant}" if variant else "")


def reference_noise_design() -> dict:
    """The cached reference-noise design, as recorded in the manifest and the precompute fingerprint."""
    return {"design": "linear-response", "sigma0": REFERENCE_NOISE_SIGMA0,
            "sigma_log_mean": REFERENCE_NOISE_LOG_MEAN, "sigma_log_std": REFERENCE_NOISE_LOG_STD,
            "patterns_per_policy": 1, "pattern_seed": "sha256(seed:sample key:policy)",
            "tensors": f"{MASKED}.<policy> (clean), {NOISE_RESPONSE}.<policy> (response at sigma0)"}


# ---------------------------------------------------------------- which policy stands for which draws

def reference_draws(frames: int) -> tuple:
    """The reference's (family, k, probability) draws for a clip of `frames` pixel frames."""
    return IMAGE_DRAWS if frames == 1 else VIDEO_DRAWS


def route(family: str, k: int | None, policies) -> str | None:
    """The policy that stands for a reference draw, given the cached `policies` (t2v always), or None."""
    if family == "all":
        return "t2v"
    if family in ("first", "first_last"):
        single, several = ("i2v", "first_n") if family == "first" else ("first_last", "first_last_n")
        if k == 1 and single in policies:
            return single
        return several if several in policies else None
    family = "ellipse" if family == "circle" else family
    return family if family in policies else None


def _hides_something(family: str, k: int | None, frames: int) -> bool:
    return not ((family == "first" and k >= frames) or (family == "first_last" and 2 * k >= frames))


def draws_of(policy: str, policies, frames: int) -> list[tuple]:
    """The reference draws `policy` stands for on a `frames`-frame clip (copy tasks left out)."""
    return [d for d in reference_draws(frames)
            if route(d[0], d[1], policies) == policy and _hides_something(d[0], d[1], frames)]


def sample_policies(policies, frames: int) -> list[str]:
    """The policies cached for a sample of `frames` frames: those that hide something there (an image
    gets only block and ellipse; every temporal policy would be its identity)."""
    return [p for p in policies if draws_of(p, policies, frames) or (p == "first_k" and frames > 1)]


def default_weights(policies, frames: int) -> dict[str, float]:
    """Train-time draw weights of t2v and the sample's cached policies: the reference's mass of the
    draws each stands for (first_k, cogfun's own, FIRST_K_WEIGHT)."""
    weights = {"t2v": sum(p for f, _, p in reference_draws(frames) if f == "all")}
    for policy in sample_policies(policies, frames):
        weights[policy] = FIRST_K_WEIGHT if policy == "first_k" else sum(p for *_, p in draws_of(policy, policies, frames))
    return weights


def coverage(policies, frames: int) -> float:
    """The share of the reference's mask draws on a `frames`-frame clip that the cached `policies`
    (and t2v) reproduce."""
    return sum(p for f, k, p in reference_draws(frames)
               if route(f, k, policies) is not None and _hides_something(f, k, frames))


def parse_weights(spec: str) -> dict[str, float]:
    """`--mask_policy_weights` "i2v=0.6,t2v=0.1" -> {"i2v": 0.6, "t2v": 0.1} (names and values checked)."""
    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in ("t2v",) + POLICIES:
            raise ValueError(f"--mask_policy_weights: expected policy=weight with a policy among t2v, "
                             f"{', '.join(POLICIES)}; got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--mask_policy_weights: {name}={value!r} is not a number") from None
        if not out[name] >= 0 or math.isinf(out[name]):
            raise ValueError(f"--mask_policy_weights: {name} must be a finite weight >= 0, got {value}")
    return out


def weights_for(policies, frames: int, overrides: dict[str, float]) -> dict[str, float]:
    """The draw weights of one sample kind: the defaults, with the user's overrides where they apply."""
    return {p: overrides.get(p, w) for p, w in default_weights(policies, frames).items()}


def draw_weights(policies, spec: str, *, frame_crop: bool, cached_by: str = "the shards") -> dict[str, dict[str, float]]:
    """The train-time draw weights {"video": .., "image": ..}: CogVideoX-Fun's over the cached `policies`,
    with `--mask_policy_weights` `spec` applied. ValueError for a weight of a policy not cached (by
    `cached_by`, for the message) and for weights that leave nothing to draw (with `frame_crop`,
    --random_frame_crop: also for a frame-cropped video)."""
    if not policies:
        return {}
    overrides = parse_weights(spec)
    missing = [p for p in overrides if p != "t2v" and p not in policies]
    if missing:
        raise ValueError(f"--mask_policy_weights names {', '.join(missing)}, which {cached_by} do not cache "
                         f"(cached: {', '.join(policies)}); precompute with --mask_policies including it")
    out = {"video": weights_for(policies, 49, overrides), "image": weights_for(policies, 1, overrides)}
    for kind, weights in out.items():
        crop = [w for p, w in weights.items() if p in PREFIX_SAFE] if kind == "video" and frame_crop else []
        if sum(weights.values()) <= 0 or (crop and sum(crop) <= 0):
            raise ValueError(f"--mask_policy_weights leaves no {kind} conditioning to draw"
                             + (" for a frame-cropped sample (--random_frame_crop keeps only "
                                f"{', '.join(p for p in weights if p in PREFIX_SAFE)})" if sum(weights.values()) else ""))
    return out


# ---------------------------------------------------------------- geometry: drawn once, stored, rebuilt

def draw_geometries(policies, frames: int, height: int, width: int, *, seed: int, key: str,
                    variant: int = 0) -> dict[str, dict]:
    """{policy: geometry} of one sample (JSON): the reference's draw for each cached policy, seeded by
    (seed, sample key, policy, and the variant k >= 1 of --masks_per_policy), in pixels of the H x W
    sample."""
    out = {}
    for policy in sample_policies(policies, frames):
        rng = random.Random(f"{seed}:{key}:mask:{policy}" + (f":{variant}" if variant else ""))
        out[policy] = {} if policy == "first_k" else _draw(draws_of(policy, policies, frames), frames, height,
                                                           width, rng)
    return out


def _block(rng: random.Random, height: int, width: int) -> dict:
    cx, cy = rng.randrange(width), rng.randrange(height)
    bx, by = rng.randrange(width // 4, width // 4 * 3), rng.randrange(height // 4, height // 4 * 3)
    return {"y0": max(cy - by // 2, 0), "y1": min(cy + by // 2, height),
            "x0": max(cx - bx // 2, 0), "x1": min(cx + bx // 2, width)}


def _draw(draws: list[tuple], f: int, h: int, w: int, rng: random.Random) -> dict:
    """One geometry, as get_random_mask draws it, for one of `draws` (picked by probability)."""
    family, k, _ = rng.choices(draws, weights=[d[2] for d in draws])[0]
    if family in ("first", "first_last"):
        return {"k": k}
    if family == "random_frames":  # each frame masked with probability 1/2; none or all is another policy
        while True:
            masked = [int(rng.random() > 0.5) for _ in range(f)]
            if 0 < sum(masked) < f:
                return {"masked": masked}
    if family == "block":
        return _block(rng, h, w)
    if family == "block_range":
        return {**_block(rng, h, w), "t0": rng.randrange(0, f // 2), "t1": rng.randrange(f // 2, f)}
    side = min(h, w)
    if family == "ellipse":
        return {"shape": "ellipse", "cx": rng.randrange(w), "cy": rng.randrange(h),
                "a": rng.randrange(side // 8, side // 4), "b": rng.randrange(side // 8, side // 4)}
    if family == "circle":
        return {"shape": "circle", "cx": rng.randrange(w), "cy": rng.randrange(h),
                "r": rng.randrange(side // 8, side // 4)}
    if family == "pixel_noise":
        return {"seed": rng.getrandbits(63)}
    if family == "small_blocks":
        blocks = []
        for t in rng.sample(range(f), rng.randint(1, max(f // 2, 1))):
            bh, bw = rng.randint(1, h // 4), rng.randint(1, w // 4)
            y, x = rng.randint(0, h - bh), rng.randint(0, w - bw)
            blocks.append([t, y, y + bh, x, x + bw])
        return {"blocks": blocks}
    raise ValueError(f"unknown mask family {family!r}")


def pixel_mask(policy: str, geometry: dict | None, frames: int, height: int, width: int, *, device=None):
    """The reference-layout pixel mask [F, 1, H, W] uint8, 1 = masked (to generate), of a policy and
    its stored geometry (`draw_geometries`; None for the policies that have none: t2v, i2v,
    first_last, first_k)."""
    import torch

    g = geometry or {}
    if policy == "pixel_noise":  # drawn on the CPU: the same bits at precompute and train on any device
        gen = torch.Generator().manual_seed(g["seed"])
        return torch.randint(0, 2, (frames, 1, height, width), generator=gen, dtype=torch.uint8).to(device)
    mask = torch.zeros(frames, 1, height, width, dtype=torch.uint8, device=device)
    if policy == "t2v":
        mask[:] = 1
    elif policy == "i2v":
        mask[1:] = 1
    elif policy == "first_n":
        mask[g["k"]:] = 1
    elif policy == "first_last":
        mask[1:-1] = 1
    elif policy == "first_last_n":
        mask[g["k"]:-g["k"]] = 1
    elif policy == "first_k":
        latent = (frames - 1) // 4 + 1
        mask[1 + 4 * ((latent - 1) // 2):] = 1
    elif policy == "random_frames":
        for t, masked in enumerate(g["masked"][:frames]):
            mask[t] = masked
    elif policy == "block":
        mask[:, :, g["y0"]:g["y1"], g["x0"]:g["x1"]] = 1
    elif policy == "block_range":
        mask[g["t0"]:g["t1"], :, g["y0"]:g["y1"], g["x0"]:g["x1"]] = 1
    elif policy == "ellipse":  # frame 0 only, the reference's float32 formula
        y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                              torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
        if g["shape"] == "circle":
            inside = (y - g["cy"]) ** 2 + (x - g["cx"]) ** 2 < g["r"] ** 2
        else:
            inside = ((y - g["cy"]) ** 2) / (g["b"] ** 2) + ((x - g["cx"]) ** 2) / (g["a"] ** 2) < 1
        mask[0, 0] = inside.to(torch.uint8)
    elif policy == "small_blocks":
        for t, y0, y1, x0, x1 in g["blocks"]:
            mask[t, 0, y0:y1, x0:x1] = 1
    else:
        raise ValueError(f"unknown mask policy {policy!r}")
    return mask


def masked_clip(pixels, policy: str, geometry: dict | None = None):
    """pixels [..., 3, F, H, W] in [-1, 1] -> the same clip with the policy's masked pixels set to -1."""
    import torch

    frames, height, width = pixels.shape[-3:]
    mask = pixel_mask(policy, geometry, frames, height, width, device=pixels.device).permute(1, 0, 2, 3)
    return torch.where(mask.bool(), torch.full_like(pixels, -1.0), pixels)


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


def mask_channel(policy: str, frames: int, f_lat: int, h: int, w: int, scaling: float,
                 *, geometry: dict | None = None, dtype=None, device=None):
    """The conditioning mask channel [1, F', 1, h, w] (transformer layout): resize_mask(1 - mask) x scaling.

    `frames`: the pixel frames the policy was drawn for; F' the latent frames kept (a prefix: the
    pixel mask is cut to the frames they cover first, as CogVideoX-Fun cuts it for random_frame_crop).
    Temporal policies are built at 8 x 8 pixels and resized to 1 x 1 (their mask is constant in space,
    so this is exact); spatial ones at the sample's h*8 x w*8 pixels.
    """
    import torch

    from cogfun.buckets import VAE_SPATIAL, VAE_TEMPORAL

    spatial = policy in SPATIAL
    size = (h * VAE_SPATIAL, w * VAE_SPATIAL) if spatial else (8, 8)
    mask = pixel_mask(policy, geometry, frames, *size, device=device)[:(f_lat - 1) * VAE_TEMPORAL + 1]
    known = (1 - mask.float()).permute(1, 0, 2, 3)[None]           # [1, 1, F, H, W]
    small = resize_mask(known, (f_lat, h, w) if spatial else (f_lat, 1, 1))
    out = small.expand(1, 1, f_lat, h, w).permute(0, 2, 1, 3, 4) * scaling
    return out.to(dtype=dtype or torch.float32)


# ---------------------------------------------------------------- precompute: what is cached

def noise_pattern(shape, seed: int, key: str, policy: str):
    """The seeded N(0, 1) pixel noise pattern of one sample and policy (CPU, float32): the same on
    any rank, batch composition or device."""
    import torch

    digest = hashlib.sha256(f"{seed}:{key}:{policy}".encode()).hexdigest()
    gen = torch.Generator().manual_seed(int(digest[:15], 16))
    return torch.randn(shape, generator=gen)


def encode_conditioning(encode, pixels, geometries: list[dict], *, keys: list[str], seed: int,
                        reference_noise: bool, variant: int = 0) -> dict:
    """The cached conditioning of one bucket batch: {tensor name: [B, F', C, h, w]}.

    `encode`: pixels [B, 3, F, H, W] -> posterior mean [B, F', C, h, w] (the VAE); `pixels` on the
    CPU in [-1, 1]; `geometries`: per sample {policy: geometry} (`draw_geometries`; the same policies
    for every sample of a bucket). Per policy, `masked_latents.<policy>` = the masked clip's mean;
    with `reference_noise`, also `masked_noise_response.<policy>` = encode(masked + sigma0 * n) -
    encode(masked), n the seeded `noise_pattern` of each sample, noise on known pixels only (float32
    difference). `variant` k >= 1: the k-th extra geometry set of --masks_per_policy, its tensors
    named `cached_name(..., k)` and its noise pattern seeded apart.
    """
    import torch

    out = {}
    for policy in geometries[0] if geometries else ():
        masked = torch.cat([masked_clip(pixels[b:b + 1], policy, g[policy]) for b, g in enumerate(geometries)])
        mean = encode(masked)
        out[cached_name(MASKED, policy, variant)] = mean
        if reference_noise:
            pattern = f"{policy}@{variant}" if variant else policy   # variant 0: the pattern cogfun always drew
            noise = torch.stack([noise_pattern(masked.shape[1:], seed, k, pattern) for k in keys])
            noisy = add_reference_noise(masked, REFERENCE_NOISE_SIGMA0, noise=noise)
            out[cached_name(NOISE_RESPONSE, policy, variant)] = encode(noisy).float() - mean.float()
    return out


def black_clip(frames: int, height: int, width: int):
    """The all -1 clip [1, 3, F, H, W] whose latents the reference feeds on 10 % of all-masked steps."""
    import torch

    return torch.full((1, 3, frames, height, width), -1.0)


# ---------------------------------------------------------------- train: what the transformer sees

def conditioning(policy: str, tensors: dict, b: int, *, frames: int, keep: int, scaling: float,
                 noise_scale=None, geometry: dict | None = None, device=None, variant: int = 0):
    """Sample b's conditioning [1, keep, 1 + C, h, w] (mask channel + masked latents, both x scaling).

    `tensors`: the batch's cached tensors [B, F', ...]; `frames`: the pixel frames the policy was
    applied to; `keep`: latent frames kept (random_frame_crop prefix); `noise_scale`: s * sigma /
    sigma0 of this sample's reference noise (None: the model has none), applied to the cached
    noise response; `geometry`: the sample's stored geometry of the policy (of its `variant`, the
    --masks_per_policy geometry set the epoch shows). `t2v` is all zeros;
    `t2v_black` (BLACK) is mask 0 + the bucket's all -1 clip latents (`black_latents`, [1, F', C, h, w]).
    """
    import torch

    latents = tensors["latent_mean"]
    channels, h, w = latents.shape[-3:]
    if policy == "t2v":
        return torch.zeros(1, keep, 1 + channels, h, w, device=device)
    if policy == BLACK:
        black = tensors[BLACK_LATENTS][:1, :keep].float().to(device)
        return torch.cat([torch.zeros(1, keep, 1, h, w, device=device), black * scaling], dim=2)
    masked = tensors[cached_name(MASKED, policy, variant)][b:b + 1, :keep].float()
    if noise_scale is not None:
        masked = masked + noise_scale * tensors[cached_name(NOISE_RESPONSE, policy, variant)][b:b + 1, :keep].float()
    mask = mask_channel(policy, frames, keep, h, w, scaling, geometry=geometry, device=device)
    return torch.cat([mask, masked * scaling], dim=2)
