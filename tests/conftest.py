"""Shared test fixtures: tiny real models and a synthetic dataset, built once per session.

- ``tiny_model_inp``: a CogVideoX-Fun-InP-shaped model folder (transformer in_channels 33).
- ``tiny_model_t2v``: the text-to-video variant (in_channels 16).
- ``synthetic_data``: ``metadata.json`` of :func:`cogfun.tiny.write_synthetic_dataset`
  (5 clips, one too short at stride >= 2, and 3 images); the data dir is its parent.

Tests run on a small shared CPU: one OpenMP thread, DeepSpeed's JIT ops cached in the venv.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_inp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cogfun.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "inp", "inp", seed=0)


@pytest.fixture(scope="session")
def tiny_model_t2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cogfun.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "t2v", "t2v", seed=0)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the synthetic dataset's metadata.json (train_data_dir = its parent). Read-only:
    copy it (shutil.copytree) before changing anything."""
    from cogfun.tiny import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", seed=0)
