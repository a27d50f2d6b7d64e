#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md in one command, on the device machine:
#   bash bench/gpu_table.sh [SECONDS] [bench/run.py flags ...]
# Installs the wheels of bench/device_wheels.sh from .whl/ when they were carried, records the GPU,
# then runs `bench/run.py --size sd15 --stage all --gpu-table` (or the flags given) under a limit of
# SECONDS (default 540). Into $OUT (default bench/gpu_out): results.json (rewritten after every row,
# so a run the limit cuts off keeps what it measured), log.txt, gpu.txt and table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
limit="${1:-540}"
[ $# -gt 0 ] && shift
flags=("$@")
[ ${#flags[@]} -gt 0 ] || flags=(--size sd15 --stage all --gpu-table)
out="${OUT:-bench/gpu_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1 || echo "no nvidia-smi" >"$out/gpu.txt"
timeout "$limit" python3 bench/run.py "${flags[@]}" --out "$out/results.json" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "cut off after $limit s: table.md holds the rows measured so far"
python3 bench/run.py --table "$out/results.json" >"$out/table.md" 2>&1 || true
exit "$status"
