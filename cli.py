#!/usr/bin/env python
"""The `cogfun` command (cogfun/cli.py) run as a script from a checkout: `accelerate launch cli.py train ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cogfun.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
