"""The seed's form: `cogfun train --train_data_dir D --train_data_meta F ...` in one launch.

Precompute into the shard dir (a no-op when its fingerprint matches), then train on it; another
run in --output_dir is refused before precompute encodes anything (precompute itself refuses a
model that does not fit --train_mode and --mask_policy_weights that train would refuse). Both
stages run on every rank of the same launch; nothing of either stage is copied here.
"""

from __future__ import annotations

from pathlib import Path

from cogfun.config import PrecomputeConfig, TrainConfig, subset


def run(cfg: TrainConfig) -> dict:
    from cogfun.lowmem import check_launch
    from cogfun.models import read_component_config
    from cogfun.stages.train import launch_kind, train

    if cfg.train_data_meta or cfg.train_data_shards:
        # refused before any encoding, as train (which checks them again) would refuse them
        check_launch(cfg.base_weight_dtype, cfg.offload_blocks, kind=launch_kind(), mixed_precision=cfg.mixed_precision,
                     blocks=read_component_config(cfg.pretrained_model_name_or_path, "transformer").get("num_layers", 30)
                     if cfg.pretrained_model_name_or_path else None)
        from cogfun.runs import claim_output_dir
        from cogfun.stages.precompute import precompute

        if not cfg.shard_dir:
            cfg.shard_dir = str(Path(cfg.output_dir) / "shards")
        # another run in --output_dir: refused before the encode (precompute refuses the rest itself)
        claim_output_dir(Path(cfg.output_dir), resuming=bool(cfg.resume_from_checkpoint), overwrite=cfg.overwrite,
                         delete=False)
        precompute(subset(cfg, PrecomputeConfig))
    return train(cfg)
