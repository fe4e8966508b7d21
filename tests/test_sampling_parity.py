"""cogfun's sampling path = CogVideoX-Fun's CogVideoXFunInpaintPipeline (same initial noise, scheduler
and conditioning): final latents within 1e-3 on the tiny InP stand-ins.

Reference latents (tests/data/sampling_reference.safetensors, see tests/data/README.md): VideoX-Fun's
pipeline with its transformer and VAE classes on the same tiny weights, inputs as its predict
scripts build them, 96x160, 9 frames (5 for the 1.5 model: an even latent count, see README), 5 DDIM
steps, guidance 6, seed 42.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).parent / "data" / "sampling_reference.safetensors"


@pytest.mark.parametrize("variant,mode", [("inp", "t2v"), ("inp", "i2v"), ("5b-inp-v1.1", "t2v"), ("v1.5-5b-inp", "t2v")])
def test_final_latents_equal_cogvideox_fun_pipeline(tmp_path, variant, mode):
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cogfun import models, sampling
    from cogfun.tiny import synthetic_frames, write_tiny_model

    with safe_open(str(REFERENCE), "pt") as fh:
        meta = json.loads(fh.metadata()["reference"])
    expected = load_file(str(REFERENCE))[f"{variant}.{mode}.latents"]
    model = write_tiny_model(tmp_path / variant, variant, seed=0)
    height, width = meta["height"], meta["width"]
    image = tmp_path / "first.png"
    Image.fromarray(synthetic_frames(height, width, 1, seed=11)[0]).save(image)
    g = torch.Generator().manual_seed(meta["embeds_seed"])
    prompt, negative = torch.randn(226, 32, generator=g), torch.randn(226, 32, generator=g)

    frames = meta["case_frames"].get(f"{variant}.{mode}", meta["frames"])
    geo = sampling.geometry(models.read_component_config(model, "transformer"), frames, height, width)
    vae = models.load_vae(model, torch.float32, torch.device("cpu"))
    request = sampling.Request("a prompt", image=str(image) if mode == "i2v" else None)
    condition = sampling.inpaint_condition(vae, request, geo, reference_noise=False,
                                           generator=torch.Generator().manual_seed(0))
    transformer = models.load_transformer(model, torch.float32).eval()
    with torch.no_grad():
        latents = sampling.denoise(transformer, models.load_sampling_scheduler(model), prompt, negative, condition,
                                   geo, steps=meta["steps"], guidance_scale=meta["guidance_scale"], seed=meta["seed"],
                                   device=torch.device("cpu"), dtype=torch.float32, progress=False)
    assert latents.shape == expected.shape == (1, geo.latent_frames, 16, height // 8, width // 8)
    torch.testing.assert_close(latents, expected, atol=1e-3, rtol=0)   # measured: <= 5e-6 (main: 2.5)
