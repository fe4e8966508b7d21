"""Remote shard dirs over real servers on 127.0.0.1: HTTP (with connections dropped mid-file) and
moto's S3 server; the per-node read-through cache (one fetch per node, concurrent fills, LRU
size bound); the threaded loader; refusal of URLs where they cannot work and of older formats.
(Training from a URL on 2 machines is in test_train.py.)"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cogfun import cli
from cogfun import shards
from cogfun.config import PrecomputeConfig, TrainConfig
from cogfun.loader import BucketBatchSampler, CachedSamples, batches, index_rows
from cogfun.shards import ShardError
from cogfun.storage import ShardStore
from cogfun.testing import HTTPShardServer, S3Server

DATA = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
            video_sample_stride=2, enable_bucket=True, train_mode="inpaint", mixed_precision="no")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tiny_model_inp, synthetic_data):
    from accelerate.state import AcceleratorState

    from cogfun.stages.precompute import precompute

    out = tmp_path_factory.mktemp("remote") / "shards"
    precompute(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_inp), train_data_meta=str(synthetic_data),
                                train_data_dir=str(synthetic_data.parent), shard_dir=str(out),
                                dataloader_num_workers=0, shard_max_samples=1, **DATA), progress=False)
    AcceleratorState._reset_state(True)
    return out


@pytest.fixture(scope="module")
def server(shard_dir):
    with HTTPShardServer(shard_dir) as s:
        yield s


def same_samples(a: CachedSamples, b: CachedSamples) -> None:
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a[(i, 0)], b[(i, 0)]
        assert x["meta"] == y["meta"] and x["tensors"].keys() == y["tensors"].keys()
        assert all(torch.equal(x["tensors"][k], y["tensors"][k]) for k in x["tensors"])


def test_http_reads_equal_local_with_retries_and_one_fetch_per_node(shard_dir, server, tmp_path):
    manifest = shards.require_manifest(shard_dir)
    tars = sorted(manifest["shards"])
    server.drop(tars[0], 2)                       # two dropped connections, then a good one
    before = server.gets
    store = ShardStore(server.url, cache_dir=str(tmp_path / "cache"), backoff=0.01)
    same_samples(CachedSamples(shard_dir, manifest), CachedSamples(store, shards.require_manifest(store)))
    gets = server.gets - before
    assert gets[tars[0]] == 3 and all(gets[t] == 1 for t in tars[1:]), gets
    assert all(gets[t] == 1 for t in manifest["prompt_tables"])
    # another rank / process of the same node: everything comes from the cache
    before = server.gets
    again = CachedSamples(ShardStore(server.url, cache_dir=str(tmp_path / "cache")), manifest)
    same_samples(CachedSamples(shard_dir, manifest), again)
    assert set(server.gets - before) <= {shards.INDEX}   # (the small files are read fresh every run)


def test_unreachable_or_missing_file_fails_naming_the_url(shard_dir, server, tmp_path, tiny_model_inp):
    from cogfun.stages.train import train

    manifest = shards.require_manifest(shard_dir)
    bad = sorted(manifest["shards"])[1]
    server.drop(bad, -1)
    try:
        cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_model_inp), shard_dir=server.url,
                          output_dir=str(tmp_path / "out"), shard_cache_dir=str(tmp_path / "cache"), max_train_steps=14,
                          shard_fetch_retries=1, shard_fetch_backoff=0.01, rank=4, network_alpha=2.0,
                          report_to="none", train_batch_size=1, **DATA)
        with pytest.raises(ShardError, match=f"{server.url}/{bad}: unreachable after 2 attempts"):
            train(cfg)
    finally:
        server.drop(bad, 0)
    with pytest.raises(FileNotFoundError, match="no-such.tar"):
        ShardStore(server.url, cache_dir=str(tmp_path / "cache")).local_path("no-such.tar")
    with pytest.raises(ShardError, match="pip install gcsfs"):
        ShardStore("gs://bucket/shards")


def test_cache_fills_once_under_concurrency_and_evicts_least_recently_used(shard_dir, server, tmp_path):
    import multiprocessing

    manifest = shards.require_manifest(shard_dir)
    tars = sorted(manifest["shard_bytes"], key=manifest["shard_bytes"].get)[-4:]   # 4 largest
    sizes = manifest["shard_bytes"]
    before = server.gets
    server.delay = 0.3                            # every fill overlaps the others
    try:
        def fill(_):
            store = ShardStore(server.url, cache_dir=str(tmp_path / "cache"))
            return store.local_path(tars[0], sizes[tars[0]]).read_bytes()

        expected = (shard_dir / tars[0]).read_bytes()

        def other_rank():            # another process of the node, filling the same cache at the same time
            os._exit(0 if fill(0) == expected else 3)

        procs = [multiprocessing.get_context("fork").Process(target=other_rank) for _ in range(2)]
        for proc in procs:
            proc.start()
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(fill, range(4)))
        for proc in procs:
            proc.join(60)
    finally:
        server.delay = 0.0
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert (server.gets - before)[tars[0]] == 1
    assert all(g == expected for g in got)

    # bound = the two largest tars: after four fills only the two most recently used remain
    bound = (sizes[tars[-1]] + sizes[tars[-2]] + 1000) / 1e9
    store = ShardStore(server.url, cache_dir=str(tmp_path / "small"), cache_size_gb=bound)
    for rel in tars:
        store.local_path(rel, sizes[rel])
    store.local_path(tars[2], sizes[tars[2]])     # used again: now the most recent
    kept = sorted(p.name for p in store.cache.iterdir())
    assert kept == sorted(t.replace("/", "%2F") for t in tars[2:]), kept
    with pytest.raises(ShardError, match="shard_cache_size_gb"):
        ShardStore(server.url, cache_size_gb=1e-9).check_cache_fits(sizes)


def test_a_file_url_is_the_same_dir_for_precompute_and_readers(shard_dir, tmp_path, monkeypatch, tiny_model_inp,
                                                               synthetic_data):
    """file:///x is /x for precompute (pathlib) as for train and inspect-buckets (fsspec)."""
    from cogfun.stages.precompute import precompute

    copy = tmp_path / "S"
    shutil.copytree(shard_dir, copy)
    monkeypatch.chdir(tmp_path)                  # where a relative ./file:/... would appear
    url = f"file://{copy}"
    summary = precompute(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_inp),
                                          train_data_meta=str(synthetic_data), train_data_dir=str(synthetic_data.parent),
                                          shard_dir=url, dataloader_num_workers=0, shard_max_samples=1, **DATA),
                         progress=False)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert summary["status"] == "up to date" and not (tmp_path / "file:").exists()
    store = ShardStore(url)
    manifest = shards.require_manifest(store)
    tar = sorted(manifest["shards"])[0]
    assert not store.remote and store.local_path(tar) == copy / tar
    same_samples(CachedSamples(shard_dir, manifest), CachedSamples(store, manifest))


