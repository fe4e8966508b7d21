"""Every released checkpoint layout, trained the way CogVideoX-Fun trains it.

One module-scoped chain per tiny stand-in of `cogfun.tiny.RELEASED` (2b-InP, V1.1-5b-InP,
V1.5-5b-InP, CogVideoX-2b text-to-video): precompute -> train one epoch with a checkpoint ->
resume from it (same LoRA) -> diffusers' `load_lora_weights` gives the trained model's output.
Then what differs between the layouts: CogVideoX 1.5's frame rule (even latent frame counts in the
shards, shown by inspect-buckets; images padded in the transformer; even random_frame_crop
prefixes), reference-video noise in the cached conditioning (with the key) and not (without), the
fingerprint, and the refusals (shards of another family, Control/Pose models, unknown keys).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cogfun import cli
from cogfun import shards
from cogfun.config import PrecomputeConfig, TrainConfig
from cogfun.models import ModelError, transformer_family
from cogfun.shards import ShardError

VARIANTS = ["2b-inp", "5b-inp-v1.1", "v1.5-5b-inp", "t2v"]
# stride 1 so that the 6-frame clip is a 5-frame sample (2 latent frames: kept as is by the 1.5 rule)
# while the long clips give 9 frames (3 latent frames: 5 under the 1.5 rule); 3 images.
DATA = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
            video_sample_stride=1, enable_bucket=True, mask_policies="i2v,first_last", num_views=1, seed=42,
            mixed_precision="no", dataloader_num_workers=0)
STEPS = 8  # one epoch: every sample (images and videos) is trained on
LORA = dict(rank=4, network_alpha=2.0, learning_rate=1e-3, report_to="none", max_grad_norm=0.05,
            random_frame_crop=True, checkpointing_steps=STEPS // 2, max_train_steps=STEPS)


def train_mode(variant: str) -> str:
    return "normal" if variant == "t2v" else "inpaint"


def run_train(cfg: TrainConfig) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from cogfun.stages.train import train

    try:
        return train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def lora_file(out: Path) -> dict:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from cogfun.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("variants")
    return {v: write_tiny_model(root / v, v, seed=0) for v in VARIANTS}


@pytest.fixture(scope="module", params=VARIANTS)
def chain(request, models, synthetic_data, tmp_path_factory) -> dict:
    """precompute -> train STEPS steps (checkpoint half way) -> resume from the checkpoint."""
    from cogfun.stages.precompute import precompute

    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    common = dict(pretrained_model_name_or_path=str(models[variant]), shard_dir=str(root / "shards"),
                  train_data_meta=str(synthetic_data), train_data_dir=str(synthetic_data.parent),
                  train_mode=train_mode(variant), **DATA)
    precompute(PrecomputeConfig(**common), progress=False)
    full = run_train(TrainConfig(**common, **LORA, output_dir=str(root / "full")))
    resumed_dir = root / "resumed"
    shutil.copytree(root / "full" / f"checkpoint-{STEPS // 2}", resumed_dir / f"checkpoint-{STEPS // 2}")
    resumed = run_train(TrainConfig(**common, **LORA, output_dir=str(resumed_dir),
                                    resume_from_checkpoint="latest"))
    return {"variant": variant, "model": models[variant], "root": root, "shards": root / "shards",
            "full": root / "full", "resumed": resumed_dir, "losses": full["losses"],
            "resumed_losses": resumed["losses"]}


def test_precompute_train_resume(chain):
    manifest = shards.read_manifest(chain["shards"])
    variant = chain["variant"]
    assert manifest["latent_frame_multiple"] == (2 if variant == "v1.5-5b-inp" else 1)
    assert bool(manifest["reference_noise"]) == (variant in ("5b-inp-v1.1", "v1.5-5b-inp"))
    kinds = set(shards.read_index(chain["shards"])["kind"])
    assert kinds == {"video", "image"} and manifest["num_samples"] == STEPS
    losses = chain["losses"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    # resumed at the checkpoint: the same remaining steps and the same LoRA, bit for bit
    assert chain["resumed_losses"] == pytest.approx(losses[STEPS // 2:], rel=1e-6)
    full, resumed = lora_file(chain["full"]), lora_file(chain["resumed"])
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert any(v.abs().max() > 0 for k, v in full.items() if "lora_B" in k)


def test_diffusers_load_lora_weights_gives_the_trained_model(chain):
    """CogVideoXPipeline.load_lora_weights(output_dir) on the released layout = the trained model
    (peft LoRA with the trained tensors), on an image-shaped and a video-shaped input."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
    from peft import set_peft_model_state_dict

    from cogfun.lora import inject_lora
    from cogfun.models import load_transformer

    base = load_transformer(chain["model"], torch.float32)
    ours = load_transformer(chain["model"], torch.float32)
    trained = lora_file(chain["full"])
    inject_lora(ours, rank=4, alpha=2.0, target_name="to_q,to_k,to_v,ff.0,ff.2")
    assert not set_peft_model_state_dict(ours, {k.removeprefix("transformer."): v for k, v in trained.items()}
                                         ).unexpected_keys
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=base,
                             scheduler=CogVideoXDDIMScheduler())
    g = torch.Generator().manual_seed(0)
    cfg = base.config
    text = torch.randn(1, 226, cfg.text_embed_dim, generator=g)
    inputs = [torch.randn(1, f, cfg.in_channels, 8, 10, generator=g) for f in (1, 2)]

    def outputs(model):
        out = []
        for x in inputs:  # positions and the 1.5 padding of a 1-frame input: the loaded model's own
            with torch.no_grad():
                out.append(model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]),
                                 return_dict=False)[0])
        return out

    before = outputs(base)
    pipe.load_lora_weights(str(chain["full"]))
    after, expected = outputs(base), outputs(ours)
    for b, a, e, x in zip(before, after, expected, inputs):
        assert a.shape == (1, x.shape[1], 16, 8, 10)
        assert (a - b).abs().max() > 1e-5                                # the LoRA does something
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)          # exactly ours, alpha/rank applied


