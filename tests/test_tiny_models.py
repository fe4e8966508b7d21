"""cogfun.tiny: the tiny model folder loads through the real ``from_pretrained`` code paths.

Checks: every component's saved weights equal a fresh in-memory build with the same seed
(round trip + determinism); the VAE keeps 8x spatial / 4x temporal compression; the tokenizer
is a real T5 tokenizer (pad 0, eos 1, unk 2, 226-token padding / truncation) and trains the same
in a fresh process; the scheduler config loads in DDPMScheduler with v-prediction and zero
terminal SNR; the transformer runs at latent sizes other than its sample size, both variants,
sincos and rotary positions; CogVideoXPipeline loads both variants.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogfun.tiny import (
    TEXT_SEQ_LEN,
    T5_D_MODEL,
    VAE_SCALING_FACTOR,
    build_tiny_components,
    caption_corpus,
    train_tokenizer_vocab,
    transformer_config,
    write_tiny_model,
)

COMPONENTS = ("transformer", "vae", "text_encoder")


@pytest.fixture(scope="module")
def inp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "inp", "inp", seed=0)


@pytest.fixture(scope="module")
def t2v_rotary_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "t2v", "t2v", seed=0, rotary=True)


@pytest.fixture(scope="module")
def inp_memory() -> dict:
    return build_tiny_components("inp", seed=0)


def _load(folder: Path, name: str):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    if name == "transformer":
        return CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    if name == "vae":
        return AutoencoderKLCogVideoX.from_pretrained(folder, subfolder="vae")
    return T5EncoderModel.from_pretrained(folder / "text_encoder")


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_folder_layout(inp_dir: Path) -> None:
    index = json.loads((inp_dir / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert name in index and (inp_dir / name).is_dir()
    assert (inp_dir / "transformer/diffusion_pytorch_model.safetensors").is_file()
    assert (inp_dir / "vae/diffusion_pytorch_model.safetensors").is_file()
    assert (inp_dir / "text_encoder/model.safetensors").is_file()
    assert not list(inp_dir.rglob("*.bin")), "weights must be safetensors"


@pytest.mark.parametrize("name", COMPONENTS)
def test_round_trip_equals_in_memory(inp_dir: Path, inp_memory: dict, name: str) -> None:
    loaded = _load(inp_dir, name)
    want = inp_memory[name].state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key], tensor), f"{name}.{key} differs after save/load"


def test_transformer_config(inp_dir: Path, t2v_rotary_dir: Path) -> None:
    from diffusers import CogVideoXTransformer3DModel

    inp = CogVideoXTransformer3DModel.load_config(inp_dir / "transformer")
    t2v = CogVideoXTransformer3DModel.load_config(t2v_rotary_dir / "transformer")
    assert (inp["in_channels"], t2v["in_channels"]) == (33, 16)
    assert inp["out_channels"] == t2v["out_channels"] == 16
    assert inp["text_embed_dim"] == T5_D_MODEL and inp["max_text_seq_length"] == TEXT_SEQ_LEN
    assert (inp["use_rotary_positional_embeddings"], t2v["use_rotary_positional_embeddings"]) == (False, True)
    with pytest.raises(ValueError, match="unknown variant"):
        transformer_config("i2v")


def test_same_seed_same_bytes_other_seed_other_weights(inp_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again", "inp", seed=0)
    assert _digests(again) == _digests(inp_dir)
    other = write_tiny_model(tmp_path / "other", "inp", seed=1)
    d0, d1 = _digests(inp_dir), _digests(other)
    for weights in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert d0[weights] != d1[weights]
    assert d0["tokenizer/tokenizer.json"] == d1["tokenizer/tokenizer.json"]


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_components("t2v", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_vae_compression(inp_dir: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(inp_dir, subfolder="vae").eval()
    assert vae.config.scaling_factor == pytest.approx(VAE_SCALING_FACTOR)
    assert vae.config.latent_channels == 16
    g = torch.Generator().manual_seed(0)
    cases = {  # pixel [B, 3, F, H, W] -> latent [B, 16, F', H/8, W/8], F' = (F - 1) / 4 + 1
        (1, 3, 9, 64, 64): (1, 16, 3, 8, 8),
        (1, 3, 1, 64, 64): (1, 16, 1, 8, 8),
        (1, 3, 5, 48, 80): (1, 16, 2, 6, 10),
        (2, 3, 1, 32, 16): (2, 16, 1, 4, 2),
    }
    with torch.no_grad():
        for shape, latent in cases.items():
            x = torch.rand(shape, generator=g) * 2 - 1
            dist = vae.encode(x).latent_dist
            assert tuple(dist.mean.shape) == latent and tuple(dist.logvar.shape) == latent, shape
            assert torch.isfinite(dist.mean).all() and torch.isfinite(dist.logvar).all()
        # the latent depends on the input (not a constant map)
        a = vae.encode(torch.zeros(1, 3, 1, 32, 32)).latent_dist.mean
        b = vae.encode(torch.ones(1, 3, 1, 32, 32)).latent_dist.mean
        assert not torch.allclose(a, b)


def test_tokenizer_loads_and_pads(inp_dir: Path) -> None:
    from transformers import AutoTokenizer, T5TokenizerFast

    auto = AutoTokenizer.from_pretrained(inp_dir / "tokenizer")
    fast = T5TokenizerFast.from_pretrained(inp_dir / "tokenizer")
    for tok in (auto, fast):
        assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    captions = caption_corpus(8, seed=3)
    enc = auto(captions, max_length=TEXT_SEQ_LEN, padding="max_length", truncation=True, return_tensors="pt")
    assert tuple(enc.input_ids.shape) == (8, TEXT_SEQ_LEN)
    assert torch.equal(enc.input_ids, fast(captions, max_length=TEXT_SEQ_LEN, padding="max_length",
                                           truncation=True, return_tensors="pt").input_ids)
    for row, caption in zip(enc.input_ids.tolist(), captions):
        n = row.index(1) + 1  # content, then </s>, then <pad> to the end
        assert 5 < n < TEXT_SEQ_LEN and set(row[n:]) == {0}
        assert 2 not in row[:n], "caption words must be in the vocabulary"
        assert auto.decode(row, skip_special_tokens=True) == caption
    # truncation keeps 226 tokens ending in </s>
    long = " ".join(caption_corpus(60, seed=4))
    ids = auto(long, max_length=TEXT_SEQ_LEN, padding="max_length", truncation=True).input_ids
    assert len(ids) == TEXT_SEQ_LEN and ids[-1] == 1 and 0 not in ids
    # out-of-vocabulary characters become <unk>, as with real T5
    assert 2 in auto("ünïcødé ✓").input_ids


def test_tokenizer_vocab_is_reproducible_across_processes() -> None:
    code = "import json; from cogfun.tiny import train_tokenizer_vocab; print(json.dumps(train_tokenizer_vocab()))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         timeout=60)
    fresh = [tuple(x) for x in json.loads(out.stdout)]
    here = train_tokenizer_vocab()
    assert fresh == here
    assert here[:3] == [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]


def test_text_encoder_output(inp_dir: Path) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(inp_dir / "tokenizer")
    enc = T5EncoderModel.from_pretrained(inp_dir / "text_encoder").eval()
    assert enc.config.vocab_size == len(tok)
    ids = tok(caption_corpus(2, seed=0), max_length=TEXT_SEQ_LEN, padding="max_length", truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        h = enc(ids)[0]
    assert tuple(h.shape) == (2, TEXT_SEQ_LEN, T5_D_MODEL)
    assert torch.isfinite(h).all() and not torch.allclose(h[0], h[1])


def test_scheduler_loads_as_ddpm_with_zero_terminal_snr(inp_dir: Path) -> None:
    from diffusers import CogVideoXDDIMScheduler, DDPMScheduler

    raw = json.loads((inp_dir / "scheduler/scheduler_config.json").read_text())
    assert raw["_class_name"] == "CogVideoXDDIMScheduler"
    assert raw["snr_shift_scale"] == 3.0 and raw["timestep_spacing"] == "trailing"
    ddpm = DDPMScheduler.from_pretrained(inp_dir, subfolder="scheduler")
    assert ddpm.config.prediction_type == "v_prediction"
    assert ddpm.config.rescale_betas_zero_snr is True
    assert ddpm.config.num_train_timesteps == 1000 and ddpm.config.beta_schedule == "scaled_linear"
    assert ddpm.alphas_cumprod[-1].item() < 1e-6  # zero terminal SNR
    assert ddpm.alphas_cumprod[0].item() > 0.99
    # DDPMScheduler ignores snr_shift_scale (CogVideoX-Fun's trainer has the same behaviour);
    # CogVideoXDDIMScheduler applies it. Pinned here so a change in diffusers is noticed.
    ddim = CogVideoXDDIMScheduler.from_pretrained(inp_dir, subfolder="scheduler")
    assert ddim.config.snr_shift_scale == 3.0
    assert not torch.allclose(ddim.alphas_cumprod[:-1].double(), ddpm.alphas_cumprod[:-1].double())


def _rotary_emb(config, frames: int, height: int, width: int):
    """Like CogVideoXPipeline._prepare_rotary_positional_embeddings (CogVideoX 1.0), latent sizes."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = config.patch_size
    grid = (height // p, width // p)
    crops = get_resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                   temporal_size=frames)


