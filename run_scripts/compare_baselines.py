#!/usr/bin/env python
"""Compare methods side by side: `python run_scripts/compare_baselines.py --out DIR [--methods a,b] [--seeds N] [--set K=V]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fedml_fibec.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
