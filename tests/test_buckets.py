"""The bucket planner against DESIGN §3's rules: table-driven cases and properties."""

import dataclasses
import random

import pytest

from cogfun.buckets import (ASPECT_RATIO_512, PlanSkip, Sampling, base_sizes, bucket_hw, cover_crop, floor_4k1,
                            frame_budget, plan_clip, sample_key, tokens_per_sample)


@pytest.mark.parametrize("base,frames", [(512, 49), (768, 21), (1024, 9)])
def test_token_length_budget_matches_the_doc(base, frames):
    s = Sampling(video_sample_n_frames=49, token_sample_size=512, training_with_video_token_length=True)
    assert frame_budget(s, base) == frames


def test_token_count_of_512_square_49_frames():
    assert tokens_per_sample(49, 512, 512) == 13312


@pytest.mark.parametrize("n,expected", [(49, 49), (48.9, 45), (21.78, 21), (12.25, 9), (5, 5), (4.99, 1), (1, 1), (0.5, 0)])
def test_floor_4k1(n, expected):
    assert floor_4k1(n) == expected


@pytest.mark.parametrize("h,w,base,expected", [
    (480, 720, 512, (352, 544)),     # 0.667 -> key 0.68: [416, 608]? no: nearest to 0.6667 is 0.68
    (720, 480, 512, (608, 416)),     # 1.5 -> 1.46
    (100, 100, 512, (512, 512)),
    (100, 400, 512, (256, 1024)),    # 0.25
    (100, 1000, 512, (256, 1024)),   # beyond the table: clamps to the nearest key
    (480, 720, 1024, (832, 1216)),
    (480, 720, 768, (624, 912)),
])
def test_bucket_sizes(h, w, base, expected):
    got = bucket_hw(h, w, base, enable_bucket=True)
    ratio = h / w
    key = min(ASPECT_RATIO_512, key=lambda r: abs(r - ratio))
    bh, bw = ASPECT_RATIO_512[key]
    assert got == (int(bh * base / 512) // 16 * 16, int(bw * base / 512) // 16 * 16)
    if (h, w) == (480, 720) and base == 512:
        assert key == 0.68 and got == (416, 608)
    if (h, w) == (100, 400):
        assert got == expected


def test_without_bucket_square_of_base():
    assert bucket_hw(480, 720, 512, enable_bucket=False) == (512, 512)
    assert bucket_hw(480, 720, 320, enable_bucket=False) == (320, 320)


@pytest.mark.parametrize("src", [(480, 720), (720, 480), (100, 1000), (64, 64), (33, 97)])
@pytest.mark.parametrize("dst", [(416, 608), (256, 1024), (512, 512)])
def test_cover_crop_covers_and_centers(src, dst):
    (rh, rw), (top, left, ch, cw) = cover_crop(*src, *dst)
    assert rh >= dst[0] and rw >= dst[1]
    assert (ch, cw) == dst
    assert top + ch <= rh and left + cw <= rw
    assert abs(top - (rh - ch - top)) <= 1 and abs(left - (rw - cw - left)) <= 1
    # aspect kept: one side matches exactly (up to rounding), the other is at least as large
    assert abs(rh / rw - src[0] / src[1]) < 0.05 * max(1, src[0] / src[1])


def test_base_sizes_per_mode():
    """The training doc's examples (DESIGN §3), with CogVideoX-Fun's downsample lists as the draws."""
    assert base_sizes(Sampling(video_sample_size=512, image_sample_size=768), "video") == [512]
    assert base_sizes(Sampling(video_sample_size=512, image_sample_size=768), "image") == [768]
    adapt = Sampling(video_sample_size=1024, image_sample_size=1024, random_hw_adapt=True)
    assert base_sizes(adapt, "image") == [512, 1024 / 1.5, 819.2, 1024]   # 512 .. 1024 (doc example)
    assert base_sizes(adapt, "video") == [512, 1024 / 1.5, 819.2, 1024]
    small = Sampling(video_sample_size=256, image_sample_size=1024, random_hw_adapt=True)
    assert base_sizes(small, "image") == [256, 512, 1024 / 1.5, 819.2, 1024]   # images 256 .. 1024
    assert base_sizes(small, "video") == [256]                                 # videos 256 only
    tok = Sampling(video_sample_size=256, image_sample_size=1024, training_with_video_token_length=True)
    assert base_sizes(tok, "video") == [256, 384, 512, 640, 768, 896, 1024]
    assert base_sizes(tok, "image") == [256, 512, 1024 / 1.5, 819.2, 1024]
    # upstream's code: the token budget (and any draw) only with --random_hw_adapt and --enable_bucket
    up = dataclasses.replace(tok, bucket_rules="upstream")
    assert base_sizes(up, "video") == [256] and base_sizes(up, "image") == [1024]
    assert base_sizes(dataclasses.replace(up, random_hw_adapt=True), "video") == [256]
    assert base_sizes(dataclasses.replace(up, random_hw_adapt=True, enable_bucket=True), "video")[-1] == 1024


def test_seed_flags_give_512_square_49_frames():
    s = Sampling(image_sample_size=512, video_sample_size=512, token_sample_size=512, video_sample_stride=3,
                 video_sample_n_frames=49, random_hw_adapt=True, training_with_video_token_length=True,
                 enable_bucket=True)
    (plan,) = plan_clip(s, "a.mp4", "video", frames=300, height=512, width=512)
    assert (plan.height, plan.width, plan.frames) == (512, 512, 49)
    assert plan.tokens == 13312
    assert plan.frame_indices == tuple(range(plan.frame_indices[0], plan.frame_indices[0] + 49 * 3, 3))


def test_frame_window_and_short_clips():
    s = Sampling(video_sample_size=64, video_sample_n_frames=17, video_sample_stride=4)
    (p,) = plan_clip(s, "long.mp4", "video", frames=100, height=64, width=64)
    assert p.frames == 17 and p.frame_indices[-1] - p.frame_indices[0] == 16 * 4
    assert 0 <= p.frame_indices[0] and p.frame_indices[-1] < 100
    (short,) = plan_clip(s, "short.mp4", "video", frames=30, height=64, width=64)   # 8 frames at stride 4 -> 5
    assert short.frames == 5 and short.frame_indices == (0, 4, 8, 12, 16) or short.frames == 5
    with pytest.raises(PlanSkip, match="too short"):
        plan_clip(s, "tiny.mp4", "video", frames=12, height=64, width=64)     # 3 frames at stride 4


def test_images_are_one_frame_at_image_size():
    s = Sampling(video_sample_size=256, image_sample_size=512, enable_bucket=True)
    (p,) = plan_clip(s, "a.png", "image", frames=1, height=300, width=600)
    assert p.frames == 1 and p.frame_indices == (0,)
    assert (p.height, p.width) == bucket_hw(300, 600, 512, True)


def test_bad_kind_is_skipped():
    with pytest.raises(PlanSkip, match="type"):
        plan_clip(Sampling(), "x.wav", "audio", frames=1, height=10, width=10)


def test_keys_have_no_dots_and_are_stable():
    assert "." not in sample_key("dir/clip.name.mp4", 3)
    assert sample_key("a.mp4", 0) == sample_key("a.mp4", 0) != sample_key("a.mp4", 1)


@pytest.mark.parametrize("trial", range(25))
def test_properties_random_configs(trial):
    rng = random.Random(trial)
    s = Sampling(image_sample_size=rng.choice([256, 512, 768, 1024]), video_sample_size=rng.choice([256, 512, 768]),
                 token_sample_size=rng.choice([256, 512]), video_sample_stride=rng.randint(1, 5),
                 video_sample_n_frames=rng.choice([9, 17, 49]), random_hw_adapt=rng.random() < 0.5,
                 training_with_video_token_length=rng.random() < 0.5, enable_bucket=rng.random() < 0.5,
                 seed=rng.randint(0, 100), num_views=rng.randint(1, 3))
    for i in range(20):
        h, w = rng.randint(64, 2000), rng.randint(64, 2000)
        kind = rng.choice(["video", "image"])
        frames = rng.randint(1, 400) if kind == "video" else 1
        try:
            plans = plan_clip(s, f"clip{i}.mp4", kind, frames=frames, height=h, width=w)
        except PlanSkip:
            assert kind == "video"
            continue
        assert plans == plan_clip(s, f"clip{i}.mp4", kind, frames=frames, height=h, width=w)  # same seed, same plan
        assert len(plans) == s.num_views and len({p.key for p in plans}) == s.num_views
        for p in plans:
            assert p.height % 16 == 0 and p.width % 16 == 0
            assert (p.frames - 1) % 4 == 0
            assert p.frames <= s.video_sample_n_frames or kind == "image"
            if s.training_with_video_token_length and kind == "video":
                # never over the pixel-volume budget N*T^2
                assert p.frames * p.base ** 2 <= s.video_sample_n_frames * s.token_sample_size ** 2 or p.frames == 1
            idx = p.frame_indices
            assert all(0 <= j < frames for j in idx)
            assert all(b - a == s.video_sample_stride for a, b in zip(idx, idx[1:]))
            assert p.base in base_sizes(s, kind)


def test_plan_does_not_depend_on_other_clips_or_order():
    s = Sampling(random_hw_adapt=True, image_sample_size=1024, num_views=2, seed=7)
    a = plan_clip(s, "a.mp4", "video", frames=200, height=480, width=720)
    plan_clip(s, "b.mp4", "video", frames=200, height=480, width=720)
    assert plan_clip(s, "a.mp4", "video", frames=200, height=480, width=720) == a
    other_seed = plan_clip(Sampling(random_hw_adapt=True, image_sample_size=1024, num_views=2, seed=8),
                           "a.mp4", "video", frames=200, height=480, width=720)
    assert [p.frame_indices for p in other_seed] != [p.frame_indices for p in a] or \
           [p.base for p in other_seed] != [p.base for p in a]


def test_num_views_auto_covers_the_clip_with_stratified_windows():
    """--num_views auto: about clip frames / window frames views (a clip of 3x the window: 3), their
    windows in successive thirds of the clip; images 1 view; capped by --max_views."""
    s = Sampling(num_views="auto", video_sample_n_frames=17, video_sample_stride=2, seed=5)   # window 33 frames
    plans = plan_clip(s, "long.mp4", "video", frames=99, height=64, width=64)
    assert [p.view for p in plans] == [0, 1, 2] and len({p.key for p in plans}) == 3
    starts = [p.frame_indices[0] for p in plans]
    span = 99 - 33 + 1
    assert all(v * span // 3 <= start < (v + 1) * span // 3 for v, start in enumerate(starts)), starts
    assert all(p.frame_indices[-1] < 99 and p.frames == 17 for p in plans)
    assert len(plan_clip(s, "short.mp4", "video", frames=40, height=64, width=64)) == 1
    assert len(plan_clip(s, "img.png", "image", frames=1, height=64, width=64)) == 1
    assert len(plan_clip(s, "huge.mp4", "video", frames=5000, height=64, width=64)) == 8      # --max_views
    assert len(plan_clip(dataclasses.replace(s, max_views=2), "long.mp4", "video", frames=99, height=64,
                         width=64)) == 2
    # an explicit count keeps its seeded, independent windows (shards made before stay valid)
    fixed = plan_clip(dataclasses.replace(s, num_views=3), "long.mp4", "video", frames=99, height=64, width=64)
    assert [p.key for p in fixed] == [p.key for p in plans]


def test_num_views_auto_counts_the_shortest_window_under_token_length():
    """With --training_with_video_token_length a larger base has a shorter window (here base 64: 33
    frames, base 128: 5): auto counts views by the shortest one, so the views cover the clip whichever
    base each draws (one 33-frame window's worth of views left most of a 40-frame clip unseen)."""
    coverage = []
    for frames, views in ((20, 4), (30, 6), (40, 8)):
        for seed in range(20):
            s = Sampling(num_views="auto", training_with_video_token_length=True, video_sample_size=64,
                         image_sample_size=128, token_sample_size=64, video_sample_n_frames=33, video_sample_stride=1,
                         seed=seed)
            plans = plan_clip(s, "clip.mp4", "video", frames=frames, height=64, width=64)
            assert len(plans) == views and {p.frames for p in plans} <= {5, 17, 29, 33}
            seen = set().union(*(range(p.frame_indices[0], p.frame_indices[-1] + 1) for p in plans))
            coverage.append(len(seen) / frames)
    assert sum(coverage) / len(coverage) > 0.9 and min(coverage) >= 0.75, coverage
