#!/usr/bin/env bash
# Launch one LongAlign training stage through accelerate, on every visible GPU.
#
#   bash run_unet.sh {align|lcm|reward|reward_lcm} RUN_NAME [--flags passed to the stage script]
#
# Outputs go to runs/STAGE-RUN_NAME; later stages read the earlier ones by explicit path
# (lcm and reward: runs/align-NAME/final; reward_lcm: runs/align-NAME/final runs/lcm-NAME/final).
# Flags after RUN_NAME override these defaults (e.g. --output_dir, --init_from, --text_irrelevant_weight 0.1).
# Launcher settings (not hyper-parameters): NUM_GPUS=N to use N processes instead of all visible
# GPUs; ACCELERATE_CONFIG=FILE to launch with your own accelerate config file; PYTHON to pick the
# interpreter. This script only launches: it kills nothing and logs in nowhere.
set -euo pipefail

usage() {
  echo "usage: bash run_unet.sh {align|lcm|reward|reward_lcm} RUN_NAME [--flags]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
stage=$1
name=$2
shift 2
[ -n "$name" ] && [[ $name != -* ]] || usage
[[ $name != */* ]] || { echo "RUN_NAME '$name' has a '/': runs/STAGE-RUN_NAME would be a folder inside another run" >&2; exit 2; }

case "$stage" in
  align)      script=train_align.py;  chain=() ;;
  lcm)        script=train_lcm.py;    chain=(--init_from "runs/align-$name/final") ;;
  reward)     script=train_reward.py; chain=(--init_from "runs/align-$name/final" --rollout ddim_cfg) ;;
  reward_lcm) script=train_reward.py; chain=(--init_from "runs/align-$name/final" "runs/lcm-$name/final" --rollout lcm) ;;
  *) echo "unknown stage '$stage'" >&2; usage ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  [ -f "$ACCELERATE_CONFIG" ] || { echo "ACCELERATE_CONFIG: no such file '$ACCELERATE_CONFIG'" >&2; exit 2; }
  launch=("$python" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG")
else
  gpus=${NUM_GPUS:-$("$python" -c "import torch; print(torch.cuda.device_count())")}
  [[ $gpus =~ ^[0-9]+$ ]] || { echo "NUM_GPUS must be a whole number (got '$gpus')" >&2; exit 2; }
  if [ "$gpus" -gt 1 ]; then
    launch=("$python" -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" --num_machines 1
            --dynamo_backend no --mixed_precision no)
  else
    # One process: run the script directly. That is what `accelerate launch` does for one
    # process, and it keeps the script's own exit code (2 for a user error) and one-line errors.
    launch=("$python")
  fi
fi

# Under several processes torchrun forwards to them only SIGTERM, SIGINT, SIGHUP and SIGQUIT unless
# told otherwise; the stages also stop with a checkpoint on SIGUSR1, a scheduler's advance notice
# (README, "Stopping"). A value of your own is kept.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}

# ${chain[@]+...}: an empty array (align) is an unbound variable to `set -u` in bash before 4.4
exec "${launch[@]}" "$here/$script" --output_dir "runs/$stage-$name" ${chain[@]+"${chain[@]}"} "$@"
