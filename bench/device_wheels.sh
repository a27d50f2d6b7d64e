#!/usr/bin/env bash
# Download, on this machine, the wheels that bench/run.py needs on the GPU machine and its image
# lacks (see the device tool's KINDS.md: it has torch, accelerate, safetensors, tokenizers 0.23,
# huggingface_hub 1.33, timm, ... but not diffusers, pysbd or open_clip, whose BPE file the models'
# CLIP tokenizer is written from, and older transformers/peft), pinned as
# requirements.txt pins them, into .whl/ (git-ignored). Then carry .whl with bench/gpu_table.sh:
#   bash bench/device_wheels.sh
#   run: carry [".whl"], command "bash bench/gpu_table.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() { grep -E "^$1==" requirements.txt || { echo "error: $1 is not pinned in requirements.txt" >&2; exit 2; }; }
# Their needs: regex >= 2025.10.22 for transformers 5.24 (pinned here, as the image's version is not
# recorded), and ftfy with its wcwidth for open_clip. Not importlib_metadata: on Python 3.12 diffusers
# uses the standard library's, and version 10 of the backport fails to import without lazy-importer.
wheels=("$(pinned diffusers)" "$(pinned transformers)" "$(pinned peft)" "$(pinned pysbd)" "$(pinned open_clip_torch)"
    regex==2026.11.19 ftfy==6.3.1 wcwidth==0.9.4)
rm -rf .whl  # a stale wheel of another version would be installed beside the pinned one
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
du -sh .whl
