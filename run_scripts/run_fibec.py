#!/usr/bin/env python
"""Run FibecFed (or FedAvg-LoRA) over FedML: `mpirun -np 11 python run_scripts/run_fibec.py [--cf F] [--set K=V]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fedml_fibec.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
