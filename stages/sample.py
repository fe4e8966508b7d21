"""`cogfun sample`: videos from a CogVideoX(-Fun) model folder, optionally with a trained LoRA.

Reads top to bottom: what to generate -> prompts (T5, then freed) and the InP conditioning (VAE)
-> transformer + LoRA -> denoise every video -> VAE decode -> mp4 files. One big component on the
device at a time: an InP model's VAE waits on the CPU while T5 runs and while the transformer
denoises. Every step is a `cogfun.sampling` function shared with validation during
training. Under `accelerate launch` the videos are split across the processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import cogfun
from cogfun.config import ConfigError, SampleConfig


def sample(cfg: SampleConfig) -> list[Path]:
    from cogfun import dist, lowmem, models, sampling, video

    # ------------------------------------------------------------ what to generate
    if not cfg.pretrained_model_name_or_path:
        raise ConfigError("--pretrained_model_name_or_path is required")
    model = cfg.pretrained_model_name_or_path
    tcfg = models.read_component_config(model, "transformer")
    family = models.transformer_family(model)  # refuses what cogfun cannot run (Control/Pose, unknown keys)
    inpaint = family.inpaint
    if cfg.prompts and not (Path(cfg.prompts).suffix.lower() == ".txt" and Path(cfg.prompts).is_file()):
        raise ConfigError(f"--prompts {cfg.prompts}: not a .txt file (one prompt per line); use --prompt for one prompt")
    prompts = ([cfg.prompt] if cfg.prompt else []) + sampling.read_list(cfg.prompts, "--prompts")
    if not prompts:
        raise ConfigError("no prompt: give --prompt \"...\" or --prompts FILE")
    requests = sampling.requests_for(prompts, [cfg.image] if cfg.image else [],
                                     [cfg.end_image] if cfg.end_image else [], family)
    notes: list[str] = []
    geo = sampling.geometry(tcfg, cfg.num_frames, cfg.height, cfg.width, last_frame_known=bool(cfg.end_image),
                            notes=notes)
    if cfg.output and len(requests) > 1:
        raise ConfigError(f"--output names one file but there are {len(requests)} prompts: use --output_dir")
    if not (cfg.output or cfg.output_dir):
        raise ConfigError("give --output out.mp4 (one prompt) or --output_dir D (one mp4 per prompt)")
    outputs = [Path(cfg.output)] if cfg.output else \
        [Path(cfg.output_dir) / f"{sampling.slug(i, r.prompt)}.mp4" for i, r in enumerate(requests)]
    fps = cfg.fps or sampling.default_fps(tcfg)
    lowmem.check_launch(cfg.base_weight_dtype, cfg.offload_blocks, kind="sample", mixed_precision=cfg.mixed_precision,
                        blocks=tcfg.get("num_layers", 30))
    if cfg.offload_blocks and cfg.low_vram:
        raise ConfigError("--offload_blocks and --low_vram: --low_vram already streams every transformer layer "
                          "from the CPU; give one of them")
    storage = lowmem.storage_dtype(cfg.base_weight_dtype, models.dtype_of(cfg.mixed_precision))
    if lowmem.load_dtype(storage, models.dtype_of(cfg.mixed_precision)) != models.dtype_of(cfg.mixed_precision):
        raise ConfigError(f"--base_weight_dtype {cfg.base_weight_dtype} with --mixed_precision {cfg.mixed_precision}: "
                          f"sampling computes in the weights' dtype; for fp32 weights use --mixed_precision no")
    state = dist.partial_state()
    if state.is_main_process:
        for note in notes:
            print(f"note: {note}")
    mine = list(range(state.process_index, len(requests), state.num_processes))
    device, dtype = state.device, models.dtype_of(cfg.mixed_precision)
    if not mine:
        return []
    requests = [requests[i] for i in mine]

    # ------------------------------------------------------------ 1. prompts (T5, freed) + InP conditioning
    vae = models.load_vae(model, dtype, "cpu", slicing=True) if inpaint else None  # on the device once T5 is freed
    inputs = sampling.encode_inputs(model, requests, cfg.negative_prompt, geo, dtype=dtype, device=device,
                                    seed=cfg.seed, low_vram=cfg.low_vram, vae=vae)
    if vae is not None:
        vae.to("cpu")  # back when decoding: the transformer has the device meanwhile

    # ------------------------------------------------------------ 2. transformer + LoRA
    transformer = models.load_transformer(model, dtype).requires_grad_(False).eval()
    lora = sampling.load_lora(transformer, cfg.lora, cfg.lora_scale) if cfg.lora else None
    lowmem.apply_base_weight_dtype(transformer, storage, dtype)   # --base_weight_dtype (after the LoRA: it stays as loaded)
    if cfg.low_vram and device.type != "cpu":
        from accelerate import cpu_offload

        cpu_offload(transformer, execution_device=device)
    elif cfg.offload_blocks:
        lowmem.offload_blocks(transformer, cfg.offload_blocks, device)   # the other layers go to the device
    else:
        transformer.to(device)
    scheduler = models.load_sampling_scheduler(model)

    # ------------------------------------------------------------ 3. denoise
    latents = []
    for j, request in enumerate(requests):
        latents.append(sampling.denoise(
            transformer, scheduler, inputs[f"prompt_embeds.{j}"], inputs["negative_prompt_embeds"],
            inputs.get(f"condition.{j}"), geo, steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            seed=cfg.seed, device=device, dtype=dtype, desc=f"video {mine[j] + 1}/{len(outputs)}").cpu())
    del transformer
    sampling.free_memory()

    # ------------------------------------------------------------ 4. decode, write
    vae = models.load_vae(model, dtype, device, slicing=True) if vae is None else vae.to(device)
    if cfg.low_vram:
        vae.enable_tiling()
    written = []
    for j, request in enumerate(requests):
        settings = {"prompt": request.prompt, "negative_prompt": cfg.negative_prompt, "image": request.image,
                    "end_image": request.end_image, "model": str(model), "lora": lora, "seed": cfg.seed,
                    "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
                    "num_frames": geo.frames, "height": geo.height, "width": geo.width, "fps": fps,
                    "base_weight_dtype": lowmem.dtype_name(storage), "offload_blocks": cfg.offload_blocks,
                    "cogfun_version": cogfun.__version__}
        path = video.write_mp4(outputs[mine[j]], sampling.decode(vae, latents[j]), fps,
                               comment=json.dumps(settings, sort_keys=True))
        written.append(path)
        print(f"wrote {path} ({geo.height}x{geo.width}x{geo.frames} HxWxF, {fps} fps"
              + (f", LoRA {lora['file']} x{lora['scale']:g}" if lora else "") + ")")
    return written
