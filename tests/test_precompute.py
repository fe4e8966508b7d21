"""`cogfun precompute`: the shard dir contract (DESIGN §4) and the stage's behaviour (§3, §5).

Round trip against a direct encode of the same frames; 2 ranks == 1 rank; reuse, incremental
and refused mismatches; kill -9 and resume; bad inputs, decode timeouts and a full disk
reported, not crashed on; no unpickling of planted members; inspect-buckets agrees with the
manifest and with the bucket rules. Everything runs on the tiny real models in a few seconds
per run (64 px, 9 frames, fp32).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cogfun import cli
from cogfun import shards
from cogfun.config import PrecomputeConfig
from cogfun.shards import ShardError
from cogfun.stages.precompute import precompute

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["i2v", "first_last", "block"]
TEXT_DIM = 32  # cogfun.tiny.T5_D_MODEL


# ---------------------------------------------------------------------------------------------- helpers

def make_cfg(model, meta, shard_dir, **over) -> PrecomputeConfig:
    settings = dict(pretrained_model_name_or_path=str(model), train_data_meta=str(meta),
                    train_data_dir=str(Path(meta).parent), shard_dir=str(shard_dir),
                    video_sample_size=64, image_sample_size=64, token_sample_size=64,
                    video_sample_n_frames=9, video_sample_stride=2, enable_bucket=True,
                    train_mode="inpaint", mask_policies="i2v,first_last,block", mixed_precision="no",
                    dataloader_num_workers=0, probe_workers=2)
    settings.update(over)
    return PrecomputeConfig(**settings)


def cli_args(cfg: PrecomputeConfig, only: type | None = None) -> list[str]:
    """The command-line flags that reproduce `cfg` (defaults left out; `only`: just the flags
    another command's config class has)."""
    args = []
    names = {f.name for f in dataclasses.fields(only)} if only else None
    for f in dataclasses.fields(cfg):
        if names is not None and f.name not in names:
            continue
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            if value:
                args.append(f"--{f.name}")
        else:
            args += [f"--{f.name}", str(value)]
    return args


def read_tars(shard_dir: Path) -> dict[str, dict]:
    """Every sample of every complete tar on disk, read with plain webdataset iteration:
    key -> {"json": bytes, "safetensors": bytes, "tar": relative path, "position": i, "raw": sample}.
    Fails on a key stored twice."""
    import webdataset as wds

    out: dict[str, dict] = {}
    for tar in sorted(Path(shard_dir).glob("*/*.tar")):
        rel = str(tar.relative_to(shard_dir))
        for position, sample in enumerate(wds.WebDataset(str(tar), shardshuffle=False)):
            key = sample["__key__"]
            assert key not in out, f"sample {key} stored twice ({out.get(key, {}).get('tar')} and {rel})"
            out[key] = {"json": sample["json"], "safetensors": sample["safetensors"], "tar": rel,
                        "position": position, "raw": sample}
    return out


def payload(samples: dict[str, dict]) -> dict[str, tuple[bytes, bytes]]:
    """What must be identical between runs: key -> (json bytes, safetensors bytes)."""
    return {k: (s["json"], s["safetensors"]) for k, s in samples.items()}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def copy_dataset(meta: Path, dest: Path) -> Path:
    shutil.copytree(Path(meta).parent, dest)
    return dest / Path(meta).name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def expected_keys(cfg: PrecomputeConfig) -> set[str]:
    """The sample keys the planner gives for cfg's dataset (probe only)."""
    from cogfun.buckets import Sampling
    from cogfun.dataset import load_sources, probe_and_plan

    sources, _ = load_sources(cfg.train_data_meta, cfg.train_data_dir)
    plans, _, _ = probe_and_plan(sources, Sampling.from_config(cfg), workers=1, progress=False)
    return {p.key for p in plans}


@pytest.fixture(scope="module", autouse=True)
def _reset_accelerate_state():
    """In-process runs create accelerate's process state; leave none behind for other modules."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def base(tiny_model_inp, synthetic_data, tmp_path_factory):
    """One fresh single-process precompute of the synthetic set: (cfg, summary)."""
    cfg = make_cfg(tiny_model_inp, synthetic_data, tmp_path_factory.mktemp("base") / "shards")
    summary = precompute(cfg, progress=False)
    return cfg, summary


@pytest.fixture(scope="module")
def encoders(tiny_model_inp):
    from cogfun import models

    vae = models.load_vae(tiny_model_inp, torch.float32, "cpu")
    tokenizer, t5 = models.load_text_encoder(tiny_model_inp, torch.float32, "cpu")
    return vae, tokenizer, t5


# ---------------------------------------------------------------------------------------------- 1. round trip

def test_round_trip_matches_direct_encode(base, encoders, tiny_model_inp):
    from safetensors.torch import load_file

    from cogfun import masks, models, video
    from cogfun.loader import CachedSamples
    from cogfun.masks import masked_clip
    from cogfun.tiny import VAE_SCALING_FACTOR

    cfg, summary = base
    shard_dir = Path(cfg.shard_dir)
    vae, tokenizer, t5 = encoders
    assert summary["status"] == "fresh"

    # -- manifest: everything DESIGN §4 lists
    manifest = shards.read_manifest(shard_dir)
    assert manifest["format_version"] == shards.FORMAT_VERSION
    assert manifest["fingerprint"] == summary["fingerprint"] == shards.fingerprint(manifest["fingerprint_parts"])
    assert manifest["config"]["video_sample_size"] == 64 and manifest["config"]["train_mode"] == "inpaint"
    assert manifest["config"]["video_sample_n_frames"] == 9 and manifest["config"]["enable_bucket"] is True
    model = manifest["model"]
    assert model["path"] == str(Path(tiny_model_inp).resolve())
    assert re.fullmatch(r"[0-9a-f]{64}", model["vae_sha256"]) and re.fullmatch(r"[0-9a-f]{64}", model["text_encoder_sha256"])
    assert model["vae_sha256"] != model["text_encoder_sha256"]
    assert model["scaling_factor"] == pytest.approx(VAE_SCALING_FACTOR)
    assert model["latent_channels"] == 16 and model["text_dim"] == TEXT_DIM
    assert manifest["mask_policies"] == POLICIES
    assert manifest["cogfun_version"]
    assert manifest["skipped"] == [{"file_path": "videos/short.mp4", "reason": manifest["skipped"][0]["reason"],
                                    "category": "too short"}]
    assert "too short" in manifest["skipped"][0]["reason"] and manifest["skipped_by_reason"] == {"too short": 1}
    assert manifest["decoders"] == {} and manifest["warnings"] == []   # decord and Pillow read everything
    keys = expected_keys(cfg)
    assert manifest["num_samples"] == len(keys) == 7          # 4 long-enough clips + 3 images
    assert sum(b["count"] for b in manifest["buckets"].values()) == 7

    # -- plain webdataset iteration over every tar on disk + shards.decode_sample
    on_disk = read_tars(shard_dir)
    assert set(on_disk) == keys
    assert sorted(manifest["shards"]) == sorted({s["tar"] for s in on_disk.values()})
    decoded = {}
    for key, s in on_disk.items():
        meta, tensors = shards.decode_sample(s["raw"])
        decoded[key] = (meta, tensors)
        h, w, f = meta["height"], meta["width"], meta["frames"]
        assert s["tar"].split("/")[0] == meta["bucket"] == f"{h}x{w}x{f}"
        assert s["tar"] in manifest["buckets"][meta["bucket"]]["shards"]
        f_lat = (f - 1) // 4 + 1
        assert f == (9 if meta["kind"] == "video" else 1) and meta["latent_frames"] == f_lat
        assert meta["tokens"] == f_lat * (h // 16) * (w // 16)
        # images cache only what hides something in one frame (block); never a copy of the clip
        cached = POLICIES if meta["kind"] == "video" else ["block"]
        assert set(tensors) == {"latent_mean", "latent_logvar"} | {f"masked_latents.{p}" for p in cached}
        assert meta["prompt"] == shards.prompt_key(meta["caption"])       # T5: in the caption table
        assert sorted(meta["masks"]) == sorted(cached)
        for p in cached:
            assert not torch.equal(tensors[f"masked_latents.{p}"], tensors["latent_mean"]), (key, p)
        for name, t in tensors.items():
            assert t.dtype == torch.bfloat16, name
            assert torch.isfinite(t.float()).all(), name
            assert tuple(t.shape) == (f_lat, 16, h // 8, w // 8), (name, tuple(t.shape))
        # our in-place safetensors reader agrees with safetensors' own
        from safetensors.torch import load
        reference = load(s["safetensors"])
        assert reference.keys() == tensors.keys() and all(torch.equal(reference[k], tensors[k]) for k in tensors)
        if meta["kind"] == "video":
            assert meta["frame_indices"] == list(range(meta["frame_indices"][0], meta["frame_indices"][0] + 18, 2))
            assert meta["fps"] > 0
            assert not torch.equal(tensors["masked_latents.i2v"], tensors["masked_latents.first_last"])

    # -- index.parquet: one row per sample, pointing at the right tar and position, and caption table
    index = shards.read_index(shard_dir)
    rows = [dict(zip(index, vals)) for vals in zip(*index.values())]
    assert len(rows) == len(on_disk) and {r["key"] for r in rows} == keys
    for r in rows:
        s, (meta, _) = on_disk[r["key"]], decoded[r["key"]]
        assert (r["shard"], r["position"], r["bucket"]) == (s["tar"], s["position"], meta["bucket"])
        for col in ("source", "caption", "kind", "frames", "height", "width", "latent_frames", "tokens", "view",
                    "prompt"):
            assert r[col] == meta[col], col

    # -- caption tables: each distinct caption's embedding stored once, listed in the manifest with its size
    tables = {t: load_file(str(shard_dir / t)) for t in manifest["prompt_tables"]}
    assert {t: (shard_dir / t).stat().st_size for t in tables} == manifest["prompt_tables"]
    assert manifest["shard_bytes"] == {t: (shard_dir / t).stat().st_size for t in manifest["shards"]}
    stored = [k for table in tables.values() for k in table]
    assert sorted(stored) == sorted({r["prompt"] for r in rows}) and len(stored) == len(set(stored))
    assert all(r["prompt"] in tables[r["prompt_table"]] for r in rows)

    # -- the trainer's reader (wids, indexed) gives the same samples at the index's positions
    dataset = CachedSamples(shard_dir, manifest)
    assert len(dataset) == len(rows)
    for r in rows:
        item = dataset[(dataset.global_index(r["shard"], r["position"]), 0)]
        meta, tensors = decoded[r["key"]]
        assert item["meta"] == meta
        assert all(torch.equal(item["tensors"][k], tensors[k]) for k in tensors)
        assert torch.equal(item["tensors"]["prompt_embeds"], tables[r["prompt_table"]][r["prompt"]])
        tensors["prompt_embeds"] = item["tensors"]["prompt_embeds"]

    # -- a video (with truncated long caption) and an image equal a direct encode of the same frames
    data_dir = Path(cfg.train_data_dir)
    by_source = {meta["source"]: (meta, tensors) for meta, tensors in decoded.values()}
    for source in ("videos/square.mp4", "videos/landscape.mp4", "images/landscape.jpg"):
        meta, tensors = by_source[source]
        resize_hw, crop_box = tuple(meta["resize_hw"]), tuple(meta["crop_box"])
        if meta["kind"] == "video":
            frames = video.decode_video(data_dir / source, meta["frame_indices"], resize_hw, crop_box)
        else:
            frames = video.decode_image(data_dir / source, resize_hw, crop_box)
        pixels = video.frames_to_tensor(frames)[None]
        mean, logvar = models.encode_clips(vae, pixels)
        assert torch.equal(tensors["latent_mean"], mean[0].to(torch.bfloat16)), source
        assert torch.equal(tensors["latent_logvar"], logvar[0].to(torch.bfloat16)), source
        for policy, geometry in meta["masks"].items():  # the stored geometry rebuilds the encoded mask
            masked = models.encode_clips(vae, masked_clip(pixels, policy, geometry))[0][0].to(torch.bfloat16)
            assert torch.equal(tensors[f"masked_latents.{policy}"], masked), (source, policy)
        prompt = models.encode_prompts(tokenizer, t5, [meta["caption"]])[0].to(torch.bfloat16)
        assert torch.equal(tensors["prompt_embeds"], prompt), source

    # -- the all -1 clip's latents, once per bucket (the reference's 10 % of all-masked steps)
    black = load_file(str(shard_dir / shards.BLACK_LATENTS))
    assert set(black) == set(manifest["buckets"])
    for name, b in manifest["buckets"].items():
        want = models.encode_clips(vae, masks.black_clip(b["frames"], b["height"], b["width"]))[0][0]
        assert torch.equal(black[name], want.to(torch.bfloat16)), name

    # -- the empty-caption embedding, stored once
    null = load_file(str(shard_dir / shards.NULL_PROMPT))
    assert set(null) == {"prompt_embeds"} and null["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(null["prompt_embeds"], models.encode_prompts(tokenizer, t5, [""])[0].to(torch.bfloat16))

    # -- bytes on disk vs tensor payload. On real samples (MBs each) the tar overhead is ~1 %;
    # these tiny samples (15-40 KB) pay 512 B per tar header, the JSON, the safetensors header and
    # tarfile's padding of every tar to a 10 KiB record, so the ratio is higher here.
    disk = sum(manifest["shard_bytes"].values()) + sum(manifest["prompt_tables"].values())
    tensor_bytes = sum(t.numel() * t.element_size() for _, ts in decoded.values() for k, t in ts.items()
                       if k != "prompt_embeds")
    tensor_bytes += sum(t.numel() * t.element_size() for table in tables.values() for t in table.values())
    ratio = disk / tensor_bytes
    print(f"bytes on disk / tensor payload: {disk} / {tensor_bytes} = {ratio:.3f}")
    assert 1.0 < ratio < 1.5


# ---------------------------------------------------------------------------------------------- 2. ranks

def test_two_machines_equal_one_rank(base, tmp_path):
    """2 "machines" on localhost (1 process each, DDP over gloo), each with its own media cache,
    read the dataset from an HTTP server and precompute into one shared shard dir."""
    from cogfun.testing import HTTPShardServer

    cfg, _ = base
    out = tmp_path / "shards2"
    data = Path(cfg.train_data_meta).parent
    env = child_env()
    env["ACCELERATE_USE_CPU"] = "true"
    port = free_port()
    procs = []
    with HTTPShardServer(data) as server:
        for machine in (0, 1):
            cfg2 = dataclasses.replace(cfg, shard_dir=str(out), train_data_meta=f"{server.url}/metadata.json",
                                       train_data_dir=None, media_cache_dir=str(tmp_path / f"node{machine}"))
            cmd = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                   "cli.py", "precompute", *cli_args(cfg2)]
            log = open(tmp_path / f"machine{machine}.log", "w+")
            procs.append((log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
        for log, proc in procs:
            try:
                proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
            log.seek(0)
            assert proc.returncode == 0, f"exit {proc.returncode}\n{log.read()[-6000:]}"
        gets = server.gets
    # every media file fetched once, by the machine probing and encoding it, into its own cache
    rows = json.loads(Path(cfg.train_data_meta).read_text())
    assert all(gets[r["file_path"]] == 1 for r in rows), gets
    cached = [{p.name for p in (tmp_path / f"node{m}").rglob("*") if p.is_file()} for m in (0, 1)]
    assert cached[0] and cached[1] and not cached[0] & cached[1]

    one, two = shards.read_manifest(cfg.shard_dir), shards.read_manifest(out)
    # the world size is not an input; only the sources' versions differ (HTTP Last-Modified, not mtime)
    assert {k: v for k, v in two["fingerprint_parts"].items() if k != "inputs"} == \
        {k: v for k, v in one["fingerprint_parts"].items() if k != "inputs"}
    assert two["inputs"].keys() == one["inputs"].keys()
    assert {k: v["count"] for k, v in two["buckets"].items()} == {k: v["count"] for k, v in one["buckets"].items()}
    assert two["skipped"] == one["skipped"]
    tars = [Path(s).name for s in two["shards"]]
    assert any(t.startswith("000-") for t in tars) and any(t.startswith("001-") for t in tars), tars
    a, b = read_tars(Path(cfg.shard_dir)), read_tars(out)
    assert set(a) == set(b)

    def without_input(p):
        # the source's version (and so the sample's recipe, which hashes it) is HTTP's, not the file's mtime
        return {k: ({**json.loads(j), "input": None, "recipe": None}, t) for k, (j, t) in p.items()}

    assert without_input(payload(a)) == without_input(payload(b))   # same metadata and bit-identical tensors
    ia, ib = shards.read_index(cfg.shard_dir), shards.read_index(out)
    assert sorted(zip(ia["key"], ia["bucket"], ia["prompt"])) == sorted(zip(ib["key"], ib["bucket"], ib["prompt"]))
    from safetensors.torch import load_file

    def embeddings(d):
        return {k: v for t in shards.read_manifest(d)["prompt_tables"] for k, v in load_file(str(Path(d) / t)).items()}

    ea, eb = embeddings(cfg.shard_dir), embeddings(out)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)   # each caption once, same bytes
    assert {Path(t).name[:3] for t in two["prompt_tables"]} == {"000", "001"}       # shared out over the ranks


# ---------------------------------------------------------------------------------------------- 3. reuse

def test_reuse_incremental_and_mismatch(tiny_model_inp, synthetic_data, tmp_path):
    meta = copy_dataset(synthetic_data, tmp_path / "data")
    shard_dir = tmp_path / "shards"
    cfg = make_cfg(tiny_model_inp, meta, shard_dir)
    first = precompute(cfg, progress=False)
    assert first["status"] == "fresh" and first["encoded"] == 7
    before = mtimes(shard_dir)
    manifest_bytes = (shard_dir / shards.MANIFEST).read_bytes()

    # same command again: nothing to do, nothing touched
    again = precompute(cfg, progress=False)
    assert again["status"] == "up to date" and again["encoded"] == 0 and again["samples"] == 7
    assert mtimes(shard_dir) == before

    # settings that do not change the bytes do not invalidate the shards
    same = precompute(dataclasses.replace(cfg, dataloader_num_workers=1, probe_workers=1,
                                          decode_timeout=30.0, shard_max_samples=3), progress=False)
    assert same["status"] == "up to date" and same["encoded"] == 0
    # VAE slicing (--low_vram) encodes one sample at a time: the same bytes as vae_mini_batch=1
    sliced = precompute(dataclasses.replace(cfg, vae_mini_batch=4, low_vram=True), progress=False)
    assert sliced["status"] == "up to date"
    assert mtimes(shard_dir) == before
    # a batched VAE encode moves the last bits: it is a different cache
    with pytest.raises(ShardError, match=re.escape("settings.vae_batch: 1 -> 2")):
        precompute(dataclasses.replace(cfg, vae_mini_batch=2), progress=False)

    # a byte-relevant setting: refused, naming the key and both values; nothing touched
    with pytest.raises(ShardError, match=re.escape("settings.video_sample_size: 64 -> 96")):
        precompute(dataclasses.replace(cfg, video_sample_size=96), progress=False)
    with pytest.raises(ShardError, match=re.escape("settings.mask_policies: ['i2v', 'first_last', 'block'] -> ['i2v']")):
        precompute(dataclasses.replace(cfg, mask_policies="i2v"), progress=False)
    assert mtimes(shard_dir) == before

    # a new source: only its sample is encoded, the old tars stay as they are
    shutil.copy(meta.parent / "videos/landscape.mp4", meta.parent / "videos/landscape_copy.mp4")
    rows = json.loads(meta.read_text())
    rows.append({"file_path": "videos/landscape_copy.mp4", "text": "A copied clip with a new caption.",
                 "type": "video"})
    meta.write_text(json.dumps(rows))
    old_tars = {k: v for k, v in before.items() if k.endswith(".tar")}
    inc = precompute(cfg, progress=False)
    assert inc["status"] == "incremental" and inc["encoded"] == 1 and inc["samples"] == 8
    after = mtimes(shard_dir)
    assert {k: after[k] for k in old_tars} == old_tars
    manifest = shards.read_manifest(shard_dir)
    assert manifest["num_samples"] == 8 and "videos/landscape_copy.mp4" in manifest["inputs"]
    listed = {s for b in manifest["buckets"].values() for s in b["shards"]}
    assert set(old_tars) < listed and listed == set(manifest["shards"])
    index = shards.read_index(shard_dir)
    assert len(index["key"]) == 8 and "A copied clip with a new caption." in index["caption"]
    assert set(index["key"]) == expected_keys(cfg)
    assert precompute(cfg, progress=False)["status"] == "up to date"

    manifest_bytes = (shard_dir / shards.MANIFEST).read_bytes()
    # the type of an existing source changed (it decides how the file is decoded): refused
    retyped = [dict(r, type="video") if r["file_path"] == "images/square.png" else r for r in rows]
    meta.write_text(json.dumps(retyped))
    with pytest.raises(ShardError, match=r"source changed.*images/square\.png"):
        precompute(cfg, progress=False)

    # the caption of an existing source changed: refused, naming the source
    rows[1]["text"] = "A different caption for the portrait clip."
    meta.write_text(json.dumps(rows))
    with pytest.raises(ShardError, match=r"source changed.*videos/portrait\.mp4"):
        precompute(cfg, progress=False)
    assert (shard_dir / shards.MANIFEST).read_bytes() == manifest_bytes

    # --overwrite: everything re-encoded with the new settings and captions
    over = precompute(dataclasses.replace(cfg, video_sample_size=96, image_sample_size=96, overwrite=True),
                      progress=False)
    assert over["status"] == "overwrite" and over["encoded"] == over["samples"] == 8
    manifest = shards.read_manifest(shard_dir)
    assert manifest["config"]["video_sample_size"] == 96
    assert "64x64x9" not in manifest["buckets"] and "96x96x9" in manifest["buckets"]
    assert not (shard_dir / "64x64x9").exists()      # the old buckets were removed
    assert "A different caption for the portrait clip." in shards.read_index(shard_dir)["caption"]
    assert set(read_tars(shard_dir)) == set(shards.read_index(shard_dir)["key"])

    # inpaint and i2v cache the same tensors: one shard dir serves both
    i2v = dataclasses.replace(cfg, video_sample_size=96, image_sample_size=96, train_mode="i2v")
    assert precompute(i2v, progress=False)["status"] == "up to date"
    # a tar the manifest lists has gone: refused, never "up to date"
    next(shard_dir.glob("*/*.tar")).unlink()
    with pytest.raises(ShardError, match="gone"):
        precompute(i2v, progress=False)


def test_overwrite_encodes_only_the_samples_whose_own_inputs_changed(tiny_model_inp, synthetic_data, tmp_path):
    """--overwrite after a change keeps every sample the change does not touch (their tars untouched or
    their bytes copied), encodes the others, and gives the shards a fresh run with the new settings gives."""
    meta = copy_dataset(synthetic_data, tmp_path / "data")
    cfg = make_cfg(tiny_model_inp, meta, tmp_path / "shards", mask_policies="i2v,block")
    assert precompute(cfg, progress=False)["encoded"] == 7
    images = {k for k, v in read_tars(cfg.shard_dir).items() if json.loads(v["json"])["kind"] == "image"}
    image_tars = {k: v for k, v in mtimes(cfg.shard_dir).items() if k.startswith("64x64x1/")}
    assert len(images) == 3 and image_tars

    # the frame stride changes the videos' windows, not the images: only the videos are encoded again
    strided = dataclasses.replace(cfg, video_sample_stride=1, overwrite=True)
    over = precompute(strided, progress=False)
    assert over["status"] == "overwrite" and over["encoded"] == over["samples"] - len(images)
    assert {k: v for k, v in mtimes(cfg.shard_dir).items() if k.startswith("64x64x1/")} == image_tars
    fresh_dir = tmp_path / "fresh"
    precompute(dataclasses.replace(strided, shard_dir=str(fresh_dir), overwrite=False), progress=False)
    assert payload(read_tars(cfg.shard_dir)) == payload(read_tars(fresh_dir))
    assert shards.read_index(cfg.shard_dir)["key"] == shards.read_index(fresh_dir)["key"]
    assert precompute(dataclasses.replace(strided, overwrite=False), progress=False)["status"] == "up to date"

    # one caption changed: that sample alone is encoded again (its tar-mates are copied, bytes unchanged)
    rows = json.loads(meta.read_text())
    rows[0]["text"] = "A new caption for the first clip."
    meta.write_text(json.dumps(rows))
    before = payload(read_tars(cfg.shard_dir))
    recaptioned = precompute(strided, progress=False)
    assert recaptioned["encoded"] == 1 and recaptioned["samples"] == over["samples"]
    after = payload(read_tars(cfg.shard_dir))
    changed = sorted(k for k in after if after[k] != before[k])
    assert len(changed) == 1 and json.loads(after[changed[0]][0])["caption"] == "A new caption for the first clip."

    # a tar the manifest lists has gone: --overwrite encodes its samples alone
    gone = next(Path(cfg.shard_dir).glob("*/*.tar"))
    lost = sum(1 for sample in read_tars(cfg.shard_dir).values() if sample["tar"] == str(gone.relative_to(cfg.shard_dir)))
    gone.unlink()
    with pytest.raises(ShardError, match="gone"):
        precompute(dataclasses.replace(strided, overwrite=False), progress=False)
    rebuilt = precompute(strided, progress=False)
    assert rebuilt["status"] == "overwrite" and rebuilt["encoded"] == lost and payload(read_tars(cfg.shard_dir)) == after


# ---------------------------------------------------------------------------------------------- 4. kill + resume

def test_kill_and_resume(tiny_model_inp, synthetic_data, tmp_path):
    cfg = make_cfg(tiny_model_inp, synthetic_data, tmp_path / "killed", num_views=3, shard_max_samples=1)
    shard_dir = Path(cfg.shard_dir)
    cmd = [sys.executable, "cli.py", "precompute", *cli_args(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(shard_dir.glob("*/*.tar")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, \
        f"the run was not killed mid-way (exit {proc.returncode}):\n{out.decode()[-2000:]}\n{err.decode()[-4000:]}"
    assert not (shard_dir / shards.MANIFEST).exists()
    done = read_tars(shard_dir)                        # complete tars only (a .tar.tmp is not one)
    assert done and len(done) < 21
    killed_copy = tmp_path / "killed-copy"
    shutil.copytree(shard_dir, killed_copy)

    # the same command again finishes the job, encoding only what is not in a complete tar
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert ": resume:" in proc.stdout
    encoded = int(re.search(r"encoded (\d+) now", proc.stdout).group(1))
    assert encoded == 21 - len(done)

    # the same result as an uninterrupted run
    clean = dataclasses.replace(cfg, shard_dir=str(tmp_path / "clean"))
    precompute(clean, progress=False)
    resumed, reference = read_tars(shard_dir), read_tars(Path(clean.shard_dir))   # fails on duplicates
    assert len(reference) == 21 and set(resumed) == set(reference)
    assert payload(resumed) == payload(reference)
    for key, s in done.items():                        # complete tars of the killed run were kept
        assert (shard_dir / s["tar"]).exists()
    manifest = shards.read_manifest(shard_dir)
    assert manifest["num_samples"] == 21 and sorted(manifest["shards"]) == sorted(
        str(p.relative_to(shard_dir)) for p in shard_dir.glob("*/*.tar"))
    for tar in shard_dir.glob("*/*.tar"):
        with tarfile.open(tar) as tf:
            assert all(m.isfile() for m in tf.getmembers())
    assert not list(shard_dir.rglob("*.tmp")), list(shard_dir.rglob("*.tmp"))
    assert not (shard_dir / shards.INTENT).exists()
    # nothing of the killed run's scratch is left: the same entries as the clean run's dir
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted(p.name for p in Path(clean.shard_dir).iterdir())
    assert precompute(cfg, progress=False)["status"] == "up to date"

    # leftovers made with OTHER settings and no manifest: refused, not trusted
    before = mtimes(killed_copy)
    with pytest.raises(ShardError, match=re.escape("settings.video_sample_size: 64 -> 96")):
        precompute(dataclasses.replace(cfg, shard_dir=str(killed_copy), video_sample_size=96), progress=False)
    assert mtimes(killed_copy) == before

    # a caption changed after the crash: the leftover samples of that source are not reused
    source = json.loads(next(iter(done.values()))["json"])["source"]
    rows = json.loads(Path(synthetic_data).read_text())
    for row in rows:
        if row["file_path"] == source:
            row["text"] = "A caption written after the crash."
    meta2 = tmp_path / "meta2.json"
    meta2.write_text(json.dumps(rows))
    fixed = precompute(dataclasses.replace(cfg, shard_dir=str(killed_copy), train_data_meta=str(meta2)),
                       progress=False)
    assert fixed["samples"] == 21
    for key, s in read_tars(killed_copy).items():
        meta = json.loads(s["json"])
        if meta["source"] == source:
            assert meta["caption"] == "A caption written after the crash."
    index = shards.read_index(killed_copy)
    assert {c for s, c in zip(index["source"], index["caption"]) if s == source} == {"A caption written after the crash."}

    # tars with no manifest and no record of their settings: refused
    orphan = tmp_path / "orphan"
    shutil.copytree(Path(clean.shard_dir), orphan)
    (orphan / shards.MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest"):
        precompute(dataclasses.replace(cfg, shard_dir=str(orphan)), progress=False)


# ---------------------------------------------------------------------------------------------- 5. bad inputs

BAD_REASONS = {
    "videos/missing.mp4": "file not found",
    "videos/empty.mp4": "empty file (0 bytes)",
    "videos/corrupt.mp4": "cannot decode video",
    "videos/two_frames.mp4": "video too short",
    "images/garbage.png": "cannot read image",
    "audio/clip.wav": "type must be 'video' or 'image'",
    "videos/good.mp4": "no text",            # row 8 repeats the good clip without a caption
    "<row 9>": "no file_path",
}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    from cogfun.tiny import write_bad_dataset

    return write_bad_dataset(tmp_path_factory.mktemp("bad") / "data")


def check_bad_skips(skipped: list[dict]) -> None:
    got = {(s["file_path"], s["reason"]) for s in skipped}
    assert len(got) == len(BAD_REASONS), sorted(got)
    for path, reason in got:
        assert BAD_REASONS[path] in reason, (path, reason)


def test_bad_inputs_are_skipped_with_reasons(tiny_model_inp, bad_data, tmp_path):
    cfg = make_cfg(tiny_model_inp, bad_data, tmp_path / "shards")
    result = CliRunner().invoke(cli.main, ["precompute", *cli_args(cfg)])
    assert result.exit_code == 0, (result.output, result.exception)
    manifest = shards.read_manifest(cfg.shard_dir)
    check_bad_skips(manifest["skipped"])
    index = shards.read_index(cfg.shard_dir)
    assert sorted(index["source"]) == ["images/good.png", "videos/good.mp4"]
    assert "skipped 8 source(s)" in result.output and "videos/corrupt.mp4" in result.output


def test_malformed_metadata_is_a_clean_error(tiny_model_inp, tmp_path):
    meta = tmp_path / "metadata.json"
    meta.write_text('[\n  {"file_path": "a.mp4", "text": "x", "type": "video"},\n  {"file_path": "b.mp4" "text": "y"}\n]\n')
    cfg = make_cfg(tiny_model_inp, meta, tmp_path / "shards")
    result = CliRunner().invoke(cli.main, ["precompute", *cli_args(cfg)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert str(meta) in result.output and "line 3" in result.output, result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- 6. decode timeout

@pytest.mark.parametrize("workers", [0, 1])
def test_decode_timeout_skips_the_clip(tiny_model_inp, synthetic_data, tmp_path, monkeypatch, workers):
    from cogfun import video

    real = video.decode_video

    def stuck_on_portrait(path, *args, **kwargs):
        if str(path).endswith("videos/portrait.mp4"):
            time.sleep(60)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(video, "decode_video", stuck_on_portrait)   # forked workers inherit it
    cfg = make_cfg(tiny_model_inp, synthetic_data, tmp_path / "shards", decode_timeout=2.0,
                   dataloader_num_workers=workers)
    t0 = time.time()
    summary = precompute(cfg, progress=False)
    assert time.time() - t0 < 40
    reasons = {s["file_path"]: s["reason"] for s in summary["skipped"]}
    assert "timed out" in reasons["videos/portrait.mp4"], reasons
    assert summary["encoded"] == summary["samples"] == 6
    sources = set(shards.read_index(cfg.shard_dir)["source"])
    assert "videos/portrait.mp4" not in sources and "videos/landscape.mp4" in sources and len(sources) == 6


# ---------------------------------------------------------------------------------------------- 7. disk full

def test_disk_full_keeps_the_previous_manifest(tiny_model_inp, synthetic_data, tmp_path, monkeypatch):
    import safetensors.torch
    import webdataset
    from safetensors import SafetensorError

    meta = copy_dataset(synthetic_data, tmp_path / "data")
    cfg = make_cfg(tiny_model_inp, meta, tmp_path / "shards")
    precompute(cfg, progress=False)
    shard_dir = Path(cfg.shard_dir)
    committed = {name: (shard_dir / name).read_bytes() for name in (shards.MANIFEST, shards.INDEX, shards.NULL_PROMPT)}
    old_tars = {k: v for k, v in mtimes(shard_dir).items() if k.endswith(".tar")}

    shutil.copy(meta.parent / "images/square.png", meta.parent / "images/square2.png")
    rows = json.loads(meta.read_text()) + [{"file_path": "images/square2.png", "text": "A second square.",
                                            "type": "image"}]
    meta.write_text(json.dumps(rows))

    def tar_write_fails(code, text):
        def write(self, obj):
            raise OSError(code, text)
        return webdataset.TarWriter, "write", write

    def table_write_fails(tensors, filename, metadata=None):   # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    failures = [(tar_write_fails(errno.ENOSPC, "No space left on device"), "No space left on device"),
                (tar_write_fails(errno.EACCES, "Permission denied"), "Permission denied"),
                ((safetensors.torch, "save_file", table_write_fails), "No space left on device")]
    for (owner, name, fake), message in failures:
        with monkeypatch.context() as m:
            m.setattr(owner, name, fake)
            result = CliRunner().invoke(cli.main, ["precompute", *cli_args(cfg)])
        assert result.exit_code == 1, (message, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), result.exception   # a clean click error
        assert message in result.output and "Traceback" not in result.output, result.output
        for name, data in committed.items():
            assert (shard_dir / name).read_bytes() == data, name          # the previous commit stands
        if owner is webdataset.TarWriter:       # (a failed caption-table / null-prompt write may follow complete
            assert {k: v for k, v in mtimes(shard_dir).items() if k.endswith(".tar")} == old_tars  # new tars)
        # the open tar (or the caption table being written) was dropped
        assert not list(shard_dir.rglob("*.tmp")), list(shard_dir.rglob("*.tmp"))

    # space again: the same command completes the incremental run
    result = CliRunner().invoke(cli.main, ["precompute", *cli_args(cfg)])
    assert result.exit_code == 0, (result.output, result.exception)
    # (the last failure came after the new clip's tar was complete: it is kept, not encoded again)
    assert ": incremental:" in result.output and "encoded 0 now" in result.output
    assert shards.read_manifest(shard_dir)["num_samples"] == 8


# ---------------------------------------------------------------------------------------------- 8. no pickles

class _Planted:
    """Unpickling this creates the file `path` (as any pickle can run code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_refused_not_loaded(base, tmp_path):
    import webdataset as wds

    from cogfun.loader import CachedSamples

    # the payload is live: unpickling it does create the file
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Planted(control))).close()
    assert control.exists()

    cfg, _ = base
    shard_dir = tmp_path / "shards"
    shutil.copytree(cfg.shard_dir, shard_dir)
    marker = tmp_path / "pwned"
    manifest = shards.read_manifest(shard_dir)
    tar = next(s for s, n in manifest["shards"].items() if n == 1)
    (key, sample), = ((k, v) for k, v in read_tars(shard_dir).items() if v["tar"] == tar)
    with wds.TarWriter(str(shard_dir / tar)) as writer:
        writer.write({"__key__": key, "json": sample["json"], "safetensors": sample["safetensors"],
                      "pth": pickle.dumps(_Planted(marker))})

    raw = next(iter(wds.WebDataset(str(shard_dir / tar), shardshuffle=False)))
    assert set(raw) >= {"json", "safetensors", "pth"}
    with pytest.raises(ShardError, match="pth"):
        shards.decode_sample(raw)
    dataset = CachedSamples(shard_dir, manifest)
    with pytest.raises(ShardError, match="nothing is ever unpickled"):
        dataset[(dataset.global_index(tar, 0), 0)]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- 9. inspect-buckets