def test_s3_round_trip(shard_dir, tmp_path, monkeypatch):
    with S3Server() as s3:
        for key, value in s3.environment().items():
            monkeypatch.setenv(key, value)
        url = s3.upload(shard_dir, "cogfun-test/shards")
        store = ShardStore(url, cache_dir=str(tmp_path / "cache"))
        same_samples(CachedSamples(shard_dir, shards.require_manifest(shard_dir)),
                     CachedSamples(store, shards.require_manifest(store)))
        reports = []
        for where in (str(shard_dir), url):
            result = CliRunner().invoke(cli.main, ["inspect-buckets", "--shard_dir", where, "--json"])
            assert result.exit_code == 0, (result.output, result.exception)
            reports.append(json.loads(result.output))
        assert reports[0] == reports[1] and reports[0]["total"]["samples"] == 7


def test_threaded_batches_equal_in_order_reads_and_skip(shard_dir):
    dataset = CachedSamples(shard_dir, shards.require_manifest(shard_dir))
    sampler = BucketBatchSampler(index_rows(dataset), batch_size=1, world=1, rank=0, accumulation=1, seed=3)

    def ids(threads, skip=0):
        return [(b["batch_id"], b["metas"][0]["source"], b["tensors"]["latent_mean"].sum().item())
                for b in batches(dataset, sampler, threads=threads, skip=skip)]

    plain = ids(0)
    assert len(plain) == 7 and ids(2) == plain and ids(2, skip=5) == plain[5:]
    it = batches(dataset, sampler, threads=2)
    next(it)
    assert any(t.name.startswith("cogfun-read") for t in threading.enumerate())
    it.close()


def test_urls_refused_where_they_cannot_work_and_old_formats_refused(shard_dir, tmp_path, tiny_model_inp,
                                                                     synthetic_data):
    from cogfun.stages.precompute import precompute

    cfg = PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_inp), train_data_meta=str(synthetic_data),
                           train_data_dir=str(synthetic_data.parent), shard_dir="s3://bucket/shards",
                           dataloader_num_workers=0, **DATA)
    with pytest.raises(ShardError, match="precompute writes to a local or shared filesystem"):
        precompute(cfg, progress=False)

    old = tmp_path / "old"
    shutil.copytree(shard_dir, old)
    manifest = json.loads((old / shards.MANIFEST).read_text())
    manifest["format_version"] = 1
    manifest["fingerprint_parts"]["format_version"] = 1
    (old / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"format version 1, but this cogfun reads 2 .*once per caption.*--overwrite"):
        shards.require_manifest(old)
    result = CliRunner().invoke(cli.main, ["inspect-buckets", "--shard_dir", str(old)])
    assert result.exit_code == 1 and "--overwrite" in result.output
