"""The bucket planner: what each clip becomes (size, crop, frames), from CogVideoX-Fun's flags.

Pure and torch-free. The rules are CogVideoX-Fun's code (its `train_lora.py` collate_fn and
`ImageVideoDataset`), except where its training doc (DESIGN.md §3) says otherwise; `--bucket_rules
upstream` follows the code there too (`BUCKET_RULES`):

* base size: fixed (video_sample_size / image_sample_size), or drawn when `random_hw_adapt` /
  `training_with_video_token_length` is on: an image (and a video without the token budget) takes
  size / r, r from CogVideoX-Fun's downsample list (r = 1 three times in four); a video under the
  token budget takes a size of the 128-step grid video_sample_size .. image_sample_size, among those
  below 1.25 x its mean side (no upscaling; the side after CogVideoX-Fun's load-time downscale);
* ratio bucket: nearest key of the 512 ratio table, scaled by base/512, sides floored to 16; with
  `random_ratio_crop` a key drawn from CogVideoX-Fun's crop table with its probabilities instead;
  without `enable_bucket` a base x base center square;
* token-length budget: a video at base s gets F(s) = largest 4k+1 <= min(N, N*T^2/s^2) (the doc's
  numbers; upstream: min(N*T^2/s^2, N)//4*4+1), at least 1 frame: such a 1-frame video is reported;
* frames: N (or fewer for short clips, 4k+1) source frames `stride` apart from a seeded start;
* CogVideoX 1.5 (`patch_size_t` 2, read from the model): a video whose latent frame count is odd
  keeps the first 4 frames fewer (49 -> 45, 33 -> 29; 85 stays), as CogVideoX-Fun's trainer does,
  so every video bucket has an even latent count; images stay 1 frame (padded in the transformer).

Every random choice comes from an RNG seeded by (seed, identity, view), so a clip's plan does
not depend on which rank plans it, on the order of the metadata, or on the other clips. A sample's
identity is its file_path, or `file_path#k` for the k-th caption variant (k >= 2) of a file listed
with several captions (see cogfun.dataset).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from cogfun.models import TEXT_LEN

# CogVideoX-Fun's ASPECT_RATIO_512: height/width -> [height, width] at base 512.
ASPECT_RATIO_512: dict[float, tuple[int, int]] = {
    0.25: (256, 1024), 0.26: (256, 992), 0.27: (256, 960), 0.28: (256, 928), 0.32: (288, 896),
    0.33: (288, 864), 0.35: (288, 832), 0.4: (320, 800), 0.42: (320, 768), 0.48: (352, 736),
    0.5: (352, 704), 0.52: (352, 672), 0.57: (384, 672), 0.6: (384, 640), 0.68: (416, 608),
    0.72: (416, 576), 0.78: (448, 576), 0.82: (448, 544), 0.88: (480, 544), 0.94: (480, 512),
    1.0: (512, 512), 1.07: (512, 480), 1.13: (544, 480), 1.21: (544, 448), 1.29: (576, 448),
    1.38: (576, 416), 1.46: (608, 416), 1.67: (640, 384), 1.75: (672, 384), 2.0: (704, 352),
    2.09: (736, 352), 2.4: (768, 320), 2.5: (800, 320), 2.89: (832, 288), 3.0: (864, 288),
    3.11: (896, 288), 3.62: (928, 256), 3.75: (960, 256), 3.88: (992, 256), 4.0: (1024, 256),
}

VAE_TEMPORAL = 4      # CogVideoX VAE: 4x temporal compression (latent frames = (F-1)/4 + 1)
VAE_SPATIAL = 8       # 8x spatial compression
PATCH = 2             # transformer patch size on latents -> 16 px per token side
BASE_STEP = 128       # grid of base sizes between the min and max base (CogVideoX-Fun's step)
UPSCALE_GUARD = 1.25  # a token-budget base is drawn among sizes < this x the clip's mean side (CogVideoX-Fun)
#: --bucket_rules: "cogfun" = CogVideoX-Fun's code where its training doc agrees, the doc where it
#: does not (token-length frame numbers; the token budget also without --random_hw_adapt, and without
#: --enable_bucket); "upstream" = its code throughout (also: available frames = clip frames // stride,
#: 1 to 4 of them make a 1-frame video rather than a skip).
BUCKET_RULES = ("cogfun", "upstream")

# CogVideoX-Fun's ASPECT_RATIO_RANDOM_CROP_512 and ASPECT_RATIO_RANDOM_CROP_PROB (--random_ratio_crop).
RANDOM_CROP_512: dict[float, tuple[int, int]] = {
    0.42: (320, 768), 0.5: (352, 704), 0.57: (384, 672), 0.68: (416, 608), 0.78: (448, 576), 0.88: (480, 544),
    0.94: (480, 512), 1.0: (512, 512), 1.07: (512, 480), 1.13: (544, 480), 1.29: (576, 448), 1.46: (608, 416),
    1.75: (672, 384), 2.0: (704, 352), 2.4: (768, 320),
}
RANDOM_CROP_WEIGHTS = (1, 2, 4, 4, 4, 4, 8, 8, 8, 4, 4, 4, 4, 2, 1)
LATENT_CHANNELS = 16
MIN_SOURCE_SIDE = VAE_SPATIAL * PATCH  # a source smaller than one transformer token is not trained on


class PlanSkip(Exception):
    """A clip that cannot become a sample; the message is the reason shown to the user, the
    category groups reasons in reports ("too short", "too small", ...)."""

    def __init__(self, reason: str, category: str = "bad row") -> None:
        super().__init__(reason)
        self.category = category


@dataclass(frozen=True)
class Sampling:
    """The flags that decide a clip's plan (a view of DataArgs)."""
    image_sample_size: int = 512
    video_sample_size: int = 512
    token_sample_size: int = 512
    video_sample_stride: int = 4
    video_sample_n_frames: int = 17
    random_hw_adapt: bool = False
    training_with_video_token_length: bool = False
    enable_bucket: bool = False
    random_ratio_crop: bool = False
    bucket_rules: str = "cogfun"
    seed: int = 42
    num_views: int | str = 1   # a count, or "auto" (about clip frames / window frames, at most max_views)
    max_views: int = 8
    latent_multiple: int = 1   # the model's patch_size_t (CogVideoX 1.5: 2); not a flag

    @classmethod
    def from_config(cls, cfg, *, latent_multiple: int = 1) -> "Sampling":
        from cogfun.config import num_views_setting

        flags = {k: getattr(cfg, k) for k in cls.__dataclass_fields__ if k != "latent_multiple"}
        flags["num_views"] = num_views_setting(flags["num_views"])
        return cls(**flags, latent_multiple=latent_multiple)

    def validate(self) -> None:
        for name in ("image_sample_size", "video_sample_size", "token_sample_size"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ValueError(f"--{name} must be a positive multiple of 16, got {value}")
        if self.video_sample_stride < 1:
            raise ValueError(f"--video_sample_stride must be >= 1, got {self.video_sample_stride}")
        if self.video_sample_n_frames < 1:
            raise ValueError(f"--video_sample_n_frames must be >= 1, got {self.video_sample_n_frames}")
        if self.num_views != "auto" and not (isinstance(self.num_views, int) and self.num_views >= 1):
            raise ValueError(f"--num_views must be >= 1 or 'auto', got {self.num_views!r}")
        if self.max_views < 1:
            raise ValueError(f"--max_views must be >= 1, got {self.max_views}")
        if self.latent_multiple < 1:
            raise ValueError(f"patch_size_t must be >= 1, got {self.latent_multiple}")
        from cogfun.config import ConfigError   # a user's to fix: one message, no traceback

        if self.bucket_rules not in BUCKET_RULES:
            raise ConfigError(f"--bucket_rules must be one of {', '.join(BUCKET_RULES)}, got {self.bucket_rules!r}")
        if self.random_ratio_crop and not self.enable_bucket:
            raise ConfigError("--random_ratio_crop needs --enable_bucket (CogVideoX-Fun ignores it without, "
                              "as it crops a square then)")

    @property
    def upstream(self) -> bool:
        return self.bucket_rules == "upstream"

    @property
    def adapt(self) -> bool:
        """Bases are drawn: --random_hw_adapt; by the doc also --training_with_video_token_length
        alone; upstream only with --enable_bucket."""
        if self.upstream:
            return self.random_hw_adapt and self.enable_bucket
        return self.random_hw_adapt or self.training_with_video_token_length

    @property
    def token_budget(self) -> bool:
        """Videos trade frames for resolution (upstream: only together with --random_hw_adapt)."""
        return self.training_with_video_token_length and self.adapt


@dataclass(frozen=True)
class SamplePlan:
    """One sample to encode: a view of one source clip."""
    key: str
    source: str            # file_path as written in the metadata
    kind: str              # "video" | "image"
    view: int
    base: float            # an int, or a fraction where CogVideoX-Fun's downsample ratio gives one (1024 / 1.25)
    height: int
    width: int
    frames: int            # pixel frames F (4k+1; 1 for images)
    frame_indices: tuple[int, ...]
    resize_hw: tuple[int, int]             # cover-resize size before the crop
    crop_box: tuple[int, int, int, int]    # top, left, height, width
    identity: str = ""     # the sample's source identity (file_path, or file_path#k for caption variant k)
    latent_multiple: int = 1               # the transformer's patch_size_t (tokens per sample)
    frames_dropped: int = 0                # frames the patch_size_t rule took off the end of the window

    @property
    def bucket(self) -> str:
        return bucket_name(self.height, self.width, self.frames)

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.frames)

    @property
    def tokens(self) -> int:
        return tokens_per_sample(self.frames, self.height, self.width, self.latent_multiple)