def test_inspect_buckets_from_shards_matches_manifest(base):
    cfg, _ = base
    result = CliRunner().invoke(cli.main, ["inspect-buckets", "--shard_dir", cfg.shard_dir, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.output)
    manifest = shards.read_manifest(cfg.shard_dir)
    assert {b["name"]: b["count"] for b in report["buckets"]} == {k: v["count"] for k, v in manifest["buckets"].items()}
    assert report["total"]["samples"] == manifest["num_samples"]
    assert report["skipped"] == manifest["skipped"]
    on_disk = sum((Path(cfg.shard_dir) / s).stat().st_size for s in [*manifest["shards"], *manifest["prompt_tables"]])
    assert abs(report["total"]["bytes"] - on_disk) <= len(report["buckets"])   # caption tables shared out, rounded
    assert report["total"]["fingerprint"] == manifest["fingerprint"]


def test_inspect_buckets_from_dataset_follows_the_rules(synthetic_data, bad_data):
    from cogfun.buckets import Sampling, bucket_hw, floor_4k1, frame_budget, tokens_per_sample
    from cogfun.tiny import synthetic_clips, synthetic_images

    flags = ["--train_data_dir", str(Path(synthetic_data).parent), "--video_sample_size", "64",
             "--image_sample_size", "64", "--token_sample_size", "64", "--video_sample_n_frames", "9",
             "--video_sample_stride", "2", "--enable_bucket", "--probe_workers", "2", "--json"]
    result = CliRunner().invoke(cli.main, ["inspect-buckets", "--train_data_meta", str(synthetic_data), *flags])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.output)

    # expected from the rules (DESIGN §3) and the sizes the clips were written with
    s = Sampling(image_sample_size=64, video_sample_size=64, token_sample_size=64, video_sample_stride=2,
                 video_sample_n_frames=9, enable_bucket=True)
    expected: dict[str, int] = {}
    for clip in synthetic_clips(seed=0) + synthetic_images(seed=0):
        h, w = bucket_hw(clip.height, clip.width, 64, True)
        f = 1 if clip.fps == 0 else floor_4k1(min(frame_budget(s, 64), (clip.frames - 1) // 2 + 1))
        if f < 5 and clip.fps:
            continue                                        # the 6-frame clip: 3 frames at stride 2
        expected[f"{h}x{w}x{f}"] = expected.get(f"{h}x{w}x{f}", 0) + 1
    # the same by hand: nearest ratio key of the 512 table, scaled by 64/512, floored to 16
    # 96x160 -> 0.6:[384,640] -> 48x80; 160x96 -> 1.67:[640,384] -> 80x48; 128x128 -> 64x64;
    # 48x192 -> 0.25:[256,1024] -> 32x128; images 144x96 -> 1.46:[608,416] -> 76x52 -> 64x48,
    # 96x144 -> 0.68:[416,608] -> 52x76 -> 48x64, 80x80 -> 64x64; videos 24 (36) frames -> 9.
    assert expected == {"48x80x9": 1, "80x48x9": 1, "64x64x9": 1, "32x128x9": 1,
                        "64x48x1": 1, "48x64x1": 1, "64x64x1": 1}
    assert {b["name"]: b["count"] for b in report["buckets"]} == expected
    for b in report["buckets"]:
        assert b["tokens"] == tokens_per_sample(b["frames"], b["height"], b["width"])
    assert b["tokens"] == ((b["frames"] - 1) // 4 + 1) * (b["height"] // 16) * (b["width"] // 16)
    assert [x["file_path"] for x in report["skipped"]] == ["videos/short.mp4"]

    result = CliRunner().invoke(cli.main, ["inspect-buckets", "--train_data_meta", str(bad_data),
                                           "--train_data_dir", str(Path(bad_data).parent), *flags[2:]])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.output)
    check_bad_skips(report["skipped"])
    assert report["total"]["samples"] == 2


# ---------------------------------------------------------------------------------------------- 10. real-world media

def test_real_world_media_and_caption_variants(tiny_model_t2v, tmp_path):
    """The media zoo (every kind of file, cogfun.tiny.write_media_zoo) with a clip listed under two
    captions and one row repeated: one sample per (file, caption), the decoders other than the
    default, the warnings and the skips per reason in the summary, the manifest and inspect-buckets
    (from the dataset and from the shards alike); adding a caption variant is incremental, changing
    one is a changed source."""
    from cogfun.tiny import write_media_zoo

    meta = write_media_zoo(tmp_path / "data")
    rows = json.loads(meta.read_text())
    h264 = next(r for r in rows if r["file_path"] == "zoo/h264.mp4")
    rows += [dict(h264, text="The same clip, described another way."), dict(h264)]   # a variant, a repeat
    meta.write_text(json.dumps(rows))
    cfg = make_cfg(tiny_model_t2v, meta, tmp_path / "shards", video_sample_size=32, image_sample_size=32,
                   token_sample_size=32, video_sample_n_frames=5, train_mode="normal")
    result = CliRunner().invoke(cli.main, ["precompute", *cli_args(cfg)])
    assert result.exit_code == 0, (result.output, result.exception)
    manifest = shards.read_manifest(cfg.shard_dir)
    expected_skips = {"no video stream": 2, "zero frames": 1, "corrupt": 1, "too small": 1, "duplicate row": 1}
    assert manifest["skipped_by_reason"] == expected_skips
    assert manifest["decoders"] == {
        "pillow": ["zoo/anim.gif", "zoo/anim.png", "zoo/anim.webp"], "pillow-heif": ["zoo/photo.heic"],
        "pyav": ["zoo/av1.mp4", "zoo/h264.mkv", "zoo/hevc10.mp4", "zoo/mpeg1.mpg", "zoo/rot90_hflip.mp4",
                 "zoo/vp9.webm"]}
    assert [w["file_path"] for w in manifest["warnings"]] == ["zoo/cut_marker.jpg"]
    assert "read with pyav: 6 source(s)" in result.output and "warning zoo/cut_marker.jpg: truncated JPEG" in result.output
    assert "skipped 6 source(s) (no video stream 2, corrupt 1, duplicate row 1, too small 1, zero frames 1)" \
        in result.output
    index = shards.read_index(cfg.shard_dir)
    assert len(index["key"]) == manifest["num_samples"] == len(rows) - 6 == len(set(index["key"]))
    assert sorted(c for s, c in zip(index["source"], index["caption"]) if s == "zoo/h264.mp4") == sorted(
        ["The zoo's h264.mp4.", "The same clip, described another way."])
    metas = [json.loads(s["json"]) for s in read_tars(Path(cfg.shard_dir)).values()]
    assert {m["identity"] for m in metas if m["source"] == "zoo/h264.mp4"} == {"zoo/h264.mp4", "zoo/h264.mp4#2"}
    assert {m["decoder"] for m in metas if m["source"] == "zoo/mpeg1.mpg"} == {"pyav"}

    from cogfun.config import InspectConfig

    from_data = cli_args(dataclasses.replace(cfg, shard_dir=None, pretrained_model_name_or_path=None), InspectConfig)
    for args in (["--shard_dir", cfg.shard_dir], from_data):
        report = CliRunner().invoke(cli.main, ["inspect-buckets", "--json", *args])
        assert report.exit_code == 0, (report.output, report.exception)
        report = json.loads(report.output)
        assert report["skipped_by_reason"] == expected_skips and report["decoders"] == manifest["decoders"]
        assert report["warnings"] == manifest["warnings"] and report["total"]["samples"] == manifest["num_samples"]

    rows.append(dict(h264, text="A third caption for the same clip."))
    meta.write_text(json.dumps(rows))
    inc = precompute(cfg, progress=False)
    assert inc["status"] == "incremental" and inc["encoded"] == 1
    assert "zoo/h264.mp4#3" in shards.read_manifest(cfg.shard_dir)["inputs"]
    rows[-3]["text"] = "The second caption, changed."
    meta.write_text(json.dumps(rows))
    with pytest.raises(ShardError, match=re.escape("source changed (size, mtime, caption or type): zoo/h264.mp4#2")):
        precompute(cfg, progress=False)


def test_skipped_sources_are_retried_when_cogfun_may_read_them_now(tiny_model_inp, synthetic_data, tmp_path):
    """A finished shard dir whose fingerprint matches is incremental, not up to date, when it
    skipped sources this run may read: images over a lower --max_image_pixels, or anything but row
    errors when an older cogfun (fewer readers) made it. Only those are encoded."""
    from cogfun.video import MEDIA_READERS

    cfg = make_cfg(tiny_model_inp, synthetic_data, tmp_path / "shards", max_image_pixels=10_000)
    first = precompute(cfg, progress=False)   # the 144x96 PNG and JPEG (13,824 px) are too large
    assert first["skipped_by_reason"] == {"too large": 2, "too short": 1} and first["samples"] == 5
    assert "--max_image_pixels" in first["skipped"][0]["reason"]
    assert precompute(cfg, progress=False)["status"] == "up to date"
    cfg = dataclasses.replace(cfg, max_image_pixels=20_000)
    raised = precompute(cfg, progress=False)
    assert raised["status"] == "incremental" and raised["encoded"] == 2 and raised["samples"] == 7
    assert raised["fingerprint"] == first["fingerprint"]
    assert precompute(cfg, progress=False)["status"] == "up to date"

    manifest_path = Path(cfg.shard_dir) / shards.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["media_readers"] == MEDIA_READERS
    del manifest["media_readers"]                        # as written by the cogfun before it
    manifest["skipped"] = [{k: v for k, v in s.items() if k != "category"} for s in manifest["skipped"]]
    manifest_path.write_text(json.dumps(manifest))
    again = precompute(cfg, progress=False)              # the short clip is probed again, still too short
    assert again["status"] == "incremental" and again["encoded"] == 0 and again["samples"] == 7
    assert precompute(cfg, progress=False)["status"] == "up to date"


def test_num_views_auto_stores_views_and_an_epoch_shows_one(tiny_model_inp, tiny_model_t2v, synthetic_data, tmp_path):
    """--num_views auto on real clips: 24-frame clips at a 9-frame window get 3 views, the 36-frame one 4, the
    6-frame one (a 5-frame window) 1,
    images 1; the trainer's sampler shows one view of each clip per epoch. An explicit count and its
    string form are the same shards as before (fingerprint)."""
    from cogfun.loader import BucketBatchSampler, CachedSamples, index_rows
    from cogfun.stages.precompute import settings_of

    cfg = make_cfg(tiny_model_t2v, synthetic_data, tmp_path / "auto", train_mode="normal", video_sample_stride=1,
                   num_views="auto")
    precompute(cfg, progress=False)
    index = shards.read_index(cfg.shard_dir)
    views: dict = {}
    for source, view in zip(index["source"], index["view"]):
        views.setdefault(source, set()).add(view)
    assert {s: len(v) for s, v in views.items()} == {
        "videos/landscape.mp4": 3, "videos/portrait.mp4": 3, "videos/square.mp4": 4, "videos/wide.mp4": 3,
        "videos/short.mp4": 1,
        "images/landscape.jpg": 1, "images/portrait.png": 1, "images/square.png": 1}
    manifest = shards.read_manifest(cfg.shard_dir)
    dataset = CachedSamples(cfg.shard_dir, manifest)
    sampler = BucketBatchSampler(index_rows(dataset), batch_size=1, world=1, rank=0,
                                 accumulation=1, seed=0)
    source_of = {dataset.global_index(s, p): (src, v) for s, p, src, v in
                 zip(index["shard"], index["position"], index["source"], index["view"])}
    shown = [source_of[i] for batch in sampler for i, _ in batch]
    assert sorted(s for s, _ in shown) == sorted(views)                      # one view of every clip
    assert settings_of(dataclasses.replace(cfg, num_views="1")) == settings_of(dataclasses.replace(cfg, num_views=1))
    assert "max_views" not in settings_of(dataclasses.replace(cfg, num_views=2))
    assert "mask_design" not in settings_of(cfg) and "mask_design" in settings_of(make_cfg(tiny_model_inp,
                                                                                           synthetic_data, tmp_path))
