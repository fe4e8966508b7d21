"""Training media from anywhere: --train_data_meta / --train_data_dir as URLs (a local HTTP
server with connections dropped mid-file, moto's S3 server) and --train_data_shards, WebDataset
tars of media written by webdataset's TarWriter (local and over HTTP). The same sources give the
same tensors whichever way they are read; a file that cannot be fetched is a skip with a reason.
(2 "machines" precomputing from a URL into one shard dir: tests/test_precompute.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cogfun import cli
from cogfun import shards
from cogfun.config import PrecomputeConfig
from cogfun.testing import HTTPShardServer, S3Server

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
            video_sample_stride=2, enable_bucket=True, train_mode="normal", mixed_precision="no",
            dataloader_num_workers=0, probe_workers=2, media_fetch_backoff=0.01)
# the synthetic set's files under names without an extension (decoders read the content), so that
# a tar sample's key (no dots) can be the same identity as a metadata row's file_path
FILES = {"clips/landscape": "videos/landscape.mp4", "clips/portrait": "videos/portrait.mp4",
         "clips/square": "videos/square.mp4", "stills/square": "images/square.png", "stills/landscape": "images/landscape.jpg"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_data):
    """A folder with `data/` (extensionless media + metadata.json) and `tars/part-{0,1,2}.tar`
    (the same samples, + one more in part-2), served over HTTP."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("served")
    src = synthetic_data.parent
    captions = {r["file_path"]: r["text"] for r in json.loads(synthetic_data.read_text())}
    rows = []
    for name, original in FILES.items():
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / original, root / "data" / name)
        rows.append({"file_path": name, "text": captions[original], "type": "image" if "stills" in name else "video"})
    (root / "data" / "metadata.json").write_text(json.dumps(rows))
    (root / "tars").mkdir()
    names = list(FILES)
    parts = [names[:3], names[3:], []]
    for i, part in enumerate(parts):
        with wds.TarWriter(str(root / "tars" / f"part-{i}.tar")) as sink:
            for name in part:
                ext = Path(FILES[name]).suffix[1:]
                sample = {"__key__": name, ext: (root / "data" / name).read_bytes()}
                if name == "clips/portrait":   # caption in the .json (video2dataset writes both; either works)
                    sample["json"] = {"caption": captions[FILES[name]], "url": "https://example.com/p.mp4"}
                else:
                    sample["txt"] = captions[FILES[name]]
                sink.write(sample)
            if i == 1:
                sink.write({"__key__": "broken/nocaption", "jpg": (src / "images/landscape.jpg").read_bytes(),
                            "json": {"url": "x"}})
                sink.write({"__key__": "broken/nomedia", "txt": "a caption alone"})
            if i == 2:
                sink.write({"__key__": "clips/added", "mp4": (src / "videos/wide.mp4").read_bytes(),
                            "txt": "an added clip"})
    with HTTPShardServer(root) as server:
        yield root, server


def run(model, out, **over) -> dict:
    from accelerate.state import AcceleratorState

    from cogfun.stages.precompute import precompute

    try:
        return precompute(PrecomputeConfig(pretrained_model_name_or_path=str(model), shard_dir=str(out),
                                           **{**DATA, **over}), progress=False)
    finally:
        AcceleratorState._reset_state(True)


