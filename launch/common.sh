# shellcheck shell=bash
# Launcher logic shared by launch/vit_1b.slurm, launch/vit_l14.slurm and launch/torchrun.sh.
# Sourced, never run. The .slurm scripts set their recipe and call ov2_slurm_job; torchrun.sh
# uses the argument and environment helpers.
#
# Overrides without editing a script: environment variables (sbatch and srun pass the
# submitting shell's environment on), then trailing arguments, which go to ov2-train verbatim
# and come last, so they win:
#
#   OV2_RECIPE=tiny_cpu OV2_STEPS=100 sbatch launch/vit_1b.slurm --set train.lr=5e-4
#
#   OV2_RECIPE          --recipe (each .slurm script sets its own default)
#   OV2_STAGE           --stage: 1 (low resolution) or 2 (high resolution)
#   OV2_STEPS           train.steps
#   OV2_TP, OV2_PP      parallel.tensor, parallel.pipeline
#   OV2_VPP, OV2_SP     parallel.virtual_pipeline, parallel.sequence_parallel (true/false)
#   OV2_MICRO_BATCH     train.micro_batch
#   OV2_TRAIN_DATA      data.train_shards (glob, directory or comma list of webdataset tars)
#   OV2_VAL_DATA        data.val_shards
#   OV2_TOKENIZER       data.tokenizer_model
#   OV2_OUTPUT_DIR      train.output_dir; Slurm default: runs/<recipe>-stage<S>-<job id> under
#                       the submission directory. Pass an earlier job's directory to continue it.
#   OV2_INIT_FROM       train.init_from (stage 2: the stage-1 run directory)
# Launcher settings (not ov2-train keys):
#   OV2_PYTHON          interpreter that has ov2_megatron (default python3)
#   OV2_CONTAINER_IMAGE Slurm + pyxis: run every task in this image (the Dockerfile's, e.g. an
#                       `enroot import dockerd://ov2-megatron` .sqsh file)
#   OV2_CONTAINER_MOUNTS extra pyxis mounts, SRC:DST[,...] (data, caches, a run directory
#                       elsewhere); the submission directory is always mounted at its own path
#                       and is the working directory, so a checkout submitted from runs its own
#                       ov2_megatron on the image's CUDA, torch, Transformer Engine and DALI
#   OV2_MAX_RESTARTS    self-requeues allowed before a job gives up (default 50)
#   OV2_MASTER_PORT     rendezvous port (default 20000 + job id % 20000)
# Package settings passed through as they are: OV2_CACHE (tiny_cpu's synthetic data), NCCL_*.
#
# Nothing read from a file or the environment is ever evaluated by this shell: bash arithmetic
# evaluates the text of a variable as an expression, so `a[$(cmd)]` in `(( x > 0 ))` runs
# cmd. Every number (OV2_*, SLURM_*, checkpoints/latest) is checked to be decimal digits first
# (ov2_check_env, ov2_uint), names by a pattern; paths and other values are passed on as data.

# Environment variable -> ov2-train --set key, in the order they are applied.
OV2_SET_KEYS=(
  OV2_STEPS=train.steps
  OV2_TP=parallel.tensor
  OV2_PP=parallel.pipeline
  OV2_VPP=parallel.virtual_pipeline
  OV2_SP=parallel.sequence_parallel
  OV2_MICRO_BATCH=train.micro_batch
  OV2_TRAIN_DATA=data.train_shards
  OV2_VAL_DATA=data.val_shards
  OV2_TOKENIZER=data.tokenizer_model
  OV2_OUTPUT_DIR=train.output_dir
  OV2_INIT_FROM=train.init_from
)

ov2_log() {
  printf '[ov2-launch %(%F %T)T] %s\n' -1 "$*"
}

# ov2_uint VALUE: true if VALUE is a plain decimal number, the only text arithmetic may see.
ov2_uint() {
  [[ $1 =~ ^[0-9]{1,18}$ ]]
}