# ---------------------------------------------------------------------------------------------- CogVideoX 1.5

@pytest.fixture(scope="module")
def v15(models, synthetic_data, tmp_path_factory) -> Path:
    """V1.5 shards of the synthetic data (the chain's settings, no training)."""
    from cogfun.stages.precompute import precompute

    shard_dir = tmp_path_factory.mktemp("v15") / "shards"
    precompute(PrecomputeConfig(pretrained_model_name_or_path=str(models["v1.5-5b-inp"]), shard_dir=str(shard_dir),
                                train_data_meta=str(synthetic_data), train_data_dir=str(synthetic_data.parent),
                                train_mode="inpaint", **DATA), progress=False)
    return shard_dir


def test_v15_shards_hold_even_latent_frame_counts_only(v15):
    from cogfun.loader import CachedSamples

    index = shards.read_index(v15)
    manifest = shards.read_manifest(v15)
    for kind, frames, lat in zip(index["kind"], index["frames"], index["latent_frames"]):
        assert (lat % 2 == 0) if kind == "video" else (frames, lat) == (1, 1)
    # 9-frame windows became 5 frames (3 -> 2 latent frames), the 5-frame clip stayed, images stay 1 frame
    assert sorted(manifest["buckets"]) == ["32x128x5", "48x64x1", "48x80x5", "64x48x1", "64x64x1", "64x64x5",
                                           "80x48x5"]
    assert manifest["buckets"]["48x80x5"]["count"] == 2          # landscape (trimmed) + short (as is)
    assert manifest["buckets"]["64x64x5"]["tokens"] == 1 * 4 * 4  # 2 latent frames patched together
    dataset = CachedSamples(v15, manifest)
    for i in range(len(dataset)):  # the tensors agree with the index
        sample = dataset[(i, 0)]
        meta = sample["meta"]
        assert sample["tensors"]["latent_mean"].shape[0] == meta["latent_frames"]
        assert meta["frame_indices"] == list(range(meta["frame_indices"][0], meta["frame_indices"][0] + meta["frames"]))


