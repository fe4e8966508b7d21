"""The transformer cogfun loads sees CogVideoX-Fun's positions (cogfun.positions).

Reference figures (tests/data/positions_reference.safetensors, see tests/data/README.md) are the
outputs of VideoX-Fun's own transformer class on the same tiny weights and inputs, at the native
480x720 and at 512-based buckets, for each released layout's stand-in; stored as 512 sampled
output values per case (+ the output's RMS) and, for the RoPE models, 512 sampled cos/sin entries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).parent / "data" / "positions_reference.safetensors"
VARIANTS = ("inp", "5b-inp-v1.1", "v1.5-5b-inp", "t2v")


def reference():
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(REFERENCE), "pt") as fh:
        meta = json.loads(fh.metadata()["reference"])
    return meta, load_file(str(REFERENCE))


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def case_inputs(config, case):
    """The reference inputs: one generator seeded with the case's seed, latents then text."""
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(1, case["latent_frames"], config.in_channels, case["height"] // 8, case["width"] // 8, generator=g)
    text = torch.randn(1, 226, config.text_embed_dim, generator=g)
    digest = hashlib.sha256(x.numpy().tobytes() + text.numpy().tobytes()).hexdigest()
    assert digest == case["input_sha256"], f"{case['name']}: torch's seeded randn gives other inputs than the reference's"
    return x, text


def rel_rms(got, expected) -> float:
    return float((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from cogfun.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("positions")
    return {v: write_tiny_model(root / v, v, seed=0) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_equals_cogvideox_fun_class(models_dir, variant):
    """Every bucket, every layout: the loaded transformer's forward = CogVideoX-Fun's class within
    1e-5 relative RMS (measured: <= 2e-7; diffusers' class alone: up to 58 % for sincos models,
    8e-4 for RoPE 1.0), with no positions passed by the caller; the RoPE tables match too."""
    from cogfun import models, positions

    meta, ref = reference()
    model = models.load_transformer(models_dir[variant], torch.float32).eval()
    assert isinstance(model, positions.FunTransformer)
    assert weights_digest(model) == meta["variants"][variant]["weights_sha256"], \
        "write_tiny_model(seed=0) no longer gives the weights the reference was computed with"
    cases = [c for c in meta["cases"] if c["variant"] == variant]
    assert {(c["height"], c["width"]) for c in cases} == {(480, 720), (512, 512), (352, 640), (640, 352), (256, 256)}
    for case in cases:
        name = case["name"]
        x, text = case_inputs(model.config, case)
        with torch.no_grad():
            out = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([meta["timestep"]]),
                        return_dict=False)[0]
        assert out.shape == (1, case["latent_frames"], 16, case["height"] // 8, case["width"] // 8)
        got = out.flatten()[ref[f"{name}.index"].long()]
        assert rel_rms(got, ref[f"{name}.values"]) <= 1e-5, name
        assert abs(float(out.pow(2).mean().sqrt()) / float(ref[f"{name}.rms"]) - 1) <= 1e-5, name
        if model.config.use_rotary_positional_embeddings:
            f = case["latent_frames"] + case["latent_frames"] % (model.config.patch_size_t or 1)
            cos, sin = positions.rotary_tables(model.config, f, case["height"] // 8, case["width"] // 8)
            idx = ref[f"{name}.rope_index"].long()
            torch.testing.assert_close(cos.flatten()[idx], ref[f"{name}.rope_cos"], atol=1e-6, rtol=0)
            torch.testing.assert_close(sin.flatten()[idx], ref[f"{name}.rope_sin"], atol=1e-6, rtol=0)


def test_same_keys_lora_and_checkpointing(models_dir):
    """The loaded model has diffusers' state-dict keys (the sincos table stays non-persistent), takes a
    peft LoRA, and gives the same output and gradients with gradient checkpointing."""
    from diffusers import CogVideoXTransformer3DModel

    from cogfun import models
    from cogfun.lora import inject_lora

    folder = models_dir["inp"] / "transformer"
    plain = CogVideoXTransformer3DModel.from_pretrained(folder)
    model = models.load_transformer(models_dir["inp"], torch.float32)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert not any("pos_embedding" in k for k in model.state_dict())
    inject_lora(model, rank=4, alpha=4.0, target_name="to_q,to_k,to_v,ff.0,ff.2", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 2, 33, 32, 32, generator=g), torch.randn(1, 226, 32, generator=g)
    lora = [p for p in model.parameters() if p.requires_grad]

    def run():
        out = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([300]), return_dict=False)[0]
        return out.detach(), torch.autograd.grad(out.square().mean(), lora)

    model.train()
    out, grads = run()
    model.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b)


def test_pipeline_rope_is_replaced_and_padding_is_inside(models_dir):
    """diffusers' pipelines pass their own RoPE: the model uses its own; a 1.5 model takes a 1-frame
    input and returns 1 frame; more frames than the sincos table holds is refused, naming the limit."""
    from cogfun import models, positions

    model = models.load_transformer(models_dir["5b-inp-v1.1"], torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 2, 33, 64, 64, generator=g), torch.randn(1, 226, 32, generator=g)
    wrong = tuple(torch.zeros(2 * 32 * 32, 16) for _ in range(2))
    with torch.no_grad():
        own = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([10]), return_dict=False)[0]
        passed = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([10]),
                       image_rotary_emb=wrong, return_dict=False)[0]
    assert torch.equal(own, passed)

    v15 = models.load_transformer(models_dir["v1.5-5b-inp"], torch.float32).eval()
    image = torch.randn(1, 1, 33, 16, 16, generator=g)
    with torch.no_grad():
        out = v15(hidden_states=image, encoder_hidden_states=text, timestep=torch.tensor([10])).sample
        padded = v15(hidden_states=positions.pad_frames(image, 2), encoder_hidden_states=text,
                     timestep=torch.tensor([10])).sample
    assert out.shape == (1, 1, 16, 16, 16)
    torch.testing.assert_close(out, padded[:, :1])

    sincos = models.load_transformer(models_dir["inp"], torch.float32)
    with pytest.raises(ValueError, match="covers 13 latent frames.*sample_frames 49"):
        sincos(hidden_states=torch.randn(1, 14, 33, 4, 4), encoder_hidden_states=text, timestep=torch.tensor([10]))


def test_frames_beyond_the_sincos_table_are_refused_before_any_work(models_dir, tmp_path):
    """A 2b model's positions cover its sample_frames (49 -> 13 latent frames): longer videos are refused
    by `cogfun sample` / validation geometry, precompute (before reading any media) and train (the shards)."""
    from types import SimpleNamespace

    from cogfun import models, sampling
    from cogfun.config import PrecomputeConfig
    from cogfun.masks import MASK_DESIGN
    from cogfun.shards import ShardError
    from cogfun.stages.precompute import precompute
    from cogfun.stages.train import check_shards_fit

    sincos = models.read_component_config(models_dir["inp"], "transformer")
    assert sampling.geometry(sincos, 49, 64, 64).frames == 49
    with pytest.raises(models.ModelError, match=r"^--num_frames 53: .*sample_frames.*use at most 49$"):
        sampling.geometry(sincos, 53, 64, 64)
    rope = models.read_component_config(models_dir["5b-inp-v1.1"], "transformer")
    assert sampling.geometry(rope, 85, 64, 64).frames == 85   # RoPE: any length

    cfg = PrecomputeConfig(pretrained_model_name_or_path=str(models_dir["inp"]), train_data_meta=str(tmp_path / "m.json"),
                           shard_dir=str(tmp_path / "shards"), video_sample_n_frames=85,
                           train_mode="inpaint")
    with pytest.raises(models.ModelError, match="--video_sample_n_frames 85"):
        precompute(cfg)
    assert not (tmp_path / "shards").exists()

    family = models.transformer_family(models_dir["inp"])
    manifest = {"model": {"latent_channels": 16, "text_dim": 32}, "mask_policies": ["i2v"], "mask_design": MASK_DESIGN,
                "latent_frame_multiple": 1, "reference_noise": None, "buckets": {"64x64x49": 2, "64x64x53": 1}}
    tcfg = SimpleNamespace(out_channels=16, text_embed_dim=32, in_channels=33)
    with pytest.raises(ShardError, match="53-frame samples .*13 latent frames.*--video_sample_n_frames <= 49"):
        check_shards_fit(manifest, tcfg, "inpaint", family)
    check_shards_fit({**manifest, "buckets": {"64x64x49": 2}}, tcfg, "inpaint", family)