# ov2_number NAME DEFAULT: print $NAME (or DEFAULT when unset/empty) as a decimal number
# (leading zeros dropped, so arithmetic never reads it as octal); fail naming NAME otherwise.
ov2_number() {
  local value=${!1:-$2}
  if ! ov2_uint "$value"; then
    ov2_log "error: $1='$value' is not a number (decimal digits only)" >&2
    return 2
  fi
  printf '%s\n' "$((10#$value))"
}

# Check the OV2_* settings that the launcher itself uses or that must be numbers or names
# (paths and train values are passed to ov2-train as data, which validates them); exit 2
# naming the first bad one. Run before anything uses them.
ov2_check_env() {
  local var
  for var in OV2_STEPS OV2_TP OV2_PP OV2_VPP OV2_MICRO_BATCH OV2_MAX_RESTARTS OV2_MASTER_PORT; do
    if [[ -n ${!var:-} ]] && ! ov2_uint "${!var}"; then
      ov2_log "error: $var='${!var}' is not a number (decimal digits only)" >&2
      exit 2
    fi
  done
  if [[ -n ${OV2_STAGE:-} && ! $OV2_STAGE =~ ^[12]$ ]]; then
    ov2_log "error: OV2_STAGE='$OV2_STAGE' must be 1 or 2" >&2
    exit 2
  fi
  if [[ -n ${OV2_SP:-} && ! $OV2_SP =~ ^(true|false)$ ]]; then
    ov2_log "error: OV2_SP='$OV2_SP' must be true or false" >&2
    exit 2
  fi
  if [[ -n ${OV2_RECIPE:-} && ! $OV2_RECIPE =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]]; then
    ov2_log "error: OV2_RECIPE='$OV2_RECIPE' is not a recipe name (letters, digits, _ . -)" >&2
    exit 2
  fi
}

# Print the checkpoint name in OV2_OUTPUT_DIR/checkpoints/latest ("step_" and digits) and
# succeed, or fail (no file, or content that is not such a name: it is never evaluated).
ov2_latest_checkpoint() {
  local latest
  latest=$(head -c 64 "$OV2_OUTPUT_DIR/checkpoints/latest" 2>/dev/null) || return 1
  latest=${latest%$'\n'}
  if [[ ! $latest =~ ^step_[0-9]{1,18}$ ]]; then return 1; fi
  printf '%s\n' "$latest"
}

# OV2_ARGS=(ov2-train arguments): --recipe/--stage and --set pairs from OV2_* variables, then "$@".
ov2_train_args() {
  local pair var
  OV2_ARGS=()
  if [[ -n ${OV2_RECIPE:-} ]]; then OV2_ARGS+=(--recipe "$OV2_RECIPE"); fi
  if [[ -n ${OV2_STAGE:-} ]]; then OV2_ARGS+=(--stage "$OV2_STAGE"); fi
  for pair in "${OV2_SET_KEYS[@]}"; do
    var=${pair%%=*}
    if [[ -n ${!var:-} ]]; then OV2_ARGS+=(--set "${pair#*=}=${!var}"); fi
  done
  OV2_ARGS+=("$@")
}

