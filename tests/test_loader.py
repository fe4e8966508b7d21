"""The bucket batch sampler: one bucket per batch, seeded, world-size independent global order."""

from collections import Counter

import pytest

from cogfun.loader import BucketBatchSampler, CachedSamples

ROWS = [(i, "64x64x9" if i % 3 else "32x128x1", "video" if i % 3 else "image") for i in range(30)]


def sampler(**kw):
    args = dict(batch_size=2, world=1, rank=0, accumulation=1, seed=3, video_repeat=1)
    args.update(kw)
    return BucketBatchSampler(ROWS, **args)


def test_one_bucket_per_batch_and_full_batches():
    bucket = {i: b for i, b, _ in ROWS}
    for batch in sampler():
        assert len(batch) == 2
        assert len({bucket[i] for i, _ in batch}) == 1
        assert len({g for _, g in batch}) == 1


def test_same_seed_same_order_other_seed_or_epoch_differs():
    a = [list(b) for b in sampler()]
    assert a == [list(b) for b in sampler()]
    assert a != [list(b) for b in sampler(seed=4)]
    s = sampler()
    s.set_epoch(1)
    assert a != [list(b) for b in s]


def test_ranks_partition_the_same_global_batches():
    single = [b for b in sampler(accumulation=2)]
    ranks = [list(sampler(world=2, rank=r)) for r in range(2)]
    interleaved = [b for pair in zip(*ranks) for b in pair]
    assert interleaved == single[:len(interleaved)]
    assert len(ranks[0]) == len(ranks[1])     # every rank does the same number of steps


def test_video_repeat_weights_videos():
    def kinds(s):
        kind = {i: k for i, _, k in ROWS}
        return Counter(kind[i] for b in s for i, _ in b)

    plain, heavy = kinds(sampler()), kinds(sampler(video_repeat=3))
    assert heavy["image"] == plain["image"]
    assert heavy["video"] == 3 * plain["video"]
    assert kinds(sampler(video_repeat=0)) == plain          # CogVideoX-Fun's 0 = no extra repeats


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="not enough samples"):
        BucketBatchSampler(ROWS[:2], batch_size=4, world=2, rank=0, accumulation=1, seed=0)


def test_global_index_maps_to_shard_positions(tmp_path):
    ds = CachedSamples(tmp_path, {"shards": {"b/2.tar": 3, "a/1.tar": 2, "c/3.tar": 1}})
    assert len(ds) == 6
    assert [ds.locate(i) for i in range(6)] == [("a/1.tar", 0), ("a/1.tar", 1), ("b/2.tar", 0), ("b/2.tar", 1),
                                                ("b/2.tar", 2), ("c/3.tar", 0)]
    assert ds.global_index("b/2.tar", 2) == 4


def test_an_epoch_shows_one_view_per_clip_cycling_through_them():
    """Rows carry sample keys `<clip>_v<view>`: each epoch shows exactly one view of each clip, a clip's
    V views come round once in any V consecutive epochs, and the order is a pure function of (seed, epoch)."""
    from cogfun.buckets import sample_key

    views = {"a.mp4": 3, "b.mp4": 3, "c.mp4": 1, "d.mp4": 2}
    rows, clip_of = [], {}
    for clip, n in views.items():
        for v in range(n):
            index = len(rows)
            # view 1 of b lands in another bucket (random_hw_adapt): epoch lengths may differ
            rows.append((index, "64x64x9" if (clip, v) != ("b.mp4", 1) else "32x32x9", "video", sample_key(clip, v)))
            clip_of[index] = (clip, v)
    s = BucketBatchSampler(rows, batch_size=1, world=1, rank=0, accumulation=1, seed=0)
    seen = []
    for epoch in range(6):
        s.set_epoch(epoch)
        shown = [clip_of[i] for batch in s for i, _ in batch]
        assert sorted(c for c, _ in shown) == sorted(views)            # one view of every clip
        assert len(shown) == s.steps_in_epoch(epoch) == len(s)
        seen.append(dict(shown))
    for clip, n in views.items():
        for start in range(6 - n + 1):
            assert {seen[e][clip] for e in range(start, start + n)} == set(range(n)), clip
    again = BucketBatchSampler(list(reversed(rows)), batch_size=1, world=1, rank=0, accumulation=1, seed=0)
    again.set_epoch(4)
    s.set_epoch(4)
    assert list(again) == list(s)
    # batches of 2 from one bucket: b's odd view leaves a bucket of 1 in some epochs, so the count varies
    s2 = BucketBatchSampler(rows, batch_size=2, world=1, rank=0, accumulation=1, seed=0)
    counts = [s2.steps_in_epoch(e) for e in range(6)]
    assert set(counts) == {1, 2}
    assert s2.locate_step(sum(counts[:3])) == (3, sum(counts[:3]))
    assert s2.locate_step(sum(counts[:3]) - 1) == (2, sum(counts[:2]))
