"""The seed's form: `cogfun train --train_data_dir D --train_data_meta F ...` in one launch.

Precompute into the shard dir (a no-op when its fingerprint matches), then train on it. Both
stages run on every rank of the same launch; nothing of either stage is copied here.
"""

from __future__ import annotations

from pathlib import Path

from cogfun.config import PrecomputeConfig, TrainConfig, subset


def run(cfg: TrainConfig) -> dict:
    from stages.train import train

    if cfg.train_data_meta or cfg.train_data_shards:
        from stages.precompute import precompute

        if not cfg.shard_dir:
            cfg.shard_dir = str(Path(cfg.output_dir) / "shards")
        precompute(subset(cfg, PrecomputeConfig))
    return train(cfg)