def tensors_by_source(shard_dir) -> dict[str, tuple[bytes, dict]]:
    """source -> (safetensors bytes, sample json without the input digest, which holds the mtime, and
    the sample's recipe, which hashes it)."""
    import webdataset as wds

    out = {}
    for tar in sorted(Path(shard_dir).glob("*/*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(sample["json"])
            meta.pop("input")
            meta.pop("recipe")
            out[meta["source"]] = (sample["safetensors"], meta)
    return out


@pytest.fixture(scope="module")
def local_run(served, tiny_model_t2v, tmp_path_factory):
    root, _ = served
    out = tmp_path_factory.mktemp("local") / "S"
    summary = run(tiny_model_t2v, out, train_data_meta=str(root / "data" / "metadata.json"))
    assert summary["samples"] == len(FILES)
    return out


def test_media_from_http_equals_local_with_retries_and_a_lost_file(served, local_run, tiny_model_t2v, tmp_path):
    root, server = served
    server.drop("data/clips/square", 2)             # two connections dropped mid-file, then a good one
    server.drop("data/stills/square", -1)           # unreachable for good
    before = server.gets
    try:
        summary = run(tiny_model_t2v, tmp_path / "H", train_data_meta=f"{server.url}/data/metadata.json",
                      media_cache_dir=str(tmp_path / "cache"), media_fetch_retries=2)
    finally:
        server.drop("data/stills/square", 0)
    gets = server.gets - before
    # the lost file is a skip naming the URL and the reason; the others are encoded
    assert summary["samples"] == len(FILES) - 1
    (skip,) = summary["skipped"]
    assert skip["file_path"] == "stills/square" and skip["category"] == "fetch failed"
    assert f"{server.url}/data/stills/square: unreachable after 3 attempts" in skip["reason"]
    expected = tensors_by_source(local_run)
    del expected["stills/square"]
    assert tensors_by_source(tmp_path / "H") == expected        # the same tensors, bit for bit
    assert gets["data/clips/square"] == 3 and gets["data/stills/square"] == 3
    assert all(gets[f"data/{name}"] == 1 for name in FILES if "square" not in name), gets   # probe + decode: 1 fetch
    # the same command once the file is reachable again: fetched and encoded, nothing else
    before = server.gets
    again = run(tiny_model_t2v, tmp_path / "H", train_data_meta=f"{server.url}/data/metadata.json",
                media_cache_dir=str(tmp_path / "cache"), media_fetch_retries=2)
    assert again["status"] == "incremental" and again["encoded"] == 1 and not again["skipped"]
    assert tensors_by_source(tmp_path / "H") == tensors_by_source(local_run)
    assert set(server.gets - before) == {"data/metadata.json", "data/stills/square"}

    # a metadata URL that does not exist: a clean error naming it
    from cogfun.dataset import MetadataError

    with pytest.raises(MetadataError, match=f"{server.url}/nothing.json: metadata file not found"):
        run(tiny_model_t2v, tmp_path / "H3", train_data_meta=f"{server.url}/nothing.json")


def test_media_tars_local_and_http_equal_the_metadata_and_grow_incrementally(served, local_run, tiny_model_t2v,
                                                                              tmp_path):
    root, server = served
    local = run(tiny_model_t2v, tmp_path / "T", train_data_shards=str(root / "tars" / "part-{0..1}.tar"),
                media_cache_dir=str(tmp_path / "members"))   # (the decoders read members copied out of the tar)
    assert local["samples"] == len(FILES)
    assert sorted((s["file_path"], s["category"]) for s in local["skipped"]) == [
        ("broken/nocaption", "bad row"), ("broken/nomedia", "bad row")]
    assert "no string 'caption'" in str(local["skipped"])
    # the same identities as the metadata's file_paths: the same windows, sizes and tensors
    assert tensors_by_source(tmp_path / "T") == tensors_by_source(local_run)
    assert len([p for p in (tmp_path / "members").rglob("*") if p.is_file()]) == len(FILES)

    remote = run(tiny_model_t2v, tmp_path / "TH", train_data_shards=f"{server.url}/tars/part-{{0..1}}.tar",
                 media_cache_dir=str(tmp_path / "cache"))
    assert tensors_by_source(tmp_path / "TH") == tensors_by_source(local_run)
    assert [s["reason"].replace(server.url, str(root)) for s in remote["skipped"]] == \
        [s["reason"] for s in local["skipped"]]
    # the rerun asks each tar for its size and version only (its listing is in the shard dir): no tar read
    before = server.gets
    same = run(tiny_model_t2v, tmp_path / "TH", train_data_shards=f"{server.url}/tars/part-{{0..1}}.tar",
               media_cache_dir=str(tmp_path / "cache-empty"))
    assert same["status"] == "up to date" and not (server.gets - before)

    # one more tar in the pattern: its sample alone is probed and encoded
    grown = run(tiny_model_t2v, tmp_path / "T", train_data_shards=str(root / "tars" / "part-{0..2}.tar"),
                media_cache_dir=str(tmp_path / "members"))
    assert grown["status"] == "incremental" and grown["encoded"] == 1 and grown["probed"] == 1
    assert grown["samples"] == len(FILES) + 1
    again = run(tiny_model_t2v, tmp_path / "T", train_data_shards=str(root / "tars" / "part-{0..2}.tar"),
                media_cache_dir=str(tmp_path / "members"))
    assert again["status"] == "up to date"
    index = shards.read_index(tmp_path / "T", columns=["source"])
    assert sorted(index["source"]) == sorted([*FILES, "clips/added"])


def test_s3_metadata_and_tars_for_inspect_buckets(served, tmp_path, monkeypatch):
    root, _ = served
    flags = ["--video_sample_size", "64", "--image_sample_size", "64", "--token_sample_size", "64",
             "--video_sample_n_frames", "9", "--video_sample_stride", "2", "--enable_bucket", "--json",
             "--media_cache_dir", str(tmp_path / "cache")]

    def inspect(*args):
        result = CliRunner().invoke(cli.main, ["inspect-buckets", *args, *flags])
        assert result.exit_code == 0, (result.output, result.exception)
        report = json.loads(result.output)
        return report["buckets"], report["total"]["samples"]

    local = inspect("--train_data_meta", str(root / "data" / "metadata.json"))
    import s3fs

    with S3Server() as s3:
        for key, value in s3.environment().items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()   # (fsspec keeps clients: one of an earlier test's server)
        s3.upload(root / "data", "media/data")
        s3.upload(root / "tars", "media/tars")
        assert inspect("--train_data_meta", "s3://media/data/metadata.json") == local
        assert inspect("--train_data_shards", "s3://media/tars/part-{0..1}.tar") == local
        assert local[1] == len(FILES)
    s3fs.S3FileSystem.clear_instance_cache()       # leave no client of this server to later tests


def test_a_media_cache_of_one_file_refetches_and_forked_workers_fetch(served, local_run, tiny_model_t2v, tmp_path):
    """A cache bound that holds about one file: every fill evicts the others, files are fetched again
    when needed (probe threads, then forked decode workers), nothing is lost; a bound below the
    largest file is refused up front."""
    from cogfun.storage import CacheTooSmall

    root, server = served
    url = f"{server.url}/data/metadata.json"
    largest = max((root / "data" / name).stat().st_size for name in FILES)
    before = server.gets
    summary = run(tiny_model_t2v, tmp_path / "S", train_data_meta=url, media_cache_dir=str(tmp_path / "cache"),
                  media_cache_size_gb=1.2 * largest / 1e9, dataloader_num_workers=1)
    assert not summary["skipped"]
    assert tensors_by_source(tmp_path / "S") == tensors_by_source(local_run)
    assert sum((server.gets - before).values()) > len(FILES) + 1      # refetched after evictions
    with pytest.raises(CacheTooSmall, match=r"--media_cache_size_gb .* is smaller than http://"):
        run(tiny_model_t2v, tmp_path / "S2", train_data_meta=url, media_cache_size_gb=0.5 * largest / 1e9)
