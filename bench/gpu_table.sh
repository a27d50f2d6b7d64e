#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md in one command, on the device machine:
#   bash bench/gpu_table.sh [SECONDS] [bench/run.py flags ...]
# Installs the wheels of bench/device_wheels.sh from .whl/ when they were carried, checks in seconds
# that every import the table needs works (exit 3 if not: nothing is measured), records the GPU,
# then runs `bench/run.py --size sd15 --stage all --gpu-table` (or the flags given) in what is left
# of SECONDS (default 540), counted from the script's start. With the default flags no measurement
# starts in the last 45 s (--deadline-s), nor the long all-50 row in the last 195 s, so each row
# ends inside the limit. Rows run in order of priority (each stage's own row, the 77-token and
# encoder comparisons, then all-50 backprop, then the align ablations). Into $OUT (default
# bench/gpu_out): results.json (rewritten after every row, so a run the limit cuts off keeps what it
# measured), preflight.txt, log.txt, gpu.txt and table.md. Exit status: 0 when every row ran or was
# skipped by the deadline, 1 if the wheels did not install or a row failed, 2 for bad run.py flags,
# 3 if the preflight failed, 4 if cut off by the limit.
# Launcher settings: WHEELS (default .whl) is the wheel folder; PYTHON (default python3) the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
limit="${1:-540}"
[ $# -gt 0 ] && shift
flags=("$@")
out="${OUT:-bench/gpu_out}"
wheels="${WHEELS:-.whl}"
python="${PYTHON:-python3}"
mkdir -p "$out"
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Everything the table imports, before minutes go into writing models (the stage scripts import
# the whole library; open_clip is only located, for its BPE file).
if ! timeout 180 "$python" - >"$out/preflight.txt" 2>&1 <<'EOF'
import importlib.util, sys
import torch, diffusers, transformers, peft, accelerate, pysbd, sentencepiece, safetensors
import longalign.training, longalign.pipeline, train_align, train_lcm, train_reward, bench.models
assert importlib.util.find_spec("open_clip") is not None, "open_clip_torch is not installed"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)
EOF
then
    cat "$out/preflight.txt"
    compgen -G "$wheels/*.whl" >/dev/null || echo "no wheels in $wheels/: run bench/device_wheels.sh and carry .whl"
    echo "preflight failed: nothing measured"
    exit 3
fi
cat "$out/preflight.txt"
left=$((limit - SECONDS))  # the install and the preflight came out of the limit
[ ${#flags[@]} -gt 0 ] || flags=(--size sd15 --stage all --gpu-table --deadline-s "$((left > 90 ? left - 45 : left / 2))")
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1 \
    || echo "no nvidia-smi" >"$out/gpu.txt"
left=$((limit - SECONDS))
timeout "$((left > 1 ? left : 1))" "$python" bench/run.py "${flags[@]}" --out "$out/results.json" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ]; then
    echo "cut off at the $limit s limit: table.md holds the rows measured before it, if any"
    status=4
fi
"$python" bench/run.py --table "$out/results.json" >"$out/table.md" 2>&1 || true
exit "$status"