def test_inspect_buckets_shows_the_frame_rule(models, synthetic_data, v15):
    flags = ["inspect-buckets", "--train_data_meta", str(synthetic_data), "--video_sample_size", "64",
             "--image_sample_size", "64", "--token_sample_size", "64", "--video_sample_n_frames", "9",
             "--video_sample_stride", "1", "--enable_bucket", "--train_mode", "inpaint", "--probe_workers", "2",
             "--text_dim", "32"]
    plain = json.loads(CliRunner().invoke(cli.main, [*flags, "--json"]).output)
    result = CliRunner().invoke(cli.main, [*flags, "--json", "--pretrained_model_name_or_path",
                                           str(models["v1.5-5b-inp"])])
    assert result.exit_code == 0, (result.output, result.exception)
    v15_report = json.loads(result.output)
    assert {b["name"] for b in plain["buckets"] if b["videos"]} == {"32x128x9", "48x80x9", "48x80x5", "64x64x9",
                                                                  "80x48x9"}
    assert {b["name"]: b["count"] for b in v15_report["buckets"]} == {
        k: v["count"] for k, v in shards.read_manifest(v15)["buckets"].items()}
    assert any("patch_size_t 2" in n and "4 video sample(s) shortened" in n for n in v15_report["model_notes"])
    assert any("reference noise" in n for n in v15_report["model_notes"]) and not plain["model_notes"]
    # the noise response doubles the cached masked latents: the estimate counts them
    image = next(b for b in v15_report["buckets"] if b["name"] == "64x64x1")
    assert image["bytes"] == next(b for b in plain["buckets"] if b["name"] == "64x64x1")["bytes"] + 2 * 16 * 8 * 8 * 2
    # images cache block + ellipse (2 latents, 4 with the noise); a video the 5 default policies
    assert (image["encodes_per_sample"], next(b for b in v15_report["buckets"] if b["videos"])["encodes_per_sample"]) \
        == (1 + 4, 1 + 10)
    assert plain["masks"] == {"policies": ["first_n", "first_last_n", "block", "block_range", "ellipse"],
                              "image_policies": ["block", "ellipse"], "video_coverage": 0.85, "image_coverage": 1.0,
                              "masks_per_policy": 1, "conditionings_per_clip_max": 5, "cycle_epochs_max": 1,
                              "conditionings_per_clip_mean": plain["masks"]["conditionings_per_clip_mean"]}
    assert 2 <= plain["masks"]["conditionings_per_clip_mean"] < 5   # videos 5 (4 clips), images 2 (3)
    table = CliRunner().invoke(cli.main, ["inspect-buckets", "--shard_dir", str(v15)])
    assert table.exit_code == 0 and "frame rule (patch_size_t 2" in table.output


