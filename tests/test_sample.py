"""`cogfun sample`: text-to-video and InP image-to-video with and without our LoRA files.

The videos are read back from the mp4 files. `SAMPLE_MODELS` names the model-folder fixtures the
sampling tests run on: text-to-video, 2b-InP, V1.1-5b-InP (RoPE, reference noise) and V1.5-5b-InP
(patch_size_t 2), the released layouts of `cogfun.tiny`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cogfun import sampling
from cogfun.config import ConfigError, SampleConfig
from cogfun.models import transformer_family

SAMPLE_MODELS = ["tiny_model_t2v", "tiny_model_inp", "tiny_model_v11", "tiny_model_v15"]
SIZE = dict(num_frames=9, height=48, width=64)  # not square: catches a height/width swap


@pytest.fixture(scope="session")
def tiny_model_v11(tmp_path_factory) -> Path:
    """CogVideoX-Fun-V1.1-5b-InP's layout: 3D RoPE, add_noise_in_inpaint_model (reference noise at inference)."""
    from cogfun.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "v11", "5b-inp-v1.1", seed=0)


@pytest.fixture(scope="session")
def tiny_model_v15(tmp_path_factory) -> Path:
    """CogVideoX-Fun-V1.5-5b-InP's layout: patch_size_t 2, 3D RoPE (slice grid), reference noise."""
    from cogfun.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "v15", "v1.5-5b-inp", seed=0)


def read_mp4(path: Path) -> dict:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        return {"codec": stream.codec_context.name, "fps": float(stream.average_rate), "frames": frames,
                "comment": container.metadata.get("comment")}


@pytest.fixture(scope="module")
def images(synthetic_data) -> dict:
    root = synthetic_data.parent / "images"
    return {"first": str(root / "landscape.jpg"), "last": str(root / "portrait.png")}


def write_lora(model: Path, out: Path) -> Path:
    """A LoRA in our two formats, from our writers: random A and B on the seed's targets (a clearly
    non-zero update; B is zero only at the start of training)."""
    from diffusers import CogVideoXTransformer3DModel

    from cogfun.lora import KOHYA_WEIGHT_NAME, resolve_target_modules, save_kohya_lora, save_lora

    transformer = CogVideoXTransformer3DModel.from_pretrained(model / "transformer")
    targets = resolve_target_modules(transformer, "to_q,to_k,to_v,ff.0,ff.2")
    gen = torch.Generator().manual_seed(2)
    sd = {}
    for name in targets:
        layer = transformer.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=gen) * 0.2
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=gen) * 0.5
    save_lora(out, sd, rank=4, alpha=2.0, target_modules=targets)
    save_kohya_lora(out / KOHYA_WEIGHT_NAME, sd, rank=4, alpha=2.0)
    return out


def run_sample(model: Path, out: Path, **kw) -> dict:
    from cogfun.stages.sample import sample

    cfg = SampleConfig(pretrained_model_name_or_path=str(model), prompt="A red fox runs across the meadow.",
                       num_inference_steps=2, mixed_precision="no", output=str(out), **SIZE, **kw)
    assert sample(cfg) == [out]
    return read_mp4(out)


@pytest.mark.parametrize("model_fixture", SAMPLE_MODELS)
def test_samples_with_and_without_lora(request, tmp_path, images, model_fixture):
    model = request.getfixturevalue(model_fixture)
    tcfg = json.loads((model / "transformer" / "config.json").read_text())
    inpaint = tcfg["in_channels"] == 33
    cond = {}
    if inpaint:  # image-to-video; first + last frame on the 1.5 variant (9 frames = 3 latents: trimmed to 5 = 2)
        cond = {"image": images["first"], **({"end_image": images["last"]} if tcfg.get("patch_size_t") else {})}
    lora_dir = write_lora(model, tmp_path / "lora")

    base = run_sample(model, tmp_path / "base.mp4", **cond)
    assert base["codec"] == "h264" and base["frames"].shape == (5 if "end_image" in cond else 9, 48, 64, 3)
    assert base["fps"] == (16 if tcfg.get("patch_size_t") else 8)
    assert json.loads(base["comment"])["prompt"] == "A red fox runs across the meadow."
    assert base["frames"].std() > 1  # a picture, not a constant

    with_lora = run_sample(model, tmp_path / "lora.mp4", lora=str(lora_dir), **cond)
    assert np.abs(with_lora["frames"].astype(int) - base["frames"]).mean() > 1, "the LoRA changes nothing"
    assert json.loads(with_lora["comment"])["lora"]["format"] == "diffusers"

    kohya = run_sample(model, tmp_path / "kohya.mp4", lora=str(lora_dir / "pytorch_lora_weights_kohya.safetensors"), **cond)
    np.testing.assert_array_equal(kohya["frames"], with_lora["frames"])   # same LoRA, same alpha/rank

    off = run_sample(model, tmp_path / "off.mp4", lora=str(lora_dir), lora_scale=0.0, **cond)
    np.testing.assert_array_equal(off["frames"], base["frames"])


