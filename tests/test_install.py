"""`pip install .` as a GPU user does it (README, "Install on a GPU machine"): into a fresh venv that
already holds torch 2.13.0 (theirs a CUDA build, here the CPU one) and the pinned dependencies. Nothing
of those is reinstalled (pip runs with --no-index: a download would fail), only the `cogfun` namespace
is installed (no top-level cli / stages / pipelines), and the `cogfun` command runs.

The venv sees the test environment's site-packages through a .pth file (no copy, no download); the
source is copied to a temporary folder so that the build leaves nothing in the checkout. ~30 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "requirements.txt", "constraints.txt", "cli.py", "cogfun", "stages",
           "pipelines"]


def test_pip_install_into_a_venv_that_already_holds_torch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the venv alone decides what imports
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    held = Path(sysconfig.get_paths()["purelib"])   # torch 2.13.0 and every pinned dependency
    (site / "held.pth").write_text(f"{held}\n")

    out = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
                          "--no-build-isolation", "-c", "constraints.txt", "-r", "requirements.txt", "."],
                         cwd=src, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Successfully installed cogfun-0.1.0" in out.stdout
    installing = [line for line in out.stdout.splitlines() if line.startswith("Installing collected packages")]
    assert installing == ["Installing collected packages: cogfun"], installing    # torch and the rest: kept
    assert sorted(p.name for p in site.iterdir()) == ["cogfun", "cogfun-0.1.0.dist-info", "held.pth"]
    assert (site / "cogfun-0.1.0.dist-info" / "top_level.txt").read_text().split() == ["cogfun"]
    assert (site / "cogfun" / "stages" / "train.py").is_file() and (site / "cogfun" / "pipelines" / "demo.py").is_file()

    version = subprocess.run([str(venv / "bin" / "cogfun"), "--version"], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
    assert version.returncode == 0 and version.stdout.strip() == "cogfun, version 0.1.0", version.stderr
    help_ = subprocess.run([str(venv / "bin" / "cogfun"), "export-lora", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--format" in help_.stdout, help_.stderr
    probe = ("import importlib.util as u, cogfun.stages.train as t, cogfun.pipelines.precompute_then_train, torch; "
             "print(t.__file__); print(torch.__file__); print([m for m in ('cli', 'stages', 'pipelines') if u.find_spec(m)])")
    lines = subprocess.check_output([str(python), "-c", probe], cwd=tmp_path, env=env, text=True).splitlines()
    assert lines[0] == str(site / "cogfun" / "stages" / "train.py")   # the installed copy, not the checkout
    assert lines[1].startswith(str(held)) and lines[2] == "[]"         # the held torch; no top-level modules
    check = subprocess.run([str(python), "-m", "pip", "check", "--disable-pip-version-check"], env=env,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
