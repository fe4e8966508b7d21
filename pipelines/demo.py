"""`cogfun demo`: tiny InP model + synthetic clips -> precompute -> short training, on the CPU."""

from __future__ import annotations

from pathlib import Path

from cogfun.config import PrecomputeConfig, TrainConfig


def data_settings(meta: Path) -> dict:
    """The demo's data flags: CogVideoX-Fun's arbitrary-resolution recipe, scaled down: bases
    64..128 px, up to 33 frames at 64 px, 5 at 128 px (token-length budget), aspect-ratio buckets,
    2 seeded views per clip, inpaint with the product's default mask policies (CogVideoX-Fun's
    mask distribution, so the i2v validation videos show what the default training gives)."""
    return dict(train_data_dir=str(meta.parent), train_data_meta=str(meta), video_sample_size=64,
                image_sample_size=128, token_sample_size=64, video_sample_n_frames=33, video_sample_stride=1,
                enable_bucket=True, random_hw_adapt=True, training_with_video_token_length=True,
                train_mode="inpaint", seed=42, num_views=2)


def run(workdir: Path, *, steps: int = 20) -> dict:
    from cogfun.lora import LORA_WEIGHT_NAME
    from cogfun.tiny import write_synthetic_dataset, write_tiny_model
    from cogfun.stages.precompute import precompute
    from cogfun.stages.train import train

    workdir = Path(workdir)
    model = workdir / "model"
    if not (model / "model_index.json").exists():
        write_tiny_model(model, "inp", seed=0)
    meta = workdir / "data" / "metadata.json"
    if not meta.exists():
        meta = write_synthetic_dataset(workdir / "data", seed=0)
    data = data_settings(meta)
    common = dict(pretrained_model_name_or_path=str(model), shard_dir=str(workdir / "shards"),
                  mixed_precision="no", dataloader_num_workers=1)
    print(f"== precompute -> {workdir / 'shards'}")
    summary = precompute(PrecomputeConfig(**data, **common))
    print(f"== train -> {workdir / 'output'}")
    # validation videos of the first frame of one of the clips at the middle and the end; a held-out eval loss
    result = train(TrainConfig(**data, **common, output_dir=str(workdir / "output"), overwrite=True, max_train_steps=steps,
                               checkpointing_steps=max(1, steps // 2), learning_rate=1e-3, rank=8,
                               network_alpha=4.0, use_peft_lora=True, report_to="tensorboard",
                               random_frame_crop=True, validation_prompts="A white square slides to the right. | "
                               "A white square slides over a colourful gradient.",
                               validation_images=str(meta.parent / "images" / "square.png"),
                               validation_steps=max(1, steps // 2), validation_num_frames=9, validation_height=64,
                               validation_width=64, validation_num_inference_steps=10, eval_samples=2.0,
                               eval_steps=max(1, steps // 4)))
    (first_step, before), (last_step, after) = result["eval_losses"][0], result["eval_losses"][-1]
    print(f"== demo done: held-out eval loss {before:.4f} (step {first_step}) -> {after:.4f} (step {last_step}) "
          f"over {result['global_step']} steps; "
          f"LoRA at {workdir / 'output' / LORA_WEIGHT_NAME}; "
          f"validation videos in {workdir / 'output' / 'samples'}")
    return {"precompute": summary, "train": result}