def test_inp_conditioning_is_cogvideox_funs(tiny_model_inp, images):
    """Mask channel and masked-video latents as CogVideoX-Fun's inpaint pipeline builds them
    (re-derived here from its steps on full-resolution pixel masks), for i2v and first+last,
    with CogVideoX 1.5 padding; reference noise only where the raw config asks for it."""
    import torch.nn.functional as F

    from cogfun import models

    vae = models.load_vae(tiny_model_inp, torch.float32, torch.device("cpu"))
    scaling = vae.config.scaling_factor
    geo = sampling.Geometry(frames=9, height=48, width=64, pad=1)
    first, last = (sampling.load_image(images[k], 48, 64) for k in ("first", "last"))
    for request in (sampling.Request("x", images["first"]), sampling.Request("x", images["first"], images["last"])):
        got = sampling.inpaint_condition(vae, request, geo, reference_noise=False, generator=None)
        # CogVideoX-Fun: the image tiled over the clip, mask 1 (its 255) on unknown frames, masked pixels -1
        video = first.expand(3, 9, 48, 64).clone()[None]
        unknown = torch.ones(1, 1, 9, 48, 64)
        unknown[:, :, 0] = 0
        if request.end_image:
            video[:, :, -1:] = last
            unknown[:, :, -1] = 0
        masked = video * (unknown < 0.5) - 1.0 * (unknown > 0.5)
        padded = torch.cat([masked, torch.full((1, 3, 4, 48, 64), -1.0)], dim=2)  # the 1.5 padding frames
        with torch.no_grad():
            latents = vae.encode(padded).latent_dist.mode() * scaling          # [1, C, 4, 6, 8]
        known = 1 - unknown
        mask = torch.cat([F.interpolate(known[:, :, :1], size=(1, 6, 8), mode="trilinear", align_corners=False),
                          F.interpolate(known[:, :, 1:], size=(2, 6, 8), mode="trilinear", align_corners=False),
                          torch.zeros(1, 1, 1, 6, 8)], dim=2) * scaling
        want = torch.cat([mask, latents], dim=1).permute(0, 2, 1, 3, 4)
        assert got.shape == (1, 4, 17, 6, 8)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    t2v = sampling.inpaint_condition(vae, sampling.Request("x"), geo, reference_noise=False, generator=None)
    assert t2v.shape == (1, 4, 17, 6, 8) and not t2v.any()
    noisy = sampling.inpaint_condition(vae, sampling.Request("x", images["first"]), geo, reference_noise=True,
                                       generator=torch.Generator().manual_seed(0))
    clean = sampling.inpaint_condition(vae, sampling.Request("x", images["first"]), geo, reference_noise=False,
                                       generator=None)
    assert 1e-4 < (noisy - clean)[:, :1].abs().max() < 1.0   # the first frame's latents carry the small noise


def test_reference_noise_follows_the_raw_config(tmp_path, tiny_model_inp, images):
    from cogfun import models

    noisy_model = tmp_path / "noisy"
    shutil.copytree(tiny_model_inp, noisy_model)
    cfg_file = noisy_model / "transformer" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "add_noise_in_inpaint_model": True}))
    geo = sampling.Geometry(frames=5, height=32, width=32)
    requests = [sampling.Request("a fox", images["first"])]
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), seed=3)
    plain = sampling.encode_inputs(tiny_model_inp, requests, "", geo, **kw)
    noisy = sampling.encode_inputs(noisy_model, requests, "", geo, **kw)
    torch.testing.assert_close(noisy["prompt_embeds.0"], plain["prompt_embeds.0"])
    vae = models.load_vae(tiny_model_inp, torch.float32, torch.device("cpu"))
    want = sampling.inpaint_condition(vae, requests[0], geo, reference_noise=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy["condition.0"], want)
    assert not torch.equal(noisy["condition.0"], plain["condition.0"])