def test_random_frame_crop_keeps_whole_patches():
    """CogVideoX-Fun's draw: T from 5, 9, ..., N pixel frames (N: the shards' video_sample_n_frames, here
    21 = 6 latents, not the config's default 17), all N 90 % of the time, the rest uniform; a prefix
    of min(F', L) latents, whole patches for CogVideoX 1.5, never one latent frame of a video."""
    from collections import Counter

    from cogfun.models import TransformerFamily
    from diffusers import DDPMScheduler
    from cogfun.stages.train import batch_inputs

    cfg = TrainConfig(random_frame_crop=True, caption_dropout=0.0, seed=3)
    kept = {}
    for p_t, f_lat in ((1, 6), (2, 6), (1, 4)):
        tensors = {"latent_mean": torch.zeros(1, f_lat, 16, 2, 2), "latent_logvar": torch.zeros(1, f_lat, 16, 2, 2),
                   "prompt_embeds": torch.zeros(1, 226, 8)}
        batch = {"tensors": tensors, "metas": [{"frames": 4 * f_lat - 3}], "batch_id": 0}
        family = TransformerFamily(in_channels=16, latent_channels=16, patch_size_t=p_t if p_t > 1 else None,
                                   reference_noise=False)
        kept[p_t, f_lat] = Counter(
            batch_inputs(batch, epoch=epoch, cfg=cfg, scheduler=DDPMScheduler(), scaling=1.0, policies=[],
                         null_prompt=torch.zeros(226, 8), device="cpu", dtype=torch.float32, family=family,
                         sample_n_frames=21)[0].shape[1] for epoch in range(400))
    assert set(kept[1, 6]) == {2, 3, 4, 5, 6} and set(kept[2, 6]) == {2, 4, 6}
    assert 0.86 < kept[1, 6][6] / 400 < 0.94 and kept[2, 6][6] == kept[1, 6][6]   # the same draws, L = 6
    assert 0.92 < kept[1, 4][4] / 400 < 0.98 and set(kept[1, 4]) == {2, 3, 4}     # a shorter clip: L >= 4 keeps it


def test_one_frame_padding_for_patch_size_t():
    from cogfun.positions import pad_frames

    x = torch.randn(2, 1, 33, 4, 4)
    padded = pad_frames(x, 2)
    assert padded.shape == (2, 2, 33, 4, 4)
    assert torch.equal(padded[:, :1], x) and not padded[:, 1:].any()
    assert pad_frames(x, None) is x
    even = torch.randn(1, 4, 33, 4, 4)
    assert pad_frames(even, 2) is even
    with pytest.raises(ValueError, match="3 latent frames"):
        pad_frames(torch.randn(1, 3, 33, 4, 4), 2)


# ---------------------------------------------------------------------------------------------- reference noise

