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
#
# Plain `torchrun` (torch 2.13) instead of this script: each worker runs in its own session
# (so Ctrl-C in a terminal reaches only the agent), and the agent
#   - on SIGTERM, SIGINT, SIGHUP, SIGQUIT: sends that signal with killpg to every worker's
#     process group, waits --shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s), then
#     SIGKILLs them, and exits 1 with a SignalException traceback even when every worker saved
#     and exited 0. The workers checkpoint at the step end and exit 0 (their writer helper
#     ignores the signal), so give the agent time for a step and a save;
#   - on SIGUSR1: dies (exit 138), unless started with
#     `--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`, which makes it forward
#     SIGUSR1 like SIGTERM;
#   - on SIGKILL: dies.
# A worker whose agent is gone (SIGUSR1, SIGKILL) notices within a second, checkpoints at the
# step end and exits 0 (ov2_megatron/training/process_lifetime.py). The one way to stop a
# plain-torchrun run with every process exiting 0 is to signal the workers (the agent's
# children) yourself: `pkill -TERM -P <torchrun pid>`, which is what this script does.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/torchrun.sh NPROC [ov2-train arguments...]" >&2
  exit 2
fi
nproc=$1
shift

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ov2_check_env
ov2_runtime_env "$nproc"
ov2_train_args "$@"
# If torchrun itself is signalled (a whole process tree killed from outside), give the workers
# time for a step and a save before its SIGKILL (default 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

# The stop signal goes to the workers alone: torchrun would die on SIGUSR1, and forward
# SIGTERM with killpg to each worker's whole process group (every helper a worker starts)
# and then exit non-zero after a clean stop (see above).
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