def test_lora_paths_and_inputs_are_checked(tmp_path, tiny_model_t2v, tiny_model_inp):
    lora_dir = write_lora(tiny_model_t2v, tmp_path / "out")
    assert sampling.find_lora_file(lora_dir).name == "pytorch_lora_weights.safetensors"   # diffusers preferred
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    shutil.copy(lora_dir / "pytorch_lora_weights_kohya.safetensors", ckpt)
    assert sampling.find_lora_file(ckpt).name == "pytorch_lora_weights_kohya.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no pytorch_lora_weights.safetensors"):
        sampling.find_lora_file(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        sampling.find_lora_file(tmp_path / "nope")

    tcfg = json.loads((tiny_model_t2v / "transformer" / "config.json").read_text())
    with pytest.raises(ConfigError, match="4k\\+1.*use 9 or 13"):
        sampling.geometry(tcfg, 10, 64, 64)
    with pytest.raises(ConfigError, match="--height 40: must be a positive multiple of 16"):
        sampling.geometry(tcfg, 9, 40, 64)
    # the model's own size: the released 2b config's 49 x 480 x 720 (latent sample_* x 8)
    assert sampling.geometry(tcfg, None, None, None) == sampling.Geometry(49, 480, 720)
    t2v = transformer_family(tiny_model_t2v)
    with pytest.raises(ConfigError, match="text-to-video model"):
        sampling.requests_for(["a"], ["x.png"], [], t2v)
    inp = transformer_family(tiny_model_inp)
    with pytest.raises(ConfigError, match="--end_image needs --image"):
        sampling.requests_for(["a"], [], ["x.png"], inp)
    with pytest.raises(ConfigError, match="2 given for 3 prompts"):
        sampling.requests_for(["a", "b", "c"], ["x.png", "y.png"], [], inp)
    assert [r.policy for r in sampling.requests_for(["a", "b"], ["x.png"], [], inp)] == ["i2v", "i2v"]
    listing = tmp_path / "prompts.txt"
    listing.write_text("a fox\n\n  a cat  \n")
    assert sampling.read_list(str(listing), "--prompts") == ["a fox", "a cat"]
    assert sampling.read_list("a fox | a cat", "--prompts") == ["a fox", "a cat"]


def test_cogvideox_15_geometry(tiny_model_v15):
    """A patch_size_t model: CogVideoX-Fun's predict size by default (its config's sample_height/width
    are no video size); i2v pads the latent frames to the patch, first + last frame trims them
    (49 -> 45, with a note) so the last frame is in the last latent frame, as in training."""
    tcfg = json.loads((tiny_model_v15 / "transformer" / "config.json").read_text())
    assert sampling.geometry(tcfg, None, None, None) == sampling.Geometry(85, 384, 672)
    assert sampling.geometry(tcfg, 49, 64, 64) == sampling.Geometry(49, 64, 64, pad=1)
    notes = []
    assert sampling.geometry(tcfg, 49, 64, 64, last_frame_known=True, notes=notes) == sampling.Geometry(45, 64, 64)
    assert len(notes) == 1 and notes[0].startswith("--num_frames 49 -> 45")
    assert sampling.geometry(tcfg, 45, 64, 64, last_frame_known=True, notes=notes) == sampling.Geometry(45, 64, 64)
    assert len(notes) == 1
    with pytest.raises(ConfigError, match="use at least 5"):
        sampling.geometry(tcfg, 1, 64, 64, last_frame_known=True)


def test_cli_sample_writes_one_video_per_prompt(tmp_path, tiny_model_t2v):
    from cogfun import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red fox runs.\nA golden owl sleeps!\n")
    args = ["sample", "--pretrained_model_name_or_path", str(tiny_model_t2v), "--prompts", str(prompts),
            "--num_frames", "5", "--height", "32", "--width", "32", "--num_inference_steps", "1",
            "--mixed_precision", "no", "--output_dir", str(tmp_path / "videos")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == ["00-a-red-fox-runs.mp4", "01-a-golden-owl-sleeps.mp4"]
    assert read_mp4(tmp_path / "videos" / names[1])["frames"].shape == (5, 32, 32, 3)
    bad = CliRunner().invoke(cli.main, args[:-2] + ["--output", str(tmp_path / "one.mp4")])
    assert bad.exit_code == 1 and "--output names one file but there are 2 prompts" in bad.output
