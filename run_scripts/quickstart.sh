#!/usr/bin/env bash
# Set everything up (packages, Open MPI, offline assets), then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash run_scripts/install.sh
bash run_scripts/run_main.sh "$@"
