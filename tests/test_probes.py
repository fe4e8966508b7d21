"""The probe cache (cogfun.probes): a rerun probes only new or changed files; parts written by
several ranks merge; rows of other files, changed files and older media readers are not used;
precompute and inspect-buckets use the shard dir's cache."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from cogfun import cli
from cogfun import probes, video
from cogfun.buckets import Sampling
from cogfun.dataset import load_sources, probe_and_plan
from cogfun.tiny import write_bad_dataset

SAMPLING = Sampling(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
                    video_sample_stride=2, enable_bucket=True)


@pytest.fixture
def counted(monkeypatch) -> Counter:
    """Counts the real probes per file name."""
    calls: Counter = Counter()
    real = video.probe

    def probe(path, kind, **kw):
        calls[Path(path).name] += 1
        return real(path, kind, **kw)

    monkeypatch.setattr(video, "probe", probe)
    return calls


def plan(meta: Path, cache=None):
    sources, _ = load_sources(meta, meta.parent)
    plans, skipped, by_key = probe_and_plan(sources, SAMPLING, workers=2, progress=False, cache=cache)
    return [(p.key, p.bucket, p.frame_indices) for p in plans], [s.to_json() for s in skipped], sources


def test_cache_round_trip_probes_only_new_and_changed_files(tmp_path, synthetic_data, counted):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data.parent, data)
    meta = data / "metadata.json"
    shard_dir = tmp_path / "S"
    expected = plan(meta)[:2]
    n_files = sum(counted.values())
    assert n_files == 8

    # two "ranks" probe halves and write their parts; the whole is then known
    sources = load_sources(meta, data)[0]
    for rank in range(2):
        cache = probes.load(shard_dir, paths={s.path for s in sources[rank::2]})
        probe_and_plan(sources[rank::2], SAMPLING, workers=1, progress=False, cache=cache)
        assert probes.save(shard_dir, cache) is not None
    assert len(list((shard_dir / probes.PROBES).glob("part-*.parquet"))) == 2
    counted.clear()
    cache = probes.load(shard_dir)
    assert plan(meta, cache)[:2] == expected and not counted and cache.hits == 8 and not cache.new
    assert probes.merge(shard_dir) == 8
    assert [p.name.split("-")[0] for p in (shard_dir / probes.PROBES).iterdir()] == ["merged"]

    # a new clip: only it is probed; a changed file (new mtime): only it, again
    shutil.copy(data / "videos/landscape.mp4", data / "videos/added.mp4")
    rows = json.loads(meta.read_text()) + [{"file_path": "videos/added.mp4", "text": "new", "type": "video"}]
    meta.write_text(json.dumps(rows))
    cache = probes.load(shard_dir)
    keys = plan(meta, cache)[0]
    assert dict(counted) == {"added.mp4": 1} and len(keys) == len(expected[0]) + 1
    probes.save(shard_dir, cache)
    counted.clear()
    st = os.stat(data / "images/square.png")
    os.utime(data / "images/square.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache = probes.load(shard_dir)
    cached_plan = plan(meta, cache)[:2]
    assert dict(counted) == {"square.png": 1}
    assert cached_plan == plan(meta)[:2]
    counted.clear()
    probes.save(shard_dir, cache)
    live = {(s.path, s.size, s.mtime_ns, s.kind) for s in load_sources(meta, data)[0]}
    assert probes.merge(shard_dir, keep=live) == 9        # the old square.png row is dropped
    assert not counted

    # rows of a cogfun that read fewer formats are not used
    cache = probes.load(shard_dir)
    assert len(cache) == 9
    import pyarrow.parquet as pq

    (merged,) = (shard_dir / probes.PROBES).iterdir()
    table = pq.read_table(merged)
    pq.write_table(table.set_column(table.schema.get_field_index("media_readers"), "media_readers",
                                    [[video.MEDIA_READERS - 1] * len(table)]), merged)
    assert len(probes.load(shard_dir)) == 0


def test_errors_of_the_bytes_are_cached_others_are_probed_again(tmp_path, counted):
    meta = write_bad_dataset(tmp_path / "bad")
    shard_dir = tmp_path / "S"
    cache = probes.load(shard_dir)
    _, skipped, _ = plan(meta, cache)
    probes.save(shard_dir, cache)
    first = dict(counted)
    counted.clear()
    cache = probes.load(shard_dir)
    _, again, _ = plan(meta, cache)
    assert again == skipped                        # the same reasons, from the cache or not
    by_category = {s["file_path"]: s["category"] for s in skipped}
    cached = {Path(p).name for p, c in by_category.items() if c in probes.CACHED_ERRORS}
    assert "corrupt.mp4" in cached and "empty.mp4" in cached
    # not cached: the missing file (it may appear) is probed every time
    assert "missing.mp4" in counted and not cached & set(counted), (first, dict(counted))


def test_precompute_reuses_the_cache_and_inspect_reads_it(tmp_path, synthetic_data, tiny_model_t2v, counted):
    from accelerate.state import AcceleratorState

    from cogfun.config import PrecomputeConfig
    from cogfun.stages.precompute import precompute

    data = tmp_path / "data"
    shutil.copytree(synthetic_data.parent, data)
    meta = data / "metadata.json"
    shard_dir = tmp_path / "S"
    cfg = PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_t2v), train_data_meta=str(meta),
                           train_data_dir=str(data), shard_dir=str(shard_dir), video_sample_size=64,
                           image_sample_size=64, token_sample_size=64, video_sample_n_frames=9, video_sample_stride=2,
                           enable_bucket=True, train_mode="normal", mixed_precision="no", dataloader_num_workers=0,
                           probe_workers=2)

    def run(**over):
        try:
            return precompute(PrecomputeConfig(**{**cfg.__dict__, **over}), progress=False)
        finally:
            AcceleratorState._reset_state(True)

    first = run()
    assert first["probed"] == 8 and first["probes_cached"] == 0 and sum(counted.values()) == 8
    counted.clear()
    # inspect-buckets with the shard dir and the data flags: the same report as probing, no probe
    flags = ["--train_data_meta", str(meta), "--train_data_dir", str(data), "--video_sample_size", "64",
             "--image_sample_size", "64", "--token_sample_size", "64", "--video_sample_n_frames", "9",
             "--video_sample_stride", "2", "--enable_bucket", "--json"]
    with_cache = CliRunner().invoke(cli.main, ["inspect-buckets", *flags, "--shard_dir", str(shard_dir)])
    assert with_cache.exit_code == 0, with_cache.output
    assert not counted
    plain = CliRunner().invoke(cli.main, ["inspect-buckets", *flags])
    assert json.loads(plain.output) == json.loads(with_cache.output)
    counted.clear()

    # one clip added: probed alone, encoded alone
    shutil.copy(data / "videos/landscape.mp4", data / "videos/added.mp4")
    rows = json.loads(meta.read_text()) + [{"file_path": "videos/added.mp4", "text": "new clip", "type": "video"}]
    meta.write_text(json.dumps(rows))
    added = run()
    assert added["status"] == "incremental" and added["encoded"] == 1
    assert dict(counted) == {"added.mp4": 1}
    # the finished dir's sources are neither probed nor planned again, but for the one it skipped
    # (videos/short.mp4, too short: planned again, from the cache)
    assert (added["probed"], added["probes_cached"]) == (1, 1)
    counted.clear()
    # a file that changed (its mtime): with --overwrite only it is probed and encoded again (the
    # other samples' recipes are unchanged)
    st = os.stat(data / "videos/portrait.mp4")
    os.utime(data / "videos/portrait.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = run(overwrite=True)
    assert dict(counted) == {"portrait.mp4": 1} and changed["encoded"] == 1
    assert [p.name.split("-")[0] for p in (shard_dir / probes.PROBES).iterdir()] == ["merged"]


def test_a_remote_shard_dirs_cache_is_read(tmp_path, synthetic_data, counted):
    """inspect-buckets --shard_dir URL --train_data_meta F: the cache is read over HTTP (and S3 alike)."""
    from cogfun.testing import HTTPShardServer

    meta = synthetic_data
    shard_dir = tmp_path / "S"
    cache = probes.load(shard_dir)
    expected = plan(meta, cache)[:2]
    probes.save(shard_dir, cache)
    counted.clear()
    with HTTPShardServer(shard_dir) as server:
        remote = probes.load(server.url, paths={s.path for s in load_sources(meta, meta.parent)[0]})
        assert len(remote) == 8
        assert plan(meta, remote)[:2] == expected and not counted
    (tmp_path / "empty").mkdir()
    with HTTPShardServer(tmp_path / "empty") as empty:     # a dir without probes/: an empty cache
        assert len(probes.load(empty.url)) == 0


def test_merge_keeps_one_row_per_key_and_only_the_kept_keys(tmp_path, synthetic_data):
    sources = load_sources(synthetic_data, synthetic_data.parent)[0]
    for _ in range(2):           # two ranks that probed the same files (a race): two parts, same keys
        cache = probes.ProbeCache()
        probe_and_plan(sources, SAMPLING, workers=1, progress=False, cache=cache)
        probes.save(tmp_path, cache)
    assert len(list((tmp_path / probes.PROBES).glob("*.parquet"))) == 2
    assert probes.merge(tmp_path) == 8
    keys = sorted(probes.load(tmp_path).known)
    assert probes.merge(tmp_path, keep=keys[:3]) == 3 and sorted(probes.load(tmp_path).known) == keys[:3]
    assert probes.merge(tmp_path, keep=[]) == 0 and len(probes.load(tmp_path)) == 0
