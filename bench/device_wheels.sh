#!/usr/bin/env bash
# Download, on this machine, the wheels that bench/run.py needs on the GPU machine and its image
# lacks (see the device tool's KINDS.md: it has torch, accelerate, safetensors, tokenizers 0.23,
# huggingface_hub 1.33, ... but not diffusers or pysbd, and older transformers/peft), pinned as
# requirements.txt pins them, into .whl/ (git-ignored). Then carry .whl with bench/gpu_table.sh:
#   bash bench/device_wheels.sh
#   run: carry [".whl"], command "bash bench/gpu_table.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() { grep -E "^$1==" requirements.txt || { echo "error: $1 is not pinned in requirements.txt" >&2; exit 2; }; }
# diffusers needs importlib_metadata (not in the image); transformers 5.24 needs regex >= 2025.10.22.
wheels=("$(pinned diffusers)" "$(pinned transformers)" "$(pinned peft)" "$(pinned pysbd)" importlib_metadata==10.2.0 regex==2026.11.19)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
du -sh .whl