@pytest.mark.parametrize("which", ["inp", "t2v_rotary"])
def test_transformer_forward_at_other_sizes(which: str, inp_dir: Path, t2v_rotary_dir: Path) -> None:
    from diffusers import CogVideoXTransformer3DModel

    folder = inp_dir if which == "inp" else t2v_rotary_dir
    model = CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, TEXT_SEQ_LEN, cfg.text_embed_dim, generator=g)
    # latent (F', H', W'): an image, a 9-frame clip at non-sample sizes, the sample size, a portrait
    for f, h, w in [(1, 8, 8), (3, 8, 12), (3, 16, 16), (2, 12, 4)]:
        x = torch.randn(1, f, cfg.in_channels, h, w, generator=g)
        rotary = _rotary_emb(cfg, f, h, w) if cfg.use_rotary_positional_embeddings else None
        with torch.no_grad():
            out = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]),
                        image_rotary_emb=rotary, return_dict=False)[0]
            other_t = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([10]),
                            image_rotary_emb=rotary, return_dict=False)[0]
        assert tuple(out.shape) == (1, f, 16, h, w)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, other_t), "the timestep must condition the output"


@pytest.mark.parametrize("which", ["inp", "t2v_rotary"])
def test_cogvideox_pipeline_loads(which: str, inp_dir: Path, t2v_rotary_dir: Path) -> None:
    from diffusers import CogVideoXPipeline

    folder = inp_dir if which == "inp" else t2v_rotary_dir
    pipe = CogVideoXPipeline.from_pretrained(folder)
    assert pipe.transformer.config.in_channels == (33 if which == "inp" else 16)
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    assert pipe.tokenizer.pad_token_id == 0