def bucket_name(height: int, width: int, frames: int) -> str:
    return f"{height}x{width}x{frames}"


def parse_bucket(name: str) -> tuple[int, int, int]:
    h, w, f = (int(x) for x in name.split("x"))
    return h, w, f


def floor_4k1(n: float) -> int:
    """Largest 4k+1 <= n (0 when n < 1)."""
    if n < 1:
        return 0
    return int((math.floor(n) - 1) // VAE_TEMPORAL) * VAE_TEMPORAL + 1


def latent_frames(frames: int) -> int:
    return (frames - 1) // VAE_TEMPORAL + 1


def tokens_per_sample(frames: int, height: int, width: int, latent_multiple: int = 1) -> int:
    """Transformer tokens: ((F-1)/4+1) * (H/16) * (W/16); with patch_size_t p the latent frames
    are patched p at a time (an image is padded to p): ceil(F'/p) * (H/16) * (W/16)."""
    side = VAE_SPATIAL * PATCH
    return -(-latent_frames(frames) // latent_multiple) * (height // side) * (width // side)


def patch_t_frames(frames: int, latent_multiple: int) -> int:
    """CogVideoX-Fun's rule for patch_size_t: drop 4 pixel frames per latent frame over a multiple
    of it (49 -> 45 with p 2); a clip never goes below 1 frame (an image stays an image)."""
    extra = latent_frames(frames) % latent_multiple
    return max(1, frames - extra * VAE_TEMPORAL)


def latent_bytes(frames: int, height: int, width: int, channels: int = LATENT_CHANNELS,
                 itemsize: int = 2) -> int:
    """Bytes of one [F', C, H/8, W/8] latent tensor (bf16 by default)."""
    return latent_frames(frames) * channels * (height // VAE_SPATIAL) * (width // VAE_SPATIAL) * itemsize


def sample_bytes(frames: int, height: int, width: int, *, text_dim: int, n_mask_policies: int,
                 text_len: int = TEXT_LEN, itemsize: int = 2) -> int:
    """Tensor payload of one cached sample: mean + logvar + prompt embeds + masked latents."""
    lat = latent_bytes(frames, height, width, itemsize=itemsize)
    return (2 + n_mask_policies) * lat + text_len * text_dim * itemsize


def _grid(lo: int, hi: int) -> list[int]:
    """CogVideoX-Fun's base-size grid: lo, lo + 128, ..., and hi; just [hi] when hi <= lo."""
    if hi <= lo:
        return [hi]
    sizes = list(range(lo, hi + 1, BASE_STEP))
    if sizes[-1] != hi:
        sizes.append(hi)
    return sizes


def downsample_ratios(size: int, extra: tuple[float, ...] = ()) -> tuple[list[float], list[float]]:
    """CogVideoX-Fun's random downsample ratios of a sample size and their probabilities (the first,
    1, three times in four; the others share the rest): `size / ratio` is the base."""
    if size >= 1536:
        ratios = [1, 1.25, 1.5, 2, 2.5, 3]
    elif size >= 1024:
        ratios = [1, 1.25, 1.5, 2]
    elif size >= 768:
        ratios = [1, 1.25, 1.5]
    elif size >= 512:
        ratios = [1]
    else:
        ratios = [1]
        extra = ()   # below 512 CogVideoX-Fun adds no image ratio either
    ratios = ratios + list(extra)
    if len(ratios) == 1:
        return ratios, [1.0]
    return ratios, [0.75] + [0.25 / (len(ratios) - 1)] * (len(ratios) - 1)


def _base(size: int, ratio: float) -> float:
    b = size / ratio
    return int(b) if b == int(b) else b


def base_choices(s: Sampling, kind: str, mean_side: float | None = None) -> tuple[list[float], list[float]]:
    """The bases a sample of `kind` may take and their draw weights. `mean_side`: a video's mean
    side (after `load_size`); under the token budget only sizes below 1.25 x it are drawn (all when
    none is)."""
    if not s.adapt:
        return [s.video_sample_size if kind == "video" else s.image_sample_size], [1.0]
    if kind == "image":
        ratios, weights = downsample_ratios(s.image_sample_size, (s.image_sample_size / s.video_sample_size,))
        return [_base(s.image_sample_size, r) for r in ratios], weights
    if s.token_budget:
        sizes = _grid(s.video_sample_size, s.image_sample_size)
        if mean_side is not None:
            sizes = [x for x in sizes if x < mean_side * UPSCALE_GUARD] or sizes
        return sizes, [1.0] * len(sizes)
    ratios, weights = downsample_ratios(s.video_sample_size)
    return [_base(s.video_sample_size, r) for r in ratios], weights


def base_sizes(s: Sampling, kind: str) -> list[float]:
    """The base sizes a sample of `kind` may take (one element: no random choice), before the
    upscaling guard."""
    return sorted(set(base_choices(s, kind)[0]))


def frame_budget(s: Sampling, base: float) -> int:
    """Most frames a video sample at this base may have (4k+1, at least 1)."""
    n = s.video_sample_n_frames
    if s.token_budget:
        volume = n * s.token_sample_size ** 2 / base ** 2
        if s.upstream:   # CogVideoX-Fun's code: min(N*T^2/s^2, N) // 4 * 4 + 1 (13 at 1024 for N 49, T 512)
            return int(min(volume, n) // VAE_TEMPORAL * VAE_TEMPORAL + 1)
        n = min(n, volume)
    return max(1, floor_4k1(n))


def load_size(s: Sampling, height: int, width: int) -> tuple[int, int]:
    """A video's (h, w) after CogVideoX-Fun's load-time downscale (`resize_frame`): its short side
    to max(image_sample_size, video_sample_size) when longer. Its mean side bounds the token-budget
    base (upscaling guard) and its ratio picks the bucket, as in CogVideoX-Fun."""
    target = max(s.image_sample_size, s.video_sample_size)
    if height < width:
        return (height, width) if target > height else (target, int(target * width / height))
    return (height, width) if target > width else (int(target * height / width), target)


def bucket_hw(src_h: int, src_w: int, base: float, enable_bucket: bool,
              table: dict[float, tuple[int, int]] = ASPECT_RATIO_512, key: float | None = None) -> tuple[int, int]:
    """Target (H, W) for a clip: nearest ratio bucket (or `key` of `table`) scaled to `base`, sides
    floored to 16."""
    if not enable_bucket:
        side = int(base) // 16 * 16
        return side, side
    if key is None:
        ratio = src_h / src_w
        key = min(table, key=lambda r: abs(r - ratio))
    h, w = table[key]
    return int(h / 512 * base / 16) * 16, int(w / 512 * base / 16) * 16


def cover_crop(src_h: int, src_w: int, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize (aspect kept) to cover height x width, then center-crop: (resize_hw, crop_box)."""
    scale = max(height / src_h, width / src_w)
    rh = max(height, round(src_h * scale))
    rw = max(width, round(src_w * scale))
    top = (rh - height) // 2
    left = (rw - width) // 2
    return (rh, rw), (top, left, height, width)


def sample_key(identity: str, view: int) -> str:
    """Stable, dot-free sample key: a hash of the source identity plus the view number."""
    digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:16]
    return f"{digest}_v{view}"


def clip_rng(seed: int, identity: str, view: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: deterministic across processes.
    return random.Random(f"{seed}:{identity}:{view}")


def available_frames(s: Sampling, frames: int) -> int:
    """Frames `stride` apart a clip of `frames` frames holds: (frames - 1) // stride + 1 (upstream:
    frames // stride, CogVideoX-Fun's count, one fewer when stride divides frames - 1)."""
    if frames <= 0:
        return 0
    if s.upstream:
        return frames // s.video_sample_stride
    return (frames - 1) // s.video_sample_stride + 1


def auto_views(s: Sampling, kind: str, frames: int) -> int:
    """--num_views auto: about clip frames / window frames views of a video (rounded, 1 to
    max_views); an image has one. The window is the shortest a view of the clip may get: N frames
    `stride` apart, or, under --training_with_video_token_length, the frame budget of the largest
    base (a larger base has a shorter window), so that the views cover the clip whatever base each
    view draws."""
    if kind == "image":
        return 1
    available = available_frames(s, frames)
    n = min(max(1, floor_4k1(min(frame_budget(s, base), available))) for base in base_sizes(s, kind))
    window = (n - 1) * s.video_sample_stride + 1
    return max(1, min(s.max_views, math.floor(frames / window + 0.5)))


def plan_clip(s: Sampling, source: str, kind: str, *, frames: int, height: int, width: int,
              identity: str | None = None) -> list[SamplePlan]:
    """All views of one probed clip (`identity`: the sample's source identity, default the
    file_path). Raises PlanSkip with the reason when it cannot be used."""
    if kind not in ("video", "image"):
        raise PlanSkip(f"type must be 'video' or 'image', got {kind!r}")
    if height < 1 or width < 1:
        raise PlanSkip(f"invalid size {height}x{width} (HxW)", "corrupt")
    if min(height, width) < MIN_SOURCE_SIDE:
        raise PlanSkip(f"too small to train on: {height}x{width} px (HxW; each side must be at least "
                       f"{MIN_SOURCE_SIDE} px, one transformer token)", "too small")
    identity = identity or source
    plans = []
    auto = s.num_views == "auto"
    views = auto_views(s, kind, frames) if auto else s.num_views
    # a video's size as CogVideoX-Fun sees it after loading: its ratio picks the bucket, its mean
    # side bounds the token-budget base (images are read whole)
    seen_h, seen_w = load_size(s, height, width) if kind == "video" else (height, width)
    bases, weights = base_choices(s, kind, (seen_h + seen_w) / 2)
    for view in range(views):
        rng = clip_rng(s.seed, identity, view)
        # one base: still one draw, so that the frame window below is the one cogfun always drew
        base = rng.choice(bases) if len(bases) == 1 else rng.choices(bases, weights=weights)[0]
        key = None
        if s.random_ratio_crop:
            key = rng.choices(list(RANDOM_CROP_512), weights=RANDOM_CROP_WEIGHTS)[0]
        h, w = bucket_hw(seen_h, seen_w, base, s.enable_bucket, RANDOM_CROP_512 if key else ASPECT_RATIO_512, key)
        if h < 16 or w < 16:
            raise PlanSkip(f"bucket {h}x{w} at base {base:g} is smaller than 16 px", "too small")
        dropped = 0
        if kind == "image":
            indices: tuple[int, ...] = (0,)
        else:
            stride = s.video_sample_stride
            budget = frame_budget(s, base)
            available = available_frames(s, frames)
            n = floor_4k1(min(budget, available))
            need = 1 if s.upstream else min(budget, VAE_TEMPORAL + 1)   # upstream: 1 to 4 frames -> 1 frame
            if n < need:
                raise PlanSkip(
                    f"video too short: {frames} source frames give {available} frame(s) at stride "
                    f"{stride}; need at least {need}"
                    + (" (one 4-frame latent group after the first frame)" if need > 1 else ""), "too short")
            window = (n - 1) * stride + 1
            if auto:  # stratified: view v starts in the v-th of `views` equal parts of the start range
                lo, hi = view * (frames - window + 1) // views, (view + 1) * (frames - window + 1) // views - 1
                start = rng.randint(min(lo, frames - window), max(min(lo, frames - window), hi))
            else:
                start = rng.randint(0, frames - window)
            # the window is drawn for n frames and, for patch_size_t, its prefix kept (as CogVideoX-Fun)
            indices = tuple(start + i * stride for i in range(patch_t_frames(n, s.latent_multiple)))
            dropped = n - len(indices)
        resize_hw, crop_box = cover_crop(height, width, h, w)
        plans.append(SamplePlan(key=sample_key(identity, view), source=source, kind=kind, view=view,
                                base=base, height=h, width=w, frames=len(indices), frame_indices=indices,
                                resize_hw=resize_hw, crop_box=crop_box, identity=identity,
                                latent_multiple=s.latent_multiple, frames_dropped=dropped))
    return plans


def one_frame_videos(plans) -> list[str]:
    """Sources of video samples that became 1 frame (the token budget at a large base, or, under
    --bucket_rules upstream, a clip of 1 to 4 frames at the stride): the reports name them."""
    return sorted({p.source for p in plans if p.kind == "video" and p.frames == 1})