@pytest.fixture(scope="module")
def noise_shards(models, synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """Images only (cheap), inpaint with the image policies (block, ellipse), for a model with reference
    noise and one without."""
    from cogfun.stages.precompute import precompute

    root = tmp_path_factory.mktemp("noise")
    rows = [r for r in json.loads(synthetic_data.read_text()) if r["type"] == "image"]
    meta = root / "images.json"
    meta.write_text(json.dumps(rows))
    out = {}
    for variant in ("2b-inp", "5b-inp-v1.1"):
        shard_dir = root / variant
        precompute(PrecomputeConfig(pretrained_model_name_or_path=str(models[variant]), shard_dir=str(shard_dir),
                                    train_data_meta=str(meta), train_data_dir=str(synthetic_data.parent),
                                    train_mode="inpaint", **{**DATA, "mask_policies": "block,ellipse"}),
                   progress=False)
        out[variant] = shard_dir
    return out


def test_reference_noise_reaches_the_cached_conditioning(models, noise_shards, synthetic_data):
    """With add_noise_in_inpaint_model the shards hold the VAE's response to seeded reference noise
    (exactly what an encode of masked + sigma0 * n gives); without the key, nothing of it."""
    from cogfun import masks
    from cogfun.buckets import sample_key
    from cogfun.loader import CachedSamples
    from cogfun.models import encode_clips, load_vae
    from cogfun.video import decode_image, frames_to_tensor

    samples = {}
    for variant, shard_dir in noise_shards.items():
        manifest = shards.read_manifest(shard_dir)
        dataset = CachedSamples(shard_dir, manifest)
        samples[variant] = sorted((dataset[(i, 0)] for i in range(len(dataset))), key=lambda s: s["meta"]["source"])
    plain, noisy = samples["2b-inp"], samples["5b-inp-v1.1"]
    assert shards.read_manifest(noise_shards["2b-inp"])["reference_noise"] is None
    assert shards.read_manifest(noise_shards["5b-inp-v1.1"])["reference_noise"] == masks.reference_noise_design()
    for s in plain:
        assert not [k for k in s["tensors"] if k.startswith(masks.NOISE_RESPONSE)]
    vae = load_vae(models["5b-inp-v1.1"], torch.float32, torch.device("cpu"))
    for s in noisy:
        meta, t = s["meta"], s["tensors"]
        assert sorted(k for k in t if k.startswith(masks.NOISE_RESPONSE)) == [
            f"{masks.NOISE_RESPONSE}.block", f"{masks.NOISE_RESPONSE}.ellipse"]
        frames = decode_image(str(synthetic_data.parent / meta["source"]), tuple(meta["resize_hw"]),
                              tuple(meta["crop_box"]))
        pixels = frames_to_tensor(frames)[None]
        for policy in ("block", "ellipse"):
            masked = masks.masked_clip(pixels, policy, meta["masks"][policy])    # the stored geometry's mask
            n = masks.noise_pattern(pixels.shape[1:], 42, sample_key(meta["source"], meta["view"]), policy)
            want = encode_clips(vae, masks.add_reference_noise(masked, masks.REFERENCE_NOISE_SIGMA0, noise=n[None]))[0] \
                - encode_clips(vae, masked)[0]
            got = t[f"{masks.NOISE_RESPONSE}.{policy}"].float()
            assert got.abs().max() > 1e-3                                    # the noise is there
            torch.testing.assert_close(got, want[0], atol=2e-3, rtol=1e-2)   # bf16 storage
    for a, b in zip(plain, noisy):  # the clean masked latents are the same with and without (same VAE weights)
        assert a["meta"]["source"] == b["meta"]["source"]
        assert torch.equal(a["tensors"]["masked_latents.block"], b["tensors"]["masked_latents.block"])


def test_training_draws_fresh_reference_noise_per_step(noise_shards):
    """Train-time conditioning: masked latents + s * sigma / sigma0 * response, a new sigma and sign per
    step; without the key the cached clean latents as they are."""
    from cogfun import masks
    from cogfun.loader import CachedSamples, collate
    from cogfun.models import TransformerFamily
    from diffusers import DDPMScheduler
    from cogfun.stages.train import batch_inputs

    cfg = TrainConfig(caption_dropout=0.0, seed=3, train_mode="inpaint", mask_policy_weights="ellipse=0,t2v=0")
    for variant, shard_dir in noise_shards.items():
        manifest = shards.read_manifest(shard_dir)
        sample = CachedSamples(shard_dir, manifest)[(0, 0)]
        batch = collate([sample])
        t = batch["tensors"]
        family = TransformerFamily(in_channels=33, latent_channels=16, patch_size_t=None,
                                   reference_noise=bool(manifest["reference_noise"]))
        seen = []
        for epoch in range(40):
            model_in = batch_inputs(batch, epoch=epoch, cfg=cfg, scheduler=DDPMScheduler(), scaling=0.7,
                                    policies=["block", "ellipse"], null_prompt=torch.zeros(226, 32), device="cpu",
                                    dtype=torch.float32, family=family)[0]
            cond = model_in[0, :, 17:]
            if not cond.any():
                continue                                                      # a t2v draw
            clean = t["masked_latents.block"][0].float() * 0.7
            if family.reference_noise:
                scale = (cond - clean) / (t[f"{masks.NOISE_RESPONSE}.block"][0].float() * 0.7)
                finite = torch.isfinite(scale) & (t[f"{masks.NOISE_RESPONSE}.block"][0].abs() > 1e-2)
                s = scale[finite].median()
                torch.testing.assert_close(scale[finite], torch.full_like(scale[finite], float(s)), atol=1e-3, rtol=1e-3)
                seen.append(float(s))
            else:
                assert torch.equal(cond, clean)
        if family.reference_noise:
            sigmas = [abs(s) * masks.REFERENCE_NOISE_SIGMA0 for s in seen]
            assert len(set(round(s, 6) for s in sigmas)) == len(sigmas) > 20     # a new sigma every step
            assert min(seen) < 0 < max(seen)                                       # both signs
            assert 0.01 < min(sigmas) and max(sigmas) < 0.3


# ---------------------------------------------------------------------------------------------- refusals

def test_fingerprint_follows_the_frame_rule_and_the_noise_design():
    from cogfun.models import TransformerFamily
    from cogfun.stages.precompute import settings_of

    cfg = PrecomputeConfig(train_mode="inpaint")
    fam = lambda p_t, noise: TransformerFamily(33, 16, p_t, noise)  # noqa: E731
    plain = settings_of(cfg, fam(None, False))
    assert plain == settings_of(cfg)                       # models without the keys: shards unchanged
    assert settings_of(cfg, fam(2, False))["latent_frame_multiple"] == 2
    from cogfun.masks import reference_noise_design

    assert settings_of(cfg, fam(None, True))["reference_noise"] == reference_noise_design()
    normal = PrecomputeConfig(train_mode="normal")
    assert "reference_noise" not in settings_of(normal, fam(None, True))   # nothing masked, nothing to noise
    assert len({shards.digest(settings_of(cfg, fam(p, n))) for p in (None, 2) for n in (False, True)}) == 4


@pytest.mark.parametrize("chain", ["2b-inp", "5b-inp-v1.1"], indirect=True)
def test_shards_of_another_family_are_refused(chain, models, tmp_path):
    """The 2b-InP chain's shards with the 1.5 and the V1.1 models; the V1.1 chain's with the 2b model."""
    other = {"2b-inp": ["v1.5-5b-inp", "5b-inp-v1.1"], "5b-inp-v1.1": ["2b-inp"]}[chain["variant"]]
    expect = {"v1.5-5b-inp": ["frame rule", "patch_size_t 2", "reference noise"],
              "5b-inp-v1.1": ["reference noise: the transformer config asks for it"],
              "2b-inp": ["reference noise: the shards carry it"]}
    for variant in other:
        cfg = TrainConfig(pretrained_model_name_or_path=str(models[variant]), shard_dir=str(chain["shards"]),
                          output_dir=str(tmp_path / variant), train_mode="inpaint", report_to="none",
                          max_train_steps=1, **DATA)
        with pytest.raises(ShardError) as e:
            run_train(cfg)
        assert all(part in str(e.value) for part in expect[variant]), str(e.value)


def edited_model(src: Path, dst: Path, **changes) -> Path:
    """A copy of a model folder whose transformer/config.json is edited (None removes a key)."""
    shutil.copytree(src, dst)
    config_file = dst / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"in_channels": 32}, "Control or Pose model"),
    ({"in_channels": 20}, "in_channels 20 fits neither --train_mode normal (16: text-to-video)"),
    ({"use_fancy_positions": True}, "unknown transformer config key(s) use_fancy_positions"),
    ({"ofs_embed_dim": 512}, "ofs_embed_dim=512"),
])
def test_models_of_another_task_or_unknown_maths_are_refused(models, synthetic_data, tmp_path, changes, message):
    model = edited_model(models["2b-inp"], tmp_path / "model", **changes)
    with pytest.raises(ModelError) as e:
        transformer_family(model)
    assert message in str(e.value) and "transformer/config.json" in str(e.value)
    for command in (["precompute", "--train_data_meta", str(synthetic_data)],
                    ["train", "--output_dir", str(tmp_path / "o")]):  # train: refused before any shard is read
        result = CliRunner().invoke(cli.main, [*command, "--pretrained_model_name_or_path", str(model),
                                               "--shard_dir", str(tmp_path / "s")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_released_keys_are_accepted(models):
    assert transformer_family(models["v1.5-5b-inp"]) == transformer_family(models["v1.5-5b-inp"])
    fam = {v: transformer_family(models[v]) for v in VARIANTS}
    assert [(f.in_channels, f.patch_size_t, f.reference_noise) for f in fam.values()] == [
        (33, None, False), (33, None, True), (33, 2, True), (16, None, False)]