# GPU or CPU process environment for `tasks_per_node` training processes on this node.
# Sets OV2_DEVICE (for the banner) and exports what every rank inherits.
ov2_runtime_env() {
  local tasks_per_node=$1 gpus=${SLURM_GPUS_ON_NODE:-} cpus
  if ! ov2_uint "$tasks_per_node"; then
    ov2_log "error: tasks per node '$tasks_per_node' is not a number" >&2
    return 2
  fi
  if ! ov2_uint "$gpus"; then  # unset, or not a plain count (e.g. "2(x86)"): count them
    gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
      gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
  fi
  if (( 10#$gpus > 0 )); then
    OV2_DEVICE="$gpus GPUs per node"
    # Megatron overlaps the tensor/sequence-parallel all-gather and reduce-scatter with the
    # neighbouring GEMMs. With one hardware work queue the GPU starts kernels in issue order,
    # so the communication kernel issued first gets its SMs before the GEMM fills the device;
    # with several queues the GEMM can start first and the overlap turns into serialisation.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # Warnings only (set NCCL_DEBUG=INFO to see rings/trees and the transports chosen).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Megatron's distributed optimizer frees gradient buckets right after their reduce-scatter;
    # without this, record_stream keeps them alive until the next sync and peak memory grows.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # A rank's CPU threads only launch kernels; DALI has its own pool (data.num_threads), and
    # more OpenMP threads per rank would only contend with it.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # Site-specific fabric settings (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...) come from the
    # submitting shell or the cluster's defaults; they are not guessed here.
    if (( 10#$tasks_per_node != 10#$gpus )); then
      ov2_log "warning: $tasks_per_node tasks per node on $gpus GPUs; use one task per GPU"
    fi
  else
    OV2_DEVICE="CPU (gloo)"
    if ov2_uint "${SLURM_CPUS_PER_TASK:-}"; then
      cpus=$((10#$SLURM_CPUS_PER_TASK))
    else
      cpus=$(( $(nproc) / (10#$tasks_per_node > 0 ? 10#$tasks_per_node : 1) ))
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus > 0 ? cpus : 1 ))}
  fi
}

# True when the run in OV2_OUTPUT_DIR has a checkpoint at its last step (config.json's steps).
# Both numbers are checked to be digits before the comparison (never evaluated as text).
ov2_run_finished() {
  local latest steps
  latest=$(ov2_latest_checkpoint) || return 1
  steps=$(grep -m 1 -o '"steps": [0-9]*' "$OV2_OUTPUT_DIR/config.json" 2>/dev/null) || return 1
  steps=${steps##* }
  if ! ov2_uint "$steps"; then return 1; fi
  (( 10#${latest#step_} >= 10#$steps ))
}

# Signal handler of the batch shell: forward the signal once to the training ranks, which save
# a checkpoint at the end of the current step and exit 0.
ov2_on_signal() {
  if [[ -n $OV2_STOP ]]; then return; fi
  OV2_STOP=$1
  ov2_log "SIG$1 received: asking the training ranks to checkpoint and stop"
  ov2_signal_ranks "$1"
}

# Send a signal to the task processes of the job's steps (one per rank) and to nothing else.
# `scancel --signal` and srun's own forwarding signal every process of a step, including the
# helper processes a rank spawns (megatron's checkpoint writer starts a multiprocessing manager
# with "spawn", which has no handler: SIGUSR1/SIGTERM kill it and the checkpoint being saved
# fails). So one task per node runs `scontrol listpids`, whose task leaders are the rows with
# a local task id, and signals those alone. Falls back to scancel if that step cannot start.
# shellcheck disable=SC2016  # awk and the per-node bash expand these, not this shell
ov2_signal_ranks() {
  local sig=$1
  # Rows of `scontrol listpids JOB`: PID JOBID STEPID LOCALID GLOBALID; the task leaders of
  # the job's numbered steps, except this signalling step itself.
  local leaders='NR > 1 && $3 ~ /^[0-9]+$/ && $3 != self && $4 != "-" { print $1 }'
  if ! timeout 60 srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" \
      --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c \
      'scontrol listpids "$SLURM_JOB_ID" | awk -v self="$SLURM_STEP_ID" "$1" | xargs -r kill -s "$2"' \
      _ "$leaders" "$sig"; then
    ov2_log "warning: could not signal the ranks one by one; signalling every step process"
    scancel --signal="$sig" "$SLURM_JOB_ID" || ov2_log "warning: scancel --signal=$sig failed"
  fi
}

# Wait for background job `pid` and set OV2_STATUS to its exit status. A trapped signal makes
# `wait` return early (status > 128), so wait again until the process is gone. (Not run in
# $(...): a subshell cannot wait for this shell's children, and traps would be deferred.)
ov2_wait() {
  local pid=$1 again
  OV2_STATUS=0
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" && OV2_STATUS=0 || OV2_STATUS=$?
  done
  wait "$pid" 2>/dev/null && again=0 || again=$?
  if (( again != 127 )); then OV2_STATUS=$again; fi  # 127: already reaped in the loop
}

# End of a batch run: after SIGUSR1 (time limit via --signal=B:USR1@N, or a manual
# `scancel --signal=USR1 --batch`) an unfinished run requeues itself; the next run of this
# script (same job id, same OV2_OUTPUT_DIR) resumes from checkpoints/latest.
ov2_end_run() {
  local status=$1 restarts max_restarts
  restarts=$(ov2_number SLURM_RESTART_COUNT 0) || exit 2
  max_restarts=$(ov2_number OV2_MAX_RESTARTS 50) || exit 2
  if [[ $OV2_STOP == USR1 ]] && ! ov2_run_finished; then
    if (( restarts >= max_restarts )); then
      ov2_log "not requeueing: $restarts restarts already (OV2_MAX_RESTARTS)"
      exit 1
    fi
    ov2_log "training exited with $status after SIGUSR1; latest checkpoint:" \
      "$(ov2_latest_checkpoint || echo 'none (or not a step_N name)')"
    ov2_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from that checkpoint"
    # Slurm ends this run now and starts the script again once the job is eligible (after
    # the step credential lifetime, 120 s by default).
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    ov2_log "scontrol requeue failed (is the partition requeue-able?); resubmit with" \
      "OV2_OUTPUT_DIR=$OV2_OUTPUT_DIR to resume"
    exit 1
  fi
  if [[ -n $OV2_STOP ]]; then
    ov2_log "stopped by SIG$OV2_STOP (exit $status); resume with OV2_OUTPUT_DIR=$OV2_OUTPUT_DIR"
  fi
  exit "$status"
}

# The body of a Slurm batch script: rank wiring, run directory, preflight, one srun task per
# GPU, signal forwarding and self-requeue. "$@": extra ov2-train arguments.
#
# One srun task per GPU rather than one torchrun per node: every rank is then a Slurm task,
#  - so the stop signal reaches exactly the training processes (ov2_signal_ranks). torchrun's
#    agent dies on SIGUSR1 unless configured otherwise, forwards signals with killpg (which
#    also kills megatron's checkpoint helper), gives workers 30 s before SIGKILL, and exits
#    non-zero after a clean stop, so the script could not tell a stop from a crash;
#  - `--kill-on-bad-exit` ends the whole job as soon as any rank dies, instead of the others
#    hanging in a collective until the NCCL timeout;
#  - pyxis starts each task in the container, and there is no second rendezvous layer:
#    ov2_megatron reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the MASTER_* set here.
# Every task sees all of its node's GPUs and picks cuda:SLURM_LOCALID (no per-task
# CUDA_VISIBLE_DEVICES), which keeps NVLink peer access between the ranks of a TP group.
ov2_slurm_job() {
  : "${SLURM_JOB_ID:?submit with sbatch (one node without Slurm: launch/torchrun.sh)}"
  local restarts job_id ntasks tasks_per_node hosts
  local -a container=()
  ov2_check_env
  restarts=$(ov2_number SLURM_RESTART_COUNT 0) || exit 2
  job_id=$(ov2_number SLURM_JOB_ID "") || exit 2
  ntasks=$(ov2_number SLURM_NTASKS "") || exit 2
  OV2_PYTHON=${OV2_PYTHON:-python3}
  OV2_STOP=""

  # Rank wiring. Stale torchrun variables from the submitting shell would take precedence
  # over Slurm's in ov2_megatron.parallel.initialize, so they go.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  export MASTER_ADDR=${hosts[0]}
  # Derived from the job id: stable across requeues, distinct for jobs sharing a node.
  MASTER_PORT=$(ov2_number OV2_MASTER_PORT $((20000 + job_id % 20000))) || exit 2
  export MASTER_PORT

  # Per-job run directory (absolute: containers and every node see the same path).
  OV2_OUTPUT_DIR=${OV2_OUTPUT_DIR:-runs/${OV2_RECIPE}-stage${OV2_STAGE:-1}-$SLURM_JOB_ID}
  if [[ $OV2_OUTPUT_DIR != /* ]]; then OV2_OUTPUT_DIR=$PWD/$OV2_OUTPUT_DIR; fi
  mkdir -p "$OV2_OUTPUT_DIR"

  if ov2_uint "${SLURM_NTASKS_PER_NODE:-}"; then  # "8(x2)" on uneven nodes: derive it
    tasks_per_node=$((10#$SLURM_NTASKS_PER_NODE))
  else
    tasks_per_node=$((ntasks / ${#hosts[@]}))
  fi
  ov2_runtime_env "$tasks_per_node" || exit 2
  ov2_train_args "$@"
  if [[ -n ${OV2_CONTAINER_IMAGE:-} ]]; then
    container=(--container-image="$OV2_CONTAINER_IMAGE" --container-workdir="$PWD"
               --container-mounts="$PWD:$PWD${OV2_CONTAINER_MOUNTS:+,$OV2_CONTAINER_MOUNTS}")
  fi

  ov2_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}), run $((restarts + 1)): $SLURM_NTASKS tasks" \
    "on ${#hosts[@]} node(s) [$SLURM_JOB_NODELIST], $OV2_DEVICE, master $MASTER_ADDR:$MASTER_PORT"
  ov2_log "run directory: $OV2_OUTPUT_DIR"
  ov2_log "container: ${OV2_CONTAINER_IMAGE:-none (host environment)}"
  ov2_log "command: $OV2_PYTHON -m ov2_megatron.train ${OV2_ARGS[*]}"

  # Installed before the first step, so a signal in any window below is forwarded, not fatal.
  trap 'ov2_on_signal USR1' USR1
  trap 'ov2_on_signal TERM' TERM

  if (( restarts == 0 )); then
    # Preflight: the whole config and layout checked once, in one process, for the job's real
    # world size, before all ranks start; one clear message instead of one per rank.
    ov2_log "preflight: validating the config for $SLURM_NTASKS ranks"
    srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${container[@]}" \
      --export="ALL,WORLD_SIZE=$SLURM_NTASKS" \
      "$OV2_PYTHON" -m ov2_megatron.train "${OV2_ARGS[@]}" --dry-run \
      >"$OV2_OUTPUT_DIR/preflight.txt" &
    ov2_wait $!
    if (( OV2_STATUS != 0 )); then
      if [[ -n $OV2_STOP ]]; then ov2_end_run "$OV2_STATUS"; fi
      ov2_log "preflight failed (exit $OV2_STATUS): fix the configuration above; nothing was" \
        "trained"
      exit "$OV2_STATUS"
    fi
    grep -E '^(layout|sequences|alignment|parameters|train FLOPs)' "$OV2_OUTPUT_DIR/preflight.txt" \
      | while IFS= read -r line; do ov2_log "preflight: $line"; done || true
  else
    ov2_log "requeued run (restart $restarts): resuming from $OV2_OUTPUT_DIR/checkpoints/latest" \
      "($(ov2_latest_checkpoint || echo 'none (or not a step_N name): starting over'))"
  fi

  ov2_log "launching training"
  # --cpus-per-task explicitly: srun stopped inheriting it from sbatch in Slurm 23.11, and
  # each rank's DALI threads would otherwise share one core.
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${container[@]}" \
    "$OV2_PYTHON" -m ov2_megatron.train "${OV2_ARGS[@]}" &
  ov2_wait $!
  ov2_log "training step exited with $OV2_STATUS"
  ov2_end_run "$OV2_STATUS"
}
