#!/usr/bin/env bash
# One node, NPROC training processes: one per GPU (NCCL), or CPU processes (gloo) without GPUs.
#
#   launch/torchrun.sh 8 --recipe vit_l14 --stage 1 --set data.train_shards='/data/*.tar'
#   launch/torchrun.sh 2 --recipe tiny_cpu                        # CPU, a few minutes
#
# Arguments after NPROC go to ov2-train; the OV2_* variables of launch/common.sh apply as well.
# Ctrl-C, SIGTERM or SIGUSR1 to this script: the workers save a checkpoint at the end of the
# current step and exit 0 (so does the script); rerun the same command to resume from
# <train.output_dir>/checkpoints/latest.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/torchrun.sh NPROC [ov2-train arguments...]" >&2
  exit 2
fi
nproc=$1
shift

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ov2_runtime_env "$nproc"
ov2_train_args "$@"
# If torchrun itself is signalled (a whole process tree killed from outside), give the workers
# time for a step and a save before its SIGKILL (default 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

# The stop signal goes to the workers alone. torchrun would forward it with killpg to each
# worker's process group, which also kills the helper processes a worker spawns (megatron's
# checkpoint writer) and breaks the checkpoint; and a stop through torchrun exits non-zero.
# shellcheck disable=SC2317  # reached from the traps below
stop_workers() {
  if [[ -n $OV2_STOP ]]; then return; fi
  OV2_STOP=$1
  if pkill "-$2" -P "$torchrun_pid"; then
    ov2_log "SIG$1 received: asking the workers to checkpoint and stop"
  else
    ov2_log "SIG$1 received before the workers started: stopping torchrun"
    kill -TERM "$torchrun_pid" 2>/dev/null || true
  fi
}

OV2_STOP=""
trap 'stop_workers USR1 USR1' USR1
trap 'stop_workers TERM TERM' TERM
trap 'stop_workers INT TERM' INT  # Ctrl-C: the workers ignore SIGINT (background job)

ov2_log "torchrun: $nproc processes, $OV2_DEVICE; ov2-train ${OV2_ARGS[*]}"
# --standalone: a private rendezvous on a free local port (no MASTER_ADDR/PORT to pick).
"${OV2_PYTHON:-python3}" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
  -m ov2_megatron.train "${OV2_ARGS[@]}" &
torchrun_pid=$!
ov2_wait "$torchrun_pid"
exit "$OV2_STATUS"
