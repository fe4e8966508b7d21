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


def plain_sampler_batches(rows, *, batch_size, world, rank, accumulation, seed, video_repeat, epoch):
    """The sampler's specification as plain Python lists (its first implementation): one view per clip
    per epoch at a seeded offset, each bucket shuffled (videos repeated) and cut, all batches shuffled."""
    import random

    clips: dict = {}
    for row in rows:
        clip, _, view = row[3].rpartition("_v")
        clips.setdefault(clip, []).append((int(view), tuple(row[:3])))
    shown = []
    for clip in sorted(clips):
        views = [r for _, r in sorted(clips[clip])]
        offset = random.Random(f"{seed}:views:{clip}").randrange(len(views))
        shown.append(views[(epoch + offset) % len(views)])
    rng = random.Random(f"{seed}:batches:{epoch}")
    by_bucket: dict = {}
    for index, bucket, kind in shown:
        by_bucket.setdefault(bucket, []).extend([index] * (max(1, video_repeat) if kind == "video" else 1))
    batches = []
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        rng.shuffle(items)
        batches += [items[i:i + batch_size] for i in range(0, len(items) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    batches = batches[: len(batches) // (world * accumulation) * (world * accumulation)]
    return [[(i, g) for i in batches[g]] for g in range(rank, len(batches), world)]


def test_columnar_sampler_draws_exactly_the_batches_of_the_plain_version():
    """The sampler holds arrays, but its batches are the list version's, draw for draw, for any rows
    (clips of 1-4 views in several buckets, images and videos), sizes, ranks, repeats, epochs and resume points."""
    import random

    from cogfun.buckets import sample_key
    from cogfun.loader import Rows

    r = random.Random(0)
    for trial in range(25):
        buckets = [f"{r.choice([16, 32, 64])}x{r.choice([16, 32])}x{r.choice([1, 9])}"
                   for _ in range(r.randrange(1, 4))]
        rows = []
        for c in range(r.randrange(20, 120)):
            kind = r.choice(["video", "image"])
            rows += [[r.choice(buckets), kind, sample_key(f"clip{c}.mp4", v)] for v in range(r.choice([1, 1, 2, 3, 4]))]
        order = r.sample(range(len(rows)), len(rows))          # global indices in no particular order
        rows = [(order[i], *row) for i, row in enumerate(rows)]
        kw = dict(batch_size=r.choice([1, 2, 3]), world=r.choice([1, 2]), accumulation=r.choice([1, 2]),
                  seed=r.randrange(100), video_repeat=r.choice([0, 1, 3]))
        kw["rank"] = r.randrange(kw["world"])
        s = BucketBatchSampler(Rows.from_tuples(rows[::-1]), **kw)
        for epoch in range(4):
            s.set_epoch(epoch)
            want = plain_sampler_batches(rows, epoch=epoch, **kw)
            assert list(s) == want and len(s) == len(want) and s.steps_in_epoch(epoch) * kw["accumulation"] == len(want)
            skip = r.randrange(len(want) + 1)
            assert list(s.iter_from(skip)) == want[skip:]


def write_tiny_shards(shard_dir, n: int = 10):
    """n samples in two buckets, 3 per tar, captions in two caption tables, with the product's writer,
    index and a manifest: the train loader's input without a model."""
    import torch

    from cogfun import shards
    from cogfun.buckets import sample_key

    writers = shards.BucketWriters(shard_dir, 0, "test", 3)
    tables: dict = {}
    for i in range(n):
        bucket = "16x16x1" if i % 3 else "16x32x1"
        caption = f"caption {i % 7}"
        meta = {"source": f"v{i // 2}.mp4", "caption": caption, "prompt": shards.prompt_key(caption),
                "kind": "video", "bucket": bucket, "view": i % 2, "frames": 1, "height": 16, "width": 16,
                "latent_frames": 1, "tokens": 1}
        g = torch.Generator().manual_seed(i)
        tensors = {"latent_mean": torch.randn(1, 4, 2, 2 + 2 * (i % 3 == 0), generator=g).bfloat16()}
        writers.write(bucket, shards.encode_sample(sample_key(meta["source"], meta["view"]), meta, tensors))
        table = tables.setdefault(f"prompts/{i % 2}.safetensors", {})
        table[meta["prompt"]] = torch.randn(4, 8, generator=g).bfloat16()
    writers.close()
    (shard_dir / "prompts").mkdir()
    for rel, table in tables.items():
        shards.save_tensors(table, shard_dir / rel)
    table_of = shards.prompt_tables_on_disk(shard_dir)
    shards.write_index(shard_dir, shards.scan_shards(shard_dir), table_of)
    counts = shards.tar_sample_counts(shard_dir)
    manifest = {"format_version": shards.FORMAT_VERSION, "shards": counts, "num_samples": n,
                "shard_bytes": {s: (shard_dir / s).stat().st_size for s in counts},
                "prompt_tables": {t: (shard_dir / t).stat().st_size for t in tables}}
    shards.write_json_atomic(shard_dir / shards.MANIFEST, manifest)
    return manifest, table_of


def test_index_locates_every_sample_without_scanning_tars(tmp_path, monkeypatch):
    """index.parquet records where each sample's bytes are (tar members, caption embedding): the loader
    reads every sample as webdataset does without opening a tar as a tar, holding no caption or source."""
    import tarfile

    import pyarrow.parquet as pq
    import torch
    import webdataset as wds
    from safetensors.torch import load_file

    from cogfun import shards
    from cogfun.buckets import sample_key
    from cogfun.loader import index_rows

    manifest, table_of = write_tiny_shards(tmp_path)
    assert set(shards.LOCATION_COLUMNS) <= set(pq.read_schema(tmp_path / shards.INDEX).names)
    expected = {}
    for tar in manifest["shards"]:
        for sample in wds.WebDataset(str(tmp_path / tar), shardshuffle=False):
            expected[sample["__key__"]] = shards.decode_sample(sample)
    monkeypatch.setattr(tarfile, "open", None)            # any tar header scan would fail
    dataset = CachedSamples(tmp_path, manifest)
    rows = index_rows(dataset)
    assert len(rows) == len(expected) == 10
    for i in rows.index:
        got = dataset[(int(i), 7)]
        meta, tensors = expected[sample_key(got["meta"]["source"], got["meta"]["view"])]
        assert got["meta"] == meta and got["batch_id"] == 7
        assert torch.equal(got["tensors"]["latent_mean"], tensors["latent_mean"])
        table = load_file(str(tmp_path / table_of[meta["prompt"]]))
        assert torch.equal(got["tensors"]["prompt_embeds"], table[meta["prompt"]])
    held = dataset.index._held
    assert not {"caption", "source", "prompt"} & set(held)                       # read only when needed
    assert sum(getattr(a, "nbytes", 0) for v in held.values() for a in (v if isinstance(v, tuple) else [v])) < 200 * 10


def test_an_index_without_member_offsets_is_still_read(tmp_path):
    """Shards whose index predates the recorded offsets (same format version) give the same samples and
    batches: the loader then scans each tar's and caption table's headers when it first opens it."""
    import shutil

    import pyarrow.parquet as pq
    import torch

    from cogfun import shards
    from cogfun.loader import index_rows

    manifest, _ = write_tiny_shards(tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    table = pq.read_table(old / shards.INDEX)
    pq.write_table(table.drop_columns(list(shards.LOCATION_COLUMNS)).replace_schema_metadata(None), old / shards.INDEX)
    a, b = CachedSamples(tmp_path / "new", manifest), CachedSamples(old, manifest)
    sa = BucketBatchSampler(index_rows(a), batch_size=2, world=1, rank=0, accumulation=1, seed=1)
    sb = BucketBatchSampler(index_rows(b), batch_size=2, world=1, rank=0, accumulation=1, seed=1)
    assert list(sa) == list(sb)
    for batch in sb:
        for item in batch:
            x, y = a[item], b[item]
            assert x["meta"] == y["meta"] and x["tensors"].keys() == y["tensors"].keys()
            assert all(torch.equal(x["tensors"][k], y["tensors"][k]) for k in x["tensors"])


def test_a_tar_changed_after_the_index_is_refused(tmp_path):
    """Each member is read with its tar header: a tar rewritten after index.parquet (other order) is a
    ShardError saying so, never other bytes taken for the sample."""
    import webdataset as wds

    from cogfun import shards

    manifest, _ = write_tiny_shards(tmp_path)
    tar = next(t for t, n in sorted(manifest["shards"].items()) if n > 1)
    samples = list(wds.WebDataset(str(tmp_path / tar), shardshuffle=False))
    with wds.TarWriter(str(tmp_path / tar)) as writer:
        for sample in reversed(samples):
            writer.write({k: v for k, v in sample.items() if k in ("__key__", "json", "safetensors")})
    dataset = CachedSamples(tmp_path, manifest)
    with pytest.raises(shards.ShardError, match="changed after index.parquet was written"):
        dataset[(dataset.global_index(tar, 0), 0)]
