"""Validation videos during `cogfun train` (DESIGN §9), with the sampling code of `cogfun sample`.

- **T5 never enters the training process.** `prepare` (at the start of training, before the
  transformer is loaded) has a short-lived process (`python -m cogfun.sampling`) encode the
  validation prompts, the negative prompt and, for InP models, the first-frame conditioning,
  into `<output_dir>/validation/inputs.safetensors`. A later run (a resume) reuses the file when
  the prompts, images, video size, seed, precision and the T5 / tokenizer / VAE files are the same.
  Only rank 0 reads or writes that file; it sends the tensors to the other ranks, so the other
  machines of a run need not share `--output_dir` for validation.
- **The VAE is loaded only to decode, only while validating**, and freed after (`render`).
- **Distributed.** The prompts are split across the ranks (prompt i on rank i % world). Under
  FSDP every rank must run the same number of transformer forwards (each gathers the sharded
  weights), so ranks with fewer prompts render a padding prompt whose result is dropped; no rank
  waits on another for a prompt count that does not divide by the world size. Each rank decodes
  its own latents; the frames are gathered to rank 0, which writes
  `<output_dir>/samples/step-<N>/<NN>-<prompt words>.mp4` (+ `index.json`) and a frame strip per
  video to TensorBoard. A video depends on (seed, prompt) only, not on the rank that made it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cogfun import models, sampling
from cogfun.buckets import PATCH, VAE_SPATIAL, floor_4k1
from cogfun.config import TrainConfig

VALIDATION_DIR = "validation"
INPUTS_FILE = "inputs.safetensors"
SAMPLES_DIR = "samples"
GRID_FRAMES = 8  # frames per TensorBoard strip


@dataclass
class Validation:
    requests: list[sampling.Request]
    geo: sampling.Geometry
    inputs: dict          # cogfun.sampling.encode_inputs' tensors, on the CPU
    fps: int


def plan(cfg: TrainConfig) -> tuple[list[sampling.Request], sampling.Geometry]:
    """The validation requests and their geometry, checked (the model's configs are read, not the images).

    Defaults: --video_sample_n_frames rounded down to 4k+1 and --video_sample_size floored to a
    multiple of 16, as precompute rounds them; a message names the flag a value came from."""
    model = cfg.pretrained_model_name_or_path
    tcfg = models.read_component_config(model, "transformer")
    family = models.transformer_family(model)  # refuses what cogfun cannot run
    prompts = sampling.read_list(cfg.validation_prompts, "--validation_prompts")
    images = sampling.read_list(cfg.validation_images, "--validation_images")
    requests = sampling.requests_for(prompts, images, [], family,
                                     names=("--validation_prompts", "--validation_images", "-"))
    frames, height, width = cfg.validation_num_frames, cfg.validation_height, cfg.validation_width
    flags = ["--validation_num_frames", "--validation_height", "--validation_width"]
    # (a default that rounds to nothing stays as given, so that the message shows the user's value)
    if frames is None:
        frames, flags[0] = floor_4k1(cfg.video_sample_n_frames) or cfg.video_sample_n_frames, "--video_sample_n_frames"
    side = VAE_SPATIAL * PATCH
    size = cfg.video_sample_size // side * side or cfg.video_sample_size
    if height is None:
        height, flags[1] = size, "--video_sample_size"
    if width is None:
        width, flags[2] = size, "--video_sample_size"
    return requests, sampling.geometry(tcfg, frames, height, width, flags=tuple(flags))


def inputs_spec(cfg: TrainConfig, output_dir: Path, device: str) -> tuple[list[sampling.Request], sampling.Geometry, dict]:
    """The validation requests, their geometry and the encoder spec (`cogfun.sampling.make_spec`)."""
    model = cfg.pretrained_model_name_or_path
    requests, geo = plan(cfg)
    spec = sampling.make_spec(model, requests, cfg.validation_negative_prompt, geo, seed=cfg.seed,
                              mixed_precision=cfg.mixed_precision, device=device,
                              out=output_dir / VALIDATION_DIR / INPUTS_FILE, low_vram=cfg.low_vram)
    return requests, geo, spec


def prepare(cfg: TrainConfig, output_dir: Path, accelerator) -> Validation | None:
    """The encoded validation inputs on every rank: rank 0 encodes them (a side process) or reuses
    its cached file, and sends the tensors to the other ranks, which never read <output_dir> (it
    need not be shared between machines)."""
    if not cfg.validation_prompts:
        return None
    from safetensors.torch import load, save

    from cogfun import dist

    blob = None
    if accelerator.is_main_process:
        requests, geo, spec = inputs_spec(cfg, output_dir, str(accelerator.device))
        tensors = sampling.cached_inputs(spec)
        if tensors is None:
            t0 = time.time()
            tensors = sampling.encode_in_subprocess(spec)
            print(f"validation: {len(requests)} prompt(s) encoded by a separate T5 process in {time.time() - t0:.1f} s "
                  f"-> {spec['out']}")
        blob = save(tensors)  # safetensors bytes: a few MB per prompt
    else:
        requests, geo = plan(cfg)
    inputs = load(dist.broadcast(blob, accelerator))
    tcfg = models.read_component_config(cfg.pretrained_model_name_or_path, "transformer")
    return Validation(requests, geo, inputs, sampling.default_fps(tcfg))


def render(v: Validation, accelerator, transformer, *, cfg: TrainConfig, step: int, output_dir: Path, scheduler,
           dtype, same_forward_count: bool) -> float:
    """Render every validation prompt with the current weights; rank 0 writes them. Call on every rank.

    `same_forward_count`: FSDP (every rank runs the same number of denoising loops). Returns seconds.
    """
    import torch

    from cogfun import dist

    t0 = time.time()
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(v.requests)
    mine = list(range(rank, n, world))
    runs = mine + [0] * ((-(-n // world) - len(mine)) if same_forward_count else 0)
    model = accelerator.unwrap_model(transformer)
    model.eval()
    latents = {}
    with torch.no_grad(), accelerator.autocast():
        for k, i in enumerate(runs):
            lat = sampling.denoise(model, scheduler, v.inputs[f"prompt_embeds.{i}"], v.inputs["negative_prompt_embeds"],
                                   v.inputs.get(f"condition.{i}"), v.geo, steps=cfg.validation_num_inference_steps,
                                   guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed,
                                   device=accelerator.device, dtype=dtype, progress=accelerator.is_main_process,
                                   desc=f"validation {k + 1}/{len(runs)}")
            if k < len(mine):
                latents[i] = lat.cpu()
    model.train()
    frames = {}
    if latents:  # the VAE exists only now, on the ranks that have videos to decode
        vae = models.load_vae(cfg.pretrained_model_name_or_path, models.dtype_of(cfg.mixed_precision),
                              accelerator.device, slicing=True)
        vae.enable_tiling()  # bounds the decode's extra peak at large sizes
        frames = {i: sampling.decode(vae, lat) for i, lat in latents.items()}
        del vae
        sampling.free_memory()
    gathered = dict(dist.gather(sorted(frames.items()), accelerator))
    seconds = time.time() - t0
    if accelerator.is_main_process:
        write(v, gathered, cfg=cfg, step=step, output_dir=output_dir, accelerator=accelerator, seconds=seconds)
    del frames, gathered, latents
    sampling.free_memory()
    return seconds


def write(v: Validation, frames: dict, *, cfg: TrainConfig, step: int, output_dir: Path, accelerator,
          seconds: float) -> Path:
    """`samples/step-<N>/`: one mp4 per prompt + index.json; a frame strip per video in TensorBoard."""
    import numpy as np

    from cogfun import video
    from cogfun.shards import write_json_atomic

    folder = output_dir / SAMPLES_DIR / f"step-{step}"
    tracker = accelerator.get_tracker("tensorboard", unwrap=True) if cfg.report_to == "tensorboard" else None
    entries = []
    for i, request in enumerate(v.requests):
        name = sampling.slug(i, request.prompt)
        settings = {"step": step, **asdict(request), "seed": cfg.seed, "num_frames": v.geo.frames,
                    "height": v.geo.height, "width": v.geo.width, "fps": v.fps,
                    "num_inference_steps": cfg.validation_num_inference_steps,
                    "guidance_scale": cfg.validation_guidance_scale, "negative_prompt": cfg.validation_negative_prompt}
        video.write_mp4(folder / f"{name}.mp4", frames[i], v.fps, comment=json.dumps(settings, sort_keys=True))
        entries.append({"file": f"{name}.mp4", **settings})
        if tracker is not None:
            pick = np.linspace(0, len(frames[i]) - 1, min(GRID_FRAMES, len(frames[i]))).round().astype(int)
            tracker.add_image(f"validation/{name}", np.concatenate(list(frames[i][pick]), axis=1), step,
                              dataformats="HWC")
    write_json_atomic(folder / "index.json", {"step": step, "seconds": round(seconds, 3), "videos": entries})
    print(f"validation at step {step}: {len(entries)} video(s) in {seconds:.1f} s -> {folder}")
    return folder
