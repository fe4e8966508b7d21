"""cogfun: a two-stage (precompute, then train) LoRA trainer for CogVideoX-Fun.

Installed (`pip install .`), everything lives in this one namespace: `cogfun.stages` and
`cogfun.pipelines` (pyproject.toml maps them from the repo's `stages/` and `pipelines/`) and the
command, `cogfun.cli`. A checkout keeps the project's layout (stages/, pipelines/ and cli.py beside
cogfun/): there the repo root is added to this package's search path, so the same names import.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "stages").is_dir() and (_checkout / "stages" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__)