def test_t2v_pipeline_generates_latents(t2v_rotary_dir: Path) -> None:
    """The components work together inside the real pipeline (1 step, rotary, latent output)."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(t2v_rotary_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("A small red fox runs across the meadow.", num_inference_steps=1, height=64, width=96,
               num_frames=9, guidance_scale=1.0, output_type="latent",
               generator=torch.Generator().manual_seed(0)).frames
    assert tuple(out.shape) == (1, 3, 16, 8, 12)  # [B, F', C, H', W']
    assert torch.isfinite(out).all()


# the published structure keys of each released layout (only widths and depths are shrunk)
RELEASED_KEYS = {
    "2b-inp": dict(in_channels=33, patch_size_t=None, patch_bias=True, use_rotary_positional_embeddings=False,
                   use_learned_positional_embeddings=False, sample_frames=49, sample_height=60, sample_width=90),
    "5b-inp-v1.1": dict(in_channels=33, patch_size_t=None, patch_bias=True, use_rotary_positional_embeddings=True,
                        use_learned_positional_embeddings=False, sample_frames=49, sample_height=60, sample_width=90,
                        add_noise_in_inpaint_model=True),
    "v1.5-5b-inp": dict(in_channels=33, patch_size_t=2, patch_bias=False, use_rotary_positional_embeddings=True,
                        use_learned_positional_embeddings=False, sample_frames=85, sample_height=384,
                        sample_width=680, add_noise_in_inpaint_model=True),
    "t2v": dict(in_channels=16, patch_size_t=None, patch_bias=True, use_rotary_positional_embeddings=False,
                use_learned_positional_embeddings=False, sample_frames=49, sample_height=60, sample_width=90),
}


@pytest.mark.parametrize("variant", sorted(RELEASED_KEYS))
def test_released_layouts(variant: str, tmp_path: Path) -> None:
    from diffusers import CogVideoXPipeline

    from cogfun.tiny import RELEASED, variant_name

    assert set(RELEASED) == set(RELEASED_KEYS) and variant_name("inp") == "2b-inp"
    folder = write_tiny_model(tmp_path / variant, variant, seed=0)
    raw = json.loads((folder / "transformer/config.json").read_text())   # the file, as a user's folder has it
    for key, value in RELEASED_KEYS[variant].items():
        assert raw.get(key) == value, key
    assert raw.get("add_noise_in_inpaint_model", False) == RELEASED_KEYS[variant].get("add_noise_in_inpaint_model", False)
    scaling = json.loads((folder / "vae/config.json").read_text())["scaling_factor"]
    assert scaling == (0.7 if "5b" in variant else VAE_SCALING_FACTOR)
    pipe = CogVideoXPipeline.from_pretrained(folder)  # diffusers loads it (its class ignores the CogVideoX-Fun key)
    assert pipe.transformer.config.patch_size_t == RELEASED_KEYS[variant]["patch_size_t"]


def test_model_folder_files_follow_the_umask(tiny_model_inp):
    """save_pretrained writes 0600 weights; the folder (the demo's model) must be readable as the umask allows."""
    from cogfun.shards import user_umask

    files = [p for p in tiny_model_inp.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~user_umask(), p
