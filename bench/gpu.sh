#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a GPU machine with this repository checked out and its deps installed
# (`pip install -e '.[train,serve,gpu]'`, or `gpu-cu13` on a CUDA 13 host; torch with CUDA). Needs the emoji data set (`xclip-serve data emoji`).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python bench/gpu.py --data "${DATA:-.cache/data/emoji-16.0.0}" --steps "${STEPS:-300}" "$@"
