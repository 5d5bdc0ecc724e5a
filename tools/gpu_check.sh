#!/usr/bin/env bash
# GPU check for one H100/H200 with no network, in under 8 minutes:
#   1. a virtualenv over the system torch, plus the small wheels shipped in tools/wheels/
#      for whatever does not import yet (megatron-core and friends)
#   2. the GPU-marked tests (pytest -m gpu)
#   3. the Triton kernels compiled and checked against their torch references
#      (tests/kernels runs them compiled on CUDA), and their speed (tools/bench_kernels.py)
#   4. the ViT-L/14 OpenVision 2 training step, bf16: stage 1 at 84 px, stage 2 at 224 px
#      (tools/bench.py, synthetic batches, the real megatron step)
#   5. a short table, last. Everything is kept in $OUT (default runs/gpu_check/<time>).
# Each phase has its own time limit (60 + 100 + 90 + 45 + 90 + 90 s: under 8 minutes even if
# every phase runs out); a failed phase is reported and the next one still runs.
#
# Fill tools/wheels/ first, on any machine with network, for the GPU box's Python (X.Y from
# `python3 --version` there), from the repository root (~30 MB; never committed):
#
#   PY=3.12
#   pip download --no-deps --only-binary=:all: --python-version "$PY" \
#       --platform manylinux_2_28_x86_64 -d tools/wheels \
#       megatron-core==0.16.1 psutil sentencepiece pillow numpy \
#       pytest pytest-timeout pluggy iniconfig packaging pygments
#
# then copy the repository (with tools/wheels/) to the GPU box and run, from its root:
#
#   bash tools/gpu_check.sh                       # PYTHON=python3.12 to pick an interpreter
#
# Transformer Engine is optional: without it the local megatron spec runs (the table says
# which); the TE tests then skip. Knobs: OUT, PYTHON, STEPS (timed steps, default 10),
# S1_MB / S2_MB (micro-batches, default 256 / 64), S1_M / S2_M (micro-batches per step, 4).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
WHEELS="$ROOT/tools/wheels"
STEPS="${STEPS:-10}"
S1_MB="${S1_MB:-256}"; S1_M="${S1_M:-4}"
S2_MB="${S2_MB:-64}"; S2_M="${S2_M:-4}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STARTED=$SECONDS
declare -a PHASES=()

say() { echo "[gpu_check $(( SECONDS - STARTED ))s] $*" | tee -a "$LOG"; }

# run_phase NAME SECONDS CMD...: run with a time limit, log, record PASS/FAIL/TIMEOUT.
run_phase() {
    local name="$1" limit="$2"; shift 2
    say "phase $name (limit ${limit}s): $*"
    local code=0
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || code=$?
    local status="PASS"
    if [[ $code -eq 124 || $code -eq 137 ]]; then status="TIMEOUT"; elif [[ $code -ne 0 ]]; then status="FAIL($code)"; fi
    PHASES+=("$name:$status")
    say "phase $name: $status (log: $LOG)"
    [[ $status == PASS ]]
}

# --- 0. the machine -------------------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null; then
    echo "gpu_check: $PYTHON not found; set PYTHON=/path/to/python" >&2; exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    echo "gpu_check: torch with CUDA is not importable by $PYTHON (or no GPU is visible)" >&2; exit 2
fi
"$PYTHON" - <<'EOF' | tee -a "$LOG"
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm{p.major}{p.minor}; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")
EOF

# --- 1. environment -------------------------------------------------------------------------
# A virtualenv over the system packages keeps the box's Python untouched; where `venv` is
# unavailable, a private user site under $OUT does the same job.
PIP_TARGET_ARGS=()
if "$PYTHON" -m venv --system-site-packages "$OUT/venv" >>"$LOG" 2>&1 \
        && "$OUT/venv/bin/python" -m pip --version >/dev/null 2>&1; then
    PY="$OUT/venv/bin/python"
