"""The seed's form: `cogfun train --train_data_dir D --train_data_meta F ...` in one launch.

Precompute into the shard dir (a no-op when its fingerprint matches), then train on it; what train
would refuse without the shards (another run in --output_dir, the model against --train_mode,
--mask_policy_weights) is refused before precompute encodes anything. Both
stages run on every rank of the same launch; nothing of either stage is copied here.
"""

from __future__ import annotations

from pathlib import Path

from cogfun.config import PrecomputeConfig, TrainConfig, subset


def run(cfg: TrainConfig) -> dict:
    from stages.train import preflight, train

    if cfg.train_data_meta:
        from stages.precompute import precompute

        if not cfg.shard_dir:
            cfg.shard_dir = str(Path(cfg.output_dir) / "shards")
        preflight(cfg)  # what train would refuse, refused before the encode
        precompute(subset(cfg, PrecomputeConfig))
    return train(cfg)
