#!/usr/bin/env bash
# The prepared GPU benchmark (issue 25): one command, no installs, nvib from the working tree.
#   bash benchmarks/device.sh OUT_DIR      (writes OUT_DIR/device.json and OUT_DIR/device.md)
set -euo pipefail
out=${1:?usage: benchmarks/device.sh OUT_DIR}
cd "$(dirname "$0")/.."
PYTHONPATH=src timeout 470 python benchmarks/device.py --out "$out"