else
    say "no usable venv module: installing into a private user site ($OUT/pyuser)"
    export PYTHONUSERBASE="$OUT/pyuser"
    PY="$PYTHON"; PIP_TARGET_ARGS=(--user)
fi
MISSING=()
for pair in megatron.core:megatron-core psutil:psutil sentencepiece:sentencepiece PIL:pillow \
            numpy:numpy pytest:pytest pytest_timeout:pytest-timeout; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || MISSING+=("${pair#*:}")
done
if [[ ${#MISSING[@]} -eq 0 ]]; then
    say "all Python packages present"; PHASES+=("install:PASS")
elif ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: ${MISSING[*]} missing and no wheels in $WHEELS: fill it as this script's" \
         "header says (pip download ... -d tools/wheels), then rerun" >&2
    exit 2
else
    # pytest's own dependencies come along when pytest itself is missing.
    if [[ " ${MISSING[*]} " == *" pytest "* ]]; then MISSING+=(pluggy iniconfig packaging pygments); fi
    run_phase install 60 "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps \
        ${PIP_TARGET_ARGS[@]+"${PIP_TARGET_ARGS[@]}"} "${MISSING[@]}" || { echo "gpu_check: wheel install failed: see $LOG" >&2; exit 2; }
fi
if "$PY" -c "import transformer_engine" 2>/dev/null; then IMPL="transformer_engine"; else
    IMPL="local"; say "no Transformer Engine: the local megatron spec runs; TE tests skip"; fi

# --- 2. GPU-marked tests --------------------------------------------------------------------
run_phase gpu_tests 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests || true

# --- 3. Triton kernels: compiled, checked against torch, timed ------------------------------
run_phase kernels 90 "$PY" -m pytest -q -p no:cacheprovider tests/kernels || true
run_phase kernel_speed 45 "$PY" tools/bench_kernels.py speed || true

# --- 4. the ViT-L/14 OpenVision 2 step, bf16 ------------------------------------------------
run_phase bench_stage1 90 "$PY" tools/bench.py --recipe vit_l14 --stage 1 \
    --set "train.micro_batch=$S1_MB" --set "train.global_batch=$(( S1_MB * S1_M ))" \
    --steps "$STEPS" --warmup 3 --json "$OUT/l14_stage1_84px.json" || true
run_phase bench_stage2 90 "$PY" tools/bench.py --recipe vit_l14 --stage 2 \
    --set "train.micro_batch=$S2_MB" --set "train.global_batch=$(( S2_MB * S2_M ))" \
    --steps "$STEPS" --warmup 3 --json "$OUT/l14_stage2_224px.json" || true
"$PY" tools/bench.py --merge "$OUT" >>"$LOG" 2>&1 || true  # also writes $OUT/results.md

# --- 5. the table, last ---------------------------------------------------------------------
"$PY" - "$OUT" "$IMPL" "$(( SECONDS - STARTED ))" "${PHASES[@]}" <<'PYEOF'
import json, os, sys
out, impl, seconds, phases = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
print()
print(f"gpu_check: {seconds}s, layers: {impl}, results: {out}")
print("phases: " + "  ".join(phases))
print(f"{'run':18s} {'img/s':>8s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>8s} "
      f"{'pred GiB':>8s} {'step s':>7s}")
device = "?"
for name in ("l14_stage1_84px", "l14_stage2_224px"):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        print(f"{name:18s} no result: see {out}/gpu_check.log")
        continue
    with open(path) as f:
        r = json.load(f)
    device = r["device"]
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"{name:18s} {r['images_per_s']:8.0f} {r['tokens_per_s']:9.0f} "
          f"{r['tflops_per_device']:8.1f} {mfu:>6s} {r['peak_memory_gib']:8.1f} "
          f"{r['predicted_memory_gib']:8.1f} {r['step_time_s']:7.3f}")
print(f"device: {device}; MFU = model FLOPs / dense bf16 peak; pred = memory model")
PYEOF
[[ " ${PHASES[*]} " != *FAIL* && " ${PHASES[*]} " != *TIMEOUT* ]]
