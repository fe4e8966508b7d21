"""--masks_per_policy K: K seeded mask geometries per policy and view, cycled across epochs as views are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogfun import masks
from cogfun.config import PrecomputeConfig, TrainConfig
from cogfun.loader import mask_variant

DATA = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
            video_sample_stride=2, enable_bucket=True, train_mode="inpaint", mask_policies="first_n,block",
            num_views=2, seed=42)


def test_geometry_sets_are_seeded_apart_and_set_0_is_the_one_drawn_before():
    policies = ["first_n", "block", "ellipse"]
    base = masks.draw_geometries(policies, 17, 64, 96, seed=3, key="abc_v0")
    assert masks.draw_geometries(policies, 17, 64, 96, seed=3, key="abc_v0", variant=0) == base
    others = [masks.draw_geometries(policies, 17, 64, 96, seed=3, key="abc_v0", variant=k) for k in (1, 2, 3)]
    assert all(o.keys() == base.keys() for o in others)
    assert len({json.dumps(g["block"], sort_keys=True) for g in [base, *others]}) == 4   # four different blocks
    assert masks.cached_name(masks.MASKED, "block") == "masked_latents.block"
    assert masks.cached_name(masks.MASKED, "block", 2) == "masked_latents.block@2"


def test_each_view_meets_each_mask_set_once_per_cycle():
    """Over V x K epochs, a clip's view v (shown at epochs (e + o) mod V == v) is shown with each of its
    K geometry sets exactly once, for any seed, V and K."""
    from cogfun.buckets import sample_key
    from cogfun.loader import view_offset

    for seed in range(5):
        for views, variants in ((1, 4), (2, 2), (3, 4), (4, 3)):
            identity = f"clip{seed}.mp4"
            clip = sample_key(identity, 0).rpartition("_v")[0]
            o = view_offset(seed, clip, views)
            seen = []
            for epoch in range(views * variants):
                view = (epoch + o) % views
                seen.append((view, mask_variant(seed, epoch, sample_key(identity, view), views, variants)))
            assert sorted(seen) == [(v, k) for v in range(views) for k in range(variants)], (seed, views, seen)
    assert mask_variant(0, 7, "x_v0", 3, 1) == 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_inp, synthetic_data):
    from accelerate.state import AcceleratorState

    from cogfun.stages.precompute import precompute

    root = tmp_path_factory.mktemp("mask_variants")
    rows = [r for r in json.loads(synthetic_data.read_text()) if Path(r["file_path"]).name in
            ("landscape.mp4", "portrait.mp4", "square.png")]
    (root / "metadata.json").write_text(json.dumps(rows))
    out = {}
    for k in (1, 2):
        cfg = PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_inp), train_data_meta=str(root / "metadata.json"),
                               train_data_dir=str(synthetic_data.parent), shard_dir=str(root / f"k{k}"),
                               mixed_precision="no", dataloader_num_workers=0, masks_per_policy=k, **DATA)
        out[k] = (cfg, precompute(cfg, progress=False))
    AcceleratorState._reset_state(True)
    return out


def _samples(shard_dir: str) -> list[tuple[dict, dict]]:
    from cogfun.shards import read_index, require_manifest
    from cogfun.storage import ShardStore
    from cogfun.loader import CachedSamples

    store = ShardStore(shard_dir)
    data = CachedSamples(store, require_manifest(store))
    return [(s["meta"], s["tensors"]) for s in (data[(i, 0)] for i in range(len(data)))]


def test_precompute_stores_k_sets_and_keeps_k1_shards_as_before(shards):
    from cogfun.stages.precompute import settings_of

    (cfg1, sum1), (cfg2, sum2) = shards[1], shards[2]
    assert "masks_per_policy" not in settings_of(cfg1) and settings_of(cfg2)["masks_per_policy"] == 2
    assert sum1["fingerprint"] != sum2["fingerprint"]
    one, two = _samples(cfg1.shard_dir), _samples(cfg2.shard_dir)
    assert len(one) == len(two) == 6     # 3 clips x 2 views
    by_key = {(m["identity"], m["view"]): (m, t) for m, t in one}
    for meta, tensors in two:
        m1, t1 = by_key[(meta["identity"], meta["view"])]
        assert "mask_variants" not in m1 and "views" not in m1
        assert meta["masks"] == m1["masks"] and len(meta["mask_variants"]) == 1 and meta["views"] == 2
        assert meta["mask_variants"][0].keys() == meta["masks"].keys()
        for policy in meta["masks"]:
            # set 0: the very latents of K = 1; set 1: another geometry, another encode
            assert torch.equal(tensors[f"masked_latents.{policy}"], t1[f"masked_latents.{policy}"])
            assert tensors[f"masked_latents.{policy}@1"].shape == t1[f"masked_latents.{policy}"].shape
        assert sorted(tensors) == sorted([*t1, *(f"{n}@1" for n in t1 if n.startswith("masked_latents."))])
        if meta["mask_variants"][0]["block"] != meta["masks"]["block"]:
            assert not torch.equal(tensors["masked_latents.block@1"], tensors["masked_latents.block"])


def test_inspect_counts_the_encodes_and_bytes_of_k_sets(shards):
    from click.testing import CliRunner

    from cogfun import cli
    from cogfun.buckets import latent_bytes

    reports, estimates = {}, {}
    for k, (cfg, _) in shards.items():
        result = CliRunner().invoke(cli.main, ["inspect-buckets", "--shard_dir", cfg.shard_dir, "--json"])
        assert result.exit_code == 0, result.output
        reports[k] = json.loads(result.output)
        flags = sum(([f"--{n}", str(v)] for n, v in DATA.items() if n != "enable_bucket"), [])
        result = CliRunner().invoke(cli.main, ["inspect-buckets", "--train_data_meta", cfg.train_data_meta,
                                               "--train_data_dir", cfg.train_data_dir, "--masks_per_policy", str(k),
                                               *flags, "--enable_bucket", "--json"])
        assert result.exit_code == 0, result.output
        estimates[k] = json.loads(result.output)
    for b1, b2, e1, e2 in zip(reports[1]["buckets"], reports[2]["buckets"], estimates[1]["buckets"],
                              estimates[2]["buckets"]):
        cached = b1["encodes_per_sample"] - 1
        assert b2["encodes_per_sample"] == 1 + 2 * cached == e2["encodes_per_sample"]
        # one more latent per cached policy and sample (the shards' tars are padded to 10 KB records)
        assert e2["bytes_per_sample"] - e1["bytes_per_sample"] == cached * latent_bytes(b1["frames"], b1["height"],
                                                                                         b1["width"])
    assert sum(b["bytes"] for b in reports[2]["buckets"]) > sum(b["bytes"] for b in reports[1]["buckets"])
    assert reports[2]["masks"]["masks_per_policy"] == 2
    assert estimates[2]["total"]["vae_encodes"] == reports[2]["total"]["vae_encodes"]
    # 2 videos x 2 views x 2 sets x 2 policies, 1 image x 2 views x 2 sets x 1 policy (block)
    assert estimates[2]["masks"]["conditionings_per_clip_max"] == 8 and estimates[2]["masks"]["cycle_epochs_max"] == 4
    assert estimates[1]["masks"]["conditionings_per_clip_max"] == 4


def test_training_cycles_the_mask_sets(shards, tiny_model_inp, tmp_path, monkeypatch):
    """Each sample is trained on the geometry set mask_variant gives its epoch: over 4 epochs both sets."""
    from cogfun.buckets import sample_key
    from cogfun.stages.train import train

    cfg, _ = shards[2]
    seen = []
    original = masks.conditioning

    def watched(policy, tensors, b, **kw):
        seen.append((policy, kw["variant"]))
        return original(policy, tensors, b, **kw)

    monkeypatch.setattr(masks, "conditioning", watched)
    epochs = []
    import cogfun.stages.train as stage

    batch_inputs = stage.batch_inputs

    def record(batch, **kw):
        for meta in batch["metas"]:
            epochs.append((kw["epoch"], sample_key(meta["identity"], meta["view"]), meta["views"]))
        return batch_inputs(batch, **kw)

    monkeypatch.setattr(stage, "batch_inputs", record)
    result = train(TrainConfig(pretrained_model_name_or_path=str(tiny_model_inp), shard_dir=cfg.shard_dir,
                               output_dir=str(tmp_path / "out"), max_train_steps=12, checkpointing_steps=100,
                               mixed_precision="no", rank=4, network_alpha=2.0, dataloader_num_workers=0,
                               report_to="none", **{**DATA, "mask_policy_weights": "t2v=0"}))
    assert len(result["losses"]) == 12 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert len(seen) == 12 and {v for _, v in seen} == {0, 1}
    expected = [mask_variant(42, e, key, views, 2) for e, key, views in epochs]
    assert [v for _, v in seen] == expected


def test_training_with_upstream_batch_flags(shards, tiny_model_inp, tmp_path, monkeypatch):
    """--auto_tile_batch_size and --keep_all_node_same_token_length in a real run, with the shards'
    token budget N 9 x T 64^2 (from their manifest): a 1 x 64 x 64 image batch is at most 1/4 of it
    and is doubled, the 9 x 48 x 80 video batches are not; T <= 256 draws one length, 256^2 x 9,
    which keeps all 9 frames (3 latent frames) of every bucket."""
    import dataclasses

    from accelerate.state import AcceleratorState

    import cogfun.stages.train as stage
    from cogfun.stages.precompute import precompute
    from cogfun.stages.train import train

    # the token budget is the shards' own: precompute them with --training_with_video_token_length
    # (at V = I = T = 64 the plans are those of the k1 shards)
    cfg = dataclasses.replace(shards[1][0], shard_dir=str(tmp_path / "token_length"),
                              training_with_video_token_length=True)
    precompute(cfg, progress=False)
    AcceleratorState._reset_state(True)
    seen = []
    batch_inputs = stage.batch_inputs

    def record(batch, **kw):
        m = batch["metas"][0]
        seen.append((m["frames"] * m["height"] * m["width"], len(batch["metas"]), kw["keep_at_most"]))
        return batch_inputs(batch, **kw)

    monkeypatch.setattr(stage, "batch_inputs", record)
    result = train(TrainConfig(pretrained_model_name_or_path=str(tiny_model_inp), shard_dir=cfg.shard_dir,
                               output_dir=str(tmp_path / "out"), max_train_steps=6, checkpointing_steps=100,
                               mixed_precision="no", rank=4, network_alpha=2.0, dataloader_num_workers=0,
                               report_to="none", auto_tile_batch_size=True, keep_all_node_same_token_length=True))
    assert len(result["losses"]) == 6 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert len(seen) == 6 and {v for v, _, _ in seen} == {4096, 9 * 48 * 80}   # both kinds were trained
    for volume, size, cap in seen:
        assert size == (2 if volume <= 9 * 64 ** 2 // 4 else 1) and cap == 3, (volume, size, cap)


def test_overwrite_keeps_unchanged_samples_with_several_mask_sets(shards, tmp_path):
    """--overwrite with --masks_per_policy 2: a sample whose own inputs did not change (the image,
    when the frame stride changes) is kept; its recipe covers all its geometry sets."""
    import dataclasses

    from accelerate.state import AcceleratorState

    from cogfun.shards import read_index
    from cogfun.stages.precompute import precompute

    cfg, _ = shards[2]
    shard_dir = tmp_path / "k2"
    shutil.copytree(cfg.shard_dir, shard_dir)
    images = read_index(shard_dir)["kind"].count("image")
    assert images >= 1
    try:
        over = precompute(dataclasses.replace(cfg, shard_dir=str(shard_dir), overwrite=True, video_sample_stride=1),
                          progress=False)
    finally:
        AcceleratorState._reset_state(True)
    assert over["status"] == "overwrite" and over["encoded"] == over["samples"] - images
