#!/usr/bin/env bash
# GPU check for one H100/H200 without network, in at most 6 minutes (two runs fit a 15-minute
# GPU session): a venv over the box's torch plus the wheels in tools/wheels/, the GPU-marked
# tests, the Triton kernels compiled and timed, the ViT-L/14 OpenVision 2 step at stage 1
# (84 px) and stage 2 (224 px), and a short table last. Every phase has its own time limit; a
# failed phase is reported and the next one still runs; the exit status is non-zero if any
# phase failed. Results go to $OUT (default runs/gpu_check/<time>), one log per phase.
#
#   make gpu-wheels                     # once, with network: tools/wheels/ (tools/gpu_wheels.txt)
#   bash tools/gpu_check.sh --dry-run   # anywhere: the plan, wheels, sizes and time budget
#   copy the repository with tools/wheels/ to the GPU box (64 MiB per call in all; a session's
#   `run` tool carries the git-ignored folder with carry=["tools/wheels"]), then from its root:
#   bash tools/gpu_check.sh
#
# Knobs: PYTHON (default python3), OUT, VENV (default runs/gpu_check/venv, reused), STEPS,
# S1_MB/S1_M and S2_MB/S2_M (micro-batch, micro-batches per step), ONLY=phase,phase (install,
# environment and report always run), LIMIT_<phase>=seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUDGET_S=360                      # the whole run, install included
GRACE_S=2                         # timeout's --kill-after, paid on top of a limit that runs out
CARRY_LIMIT=$(( 64 * 1024 * 1024 ))
MANIFEST=tools/gpu_wheels.txt
WHEELS=tools/wheels
export PYTHON="${PYTHON:-python3}" VENV="${VENV:-$ROOT/runs/gpu_check/venv}"
export OUT="${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}" MANIFEST WHEELS
export STEPS="${STEPS:-10}" S1_MB="${S1_MB:-256}" S1_M="${S1_M:-4}"
export S2_MB="${S2_MB:-64}" S2_M="${S2_M:-4}"
export PY="$VENV/bin/python"

# --- the plan: phase, limit (s), command (run by `bash -c`, with the variables above) ------
PHASES=(install environment gpu_tests kernels kernel_speed data_decode bench_stage1 bench_stage2
        report)
declare -A LIMIT=([install]=30 [environment]=15 [gpu_tests]=75 [kernels]=50 [kernel_speed]=20
                  [data_decode]=20 [bench_stage1]=60 [bench_stage2]=60 [report]=10)
# shellcheck disable=SC2016  # single quotes on purpose: `bash -c` expands them at run time
declare -A COMMAND=(
    [install]='make_venv && "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --disable-pip-version-check -q -r "$MANIFEST" && check_imports'
    [environment]='print_environment'
    [gpu_tests]='run_gpu_tests -m gpu -q -p no:cacheprovider --continue-on-collection-errors'
    [kernels]='"$PY" -m pytest -m "not gpu" -q -p no:cacheprovider --junitxml="$OUT/kernels.xml" tests/kernels'
    [kernel_speed]='"$PY" tools/bench_kernels.py speed'
    [data_decode]='decode_rates'
    [bench_stage1]='"$PY" tools/bench.py --recipe vit_l14 --stage 1 --set train.micro_batch=$S1_MB --set train.global_batch=$((S1_MB * S1_M)) --steps $STEPS --warmup 2 --json "$OUT/l14_stage1_84px.json"'
    [bench_stage2]='"$PY" tools/bench.py --recipe vit_l14 --stage 2 --set train.micro_batch=$S2_MB --set train.global_batch=$((S2_MB * S2_M)) --steps $STEPS --warmup 2 --json "$OUT/l14_stage2_224px.json"'
    [report]='"$PY" tools/bench.py --merge "$OUT" >/dev/null; final_report'
)
ALWAYS=" install environment report "
for name in "${PHASES[@]}"; do
    var="LIMIT_$name"
    LIMIT[$name]="${!var:-${LIMIT[$name]}}"
done

selected() { [[ -z "${ONLY:-}" || $ALWAYS == *" $1 "* || ",$ONLY," == *",$1,"* ]]; }

# --- install: a venv over the box's packages, the pinned wheels on top ----------------------
make_venv() {
    local version
    version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || return 1
    if [[ $version != 3.12 ]]; then
        echo "gpu_check: $PYTHON is Python $version; the wheels (tools/gpu_wheels.txt) are for" \
             "CPython 3.12: set PYTHON=python3.12, or re-pin and rerun make gpu-wheels" >&2
        return 1
    fi
    if [[ -x "$PY" ]] && "$PY" -m pip --version >/dev/null 2>&1; then
        echo "reusing $VENV"; return 0
    fi
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv --system-site-packages "$VENV" \
            || ! "$PY" -m pip --version >/dev/null; then
        rm -rf "$VENV"
        echo "gpu_check: '$PYTHON -m venv --system-site-packages $VENV' gave no venv with pip." \
             "Fix: install this Python's venv module (Debian/Ubuntu: apt-get install" \
             "python$version-venv), or set PYTHON= to a Python whose venv works. (A user-site" \
             "install is refused on an externally managed Python, and there is no network.)" >&2
        return 1
    fi
    # --system-site-packages exposes the base installation only: where $PYTHON is itself a
    # venv (or keeps packages in its user site), its packages (torch!) come along through a
    # .pth, after the venv's own site-packages so that the pinned wheels still win.
    "$PYTHON" - "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" <<'EOF'
import os, site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(d)]
with open(os.path.join(sys.argv[1], "gpu_check_outer_site.pth"), "w") as pth:
    pth.writelines(f"import site; site.addsitedir({d!r})\n" for d in dirs)
EOF
}

check_imports() {
    local modules
    modules="$(sed -n 's/^[^#[:space:]][^#]*# *import \([A-Za-z0-9_.]*\),.*/\1/p' "$MANIFEST" \
               | paste -sd,)"
    "$PY" -W ignore - "$modules" <<'EOF'
import importlib, sys
import torch
for name in sys.argv[1].split(","):
    importlib.import_module(name)
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA GPU"
print(f"imports: torch {torch.__version__} from {torch.__file__}, {sys.argv[1]}")
EOF
}

# --- the GPU-marked tests (pytest -m gpu), in the suite's two pytest runs ------------------
run_gpu_tests() {
    # The suite's two halves (tests/conftest.py): the megatron-free tests with megatron-core
    # unimportable, then the rest. Exit 5 (nothing selected) is not a failure.
    local code=0 rc=0
    "$PY" -m pytest "$@" --megatron-free --junitxml="$OUT/gpu_tests_free.xml" tests || rc=$?
    [[ $rc -eq 0 || $rc -eq 5 ]] || code=$rc
    rc=0
    "$PY" -m pytest "$@" --megatron-line --junitxml="$OUT/gpu_tests.xml" tests || rc=$?
    [[ $rc -eq 0 || $rc -eq 5 ]] || code=$rc
    return "$code"
}

# --- environment: GPU, versions, which optional GPU packages are present --------------------
# data_decode: DALI GPU decoding (mixed: nvJPEG + hardware decoder) in images/s per GPU at
# stage 1 (84 px) and stage 2 (224 px), on synthetic 256 px JPEG shards (shapes, smaller and
# simpler than photos: an upper bound); said plainly when DALI is absent.
decode_rates() {
    if ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
        echo "DALI absent: GPU decoding not measured"
        return 0
    fi
    local data="$OUT/decode_data" px
    "$PY" tools/make_synthetic.py --cache-dir "$data" --num-train 3000 --num-val 64 \
        --image-size 256 >"$OUT/decode_data.txt" || return 1
    for px in 84 224; do
        "$PY" tools/bench_data.py --shards "$(sed -n 's/^train: //p' "$OUT/decode_data.txt")" \
            --resolution "$px" --device gpu --dali-only --batch-size 128 --batches 10 \
            --warmup 3 --rounds 1 | tee "$OUT/decode_${px}px.txt" || return 1
    done
}

print_environment() {
    "$PY" -W ignore - "$OUT/environment.json" <<'EOF'
import importlib, importlib.metadata as md, importlib.util, json, platform, sys
import torch

def version(dists, module):
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return getattr(module, "__version__", "?")

def probe(module_name, dists, load=True):
    """Present = imports (TE needs the driver: a TE that does not import is absent); `load`
    False: found, not imported (check_imports imported megatron-core a moment ago)."""
    if not load:
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        return {"present": found, "version": version(dists, None) if found else None,
                "note": "" if found else "absent"}
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return {"present": False, "version": None, "note": "absent"}
    except Exception as error:  # installed, but e.g. OSError (libcuda) or RuntimeError
        return {"present": False, "version": None, "note": f"does not import: {error}"[:200]}
    return {"present": True, "version": version(dists, module), "note": ""}

env = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "gpu": None}
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, gpus=torch.cuda.device_count(), sm=[props.major, props.minor],
               memory_gib=round(props.total_memory / 2**30, 1))
fused = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
         "scaled_softmax_cuda")
env["packages"] = {
    "megatron-core": probe("megatron.core", ["megatron-core"], load=False),
    "Transformer Engine": probe("transformer_engine", ["transformer-engine",
                                                       "transformer_engine"]),
    "DALI": probe("nvidia.dali", [f"nvidia-dali-cuda{v}" for v in (130, 120, 110)]),
    "Apex": probe("apex", ["apex"]),
}
env["packages"]["Apex"]["fused_softmax"] = all(importlib.util.find_spec(m) for m in fused)
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=1)
if env["gpu"]:
    print(f"gpu: {env['gpu']} x{env['gpus']}, {env['memory_gib']} GiB, "
          f"sm{env['sm'][0]}{env['sm'][1]}")
print(f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}")
for name, p in env["packages"].items():
    print(f"{name}: {p['version'] if p['present'] else p['note']}")
sys.exit(0 if env["gpu"] else 1)
EOF
}

# --- report: the table, last (stdlib only, so it also runs with --report on any machine) ----
final_report() {
    python_for_report - "$OUT" "$BUDGET_S" <<'EOF'
import json, os, re, sys
import xml.etree.ElementTree as ET

out, budget = sys.argv[1], int(sys.argv[2])

def load(name, default):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)

env = load("environment.json", {})
pkgs = env.get("packages", {})
phases = []
if os.path.exists(os.path.join(out, "phases.tsv")):
    with open(os.path.join(out, "phases.tsv")) as f:
        phases = [line.rstrip("\n").split("\t") for line in f if line.strip()]
status = {name: st for name, _, st, _ in phases}
cases = {}  # "module.path::test[param]" -> ("passed" | "skipped" | "failed", message)
for xml in ("gpu_tests_free.xml", "gpu_tests.xml", "kernels.xml"):
    path = os.path.join(out, xml)
    if not os.path.exists(path):
        continue
    for case in ET.parse(path).getroot().iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped" and outcome == "passed":
                outcome, message = "skipped", child.get("message", "")
        cases[key] = (outcome, message)

def verdict(prefixes, phases, present=True, absent="not measured (absent)"):
    """The tests under `prefixes`, run by `phases`. Never PASS for what did not run: absent or
    skipped -> not measured; a phase that timed out or did not run wrote no results, so what
    it would have run is missing -> INCOMPLETE at best."""
    if not env:
        return ("not measured (environment unknown: phase environment "
                f"{status.get('environment', 'not run')})")
    if not present:
        return absent
    hits = [v for k, v in cases.items() if any(k.startswith(p) for p in prefixes)]
    failed = [m for o, m in hits if o == "failed"]
    passed = [m for o, m in hits if o == "passed"]
    skipped = [m for o, m in hits if o == "skipped"]
    lost = "; ".join(f"phase {p}: {status.get(p, 'not run')}" for p in phases
                     if not status.get(p, "").startswith(("PASS", "FAIL")))
    if failed:
        return f"FAIL ({len(failed)} failed: {failed[0][:70]})"
    if passed and lost:
        return f"INCOMPLETE ({len(passed)} passed; {lost})"
    if passed:
        return f"PASS ({len(passed)} passed" + (f", {len(skipped)} skipped)" if skipped else ")")
    if skipped:
        return f"not measured (skipped: {skipped[0][:70]})"
    return f"not measured (no result; {lost or 'phase ' + phases[0] + ' wrote none'})"

print()
total = sum(int(s) for *_, s in phases)
print(f"gpu_check: {total} s in phases (budget {budget} s); results and logs in {out}")
if env.get("gpu"):
    print(f"{env['gpu']} sm{env['sm'][0]}{env['sm'][1]}; Python {env['python']}, torch "
          f"{env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}")
print(f"\n{'phase':14s} {'limit':>6s} {'took':>6s}  status")
for name, limit, st, seconds in phases:
    print(f"{name:14s} {limit:>4s} s {seconds:>4s} s  {st}")

print(f"\n{'ViT-L/14 OV2 step':18s} {'impl':6s} {'img/s':>7s} {'step s':>7s} {'first s':>7s} "
      f"{'TFLOP/s':>7s} {'MFU':>6s} {'peak GiB':>8s} {'model GiB':>9s} {'peak/model':>10s}")
for phase, name in (("bench_stage1", "l14_stage1_84px"), ("bench_stage2", "l14_stage2_224px")):
    r = load(name + ".json", None)
    if r is None:
        first = ""
        log = os.path.join(out, "logs", phase + ".log")
        if os.path.exists(log):
            seen = re.findall(r"first step done ([0-9.]+) s", open(log).read())
            first = f"; first step done at {seen[-1]} s" if seen else "; no first step"
        print(f"{name:18s} no result (phase {phase}: {status.get(phase, 'not run')}{first})")
        continue
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    peak, model = r.get("peak_memory_gib"), r.get("predicted_memory_gib")
    print(f"{name:18s} {r['impl'][:6]:6s} {r['images_per_s']:7.0f} {r['step_time_s']:7.3f} "
          f"{fmt(r.get('time_to_first_step_s'), '7.1f'):>7s} {r['tflops_per_device']:7.1f} "
          f"{fmt(r['mfu'], '.1%'):>6s} {fmt(peak, '8.1f'):>8s} {fmt(model, '9.1f'):>9s} "
          f"{fmt(peak / model if peak and model else None, '10.2f'):>10s}")
print("(step s: median steady step; first s: tool start to the end of the first step; MFU: "
      "model FLOPs / dense bf16 peak; model GiB: ov2_megatron/perf/memory_model.py)")

te = pkgs.get("Transformer Engine", {}).get("present", False)
dali = pkgs.get("DALI", {}).get("present", False)
print(f"\n{'DALI decoding':18s} images/s per GPU (synthetic 256 px JPEGs, no colour ops)")
for px in (84, 224):
    path = os.path.join(out, f"decode_{px}px.txt")
    found = re.search(r"no colour ops\): ([0-9.]+) images/s", open(path).read()) \
        if os.path.exists(path) else None
    print(f"{str(px) + ' px':18s} " + (found.group(1) if found else
          "not measured (absent)" if not dali else
          f"no result (phase data_decode: {status.get('data_decode', 'not run')})"))
apex = pkgs.get("Apex", {})
sm = tuple(env.get("sm") or (0, 0))
te_spec = "tests.gpu.test_transformer_engine_spec::"
rows = [
    ("Triton kernels, compiled", verdict(["tests.kernels."], ["gpu_tests", "kernels"],
                                         present=bool(env.get("triton")))),
    ("local spec step on CUDA", verdict(["tests.gpu.test_local_spec_step::"], ["gpu_tests"],
                                        present=pkgs.get("megatron-core", {}).get("present",
                                                                                  False))),
    ("Transformer Engine spec", verdict([te_spec + "test_transformer_engine_spec_matches",
                                         te_spec + "test_transformer_engine_padded"],
                                        ["gpu_tests"], present=te)),
    ("FP8 (TE, tensorwise)", verdict([te_spec + "test_fp8_"], ["gpu_tests"],
                                     present=te and sm >= (8, 9),
                                     absent="not measured (absent)" if not te
                                     else "not measured (needs sm89+)")),
    ("DALI mixed decoding", verdict(["tests.data.test_dali_pipeline::test_mixed_gpu",
                                     "tests.data.test_color_jitter::test_gpu_"],
                                    ["gpu_tests"], present=dali)),
    ("Apex fused kernels", ("present: " + str(apex.get("version"))
                            + ("" if apex.get("fused_softmax") else
                               " (no fused-softmax extensions)"))
     if apex.get("present") else "not measured (absent): torch LayerNorm, unfused softmax"
     if env else "not measured (environment unknown)"),
]
print(f"\n{'check':26s} result")
for name, result in rows:
    print(f"{name:26s} {result}")
speed = os.path.join(out, "logs", "kernel_speed.log")
if status.get("kernel_speed") == "PASS" and os.path.exists(speed):
    with open(speed) as f:  # bench_kernels.py's table: a device line, then indented rows
        print("\n" + "".join(row for row in f if row.startswith(("cuda", "cpu", "  "))).rstrip())
EOF
}

# The report runs on the venv's Python on the box, and on any python3 for --report.
python_for_report() { if [[ -x "$PY" ]]; then "$PY" "$@"; else python3 "$@"; fi; }

# --- the run --------------------------------------------------------------------------------
say() { echo "[gpu_check $(( SECONDS - STARTED ))s] $*" | tee -a "$OUT/gpu_check.log"; }

# run_phase NAME: its command under its limit; output in $OUT/logs/NAME.log; PASS/FAIL/TIMEOUT.
run_phase() {
    local name="$1" limit="${LIMIT[$1]}" code=0 start=$SECONDS status
    local log="$OUT/logs/$name.log"
    say "phase $name (limit ${limit}s)"
    timeout --kill-after="$GRACE_S" "$limit" bash -c "${COMMAND[$name]}" >"$log" 2>&1 || code=$?
    if [[ $code -eq 124 || $code -eq 137 ]]; then status="TIMEOUT"
    elif [[ $code -ne 0 ]]; then status="FAIL($code)"
    else status="PASS"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$status" "$(( SECONDS - start ))" \
        >>"$OUT/phases.tsv"
    say "phase $name: $status in $(( SECONDS - start ))s (log: $log)"
    if [[ $status != PASS ]]; then tail -n 15 "$log" | sed 's/^/    /'; fi
    [[ $status == PASS ]]
}

# --- dry run: the plan, the wheels, the sizes, the time budget (bash only, no Python) -------
file_size() { stat -c %s "$1"; }

dry_run() {
    local name total=0 ok=0 n=0 wheel_total=0 repo_total=0 line pin version module bytes
    echo "gpu_check --dry-run: nothing runs; the plan for one GPU box"
    echo
    printf '%-13s %6s  %s\n' phase limit command
    for name in "${PHASES[@]}"; do
        selected "$name" || continue
        printf '%-13s %4s s  %s\n' "$name" "${LIMIT[$name]}" "${COMMAND[$name]}"
        total=$(( total + ${LIMIT[$name]} + GRACE_S )); n=$(( n + 1 ))
    done
    echo "with PYTHON=$PYTHON VENV=$VENV PY=$PY OUT=$OUT WHEELS=$WHEELS MANIFEST=$MANIFEST"
    echo "     STEPS=$STEPS S1_MB=$S1_MB S1_M=$S1_M S2_MB=$S2_MB S2_M=$S2_M${ONLY:+ ONLY=$ONLY}"
    echo "helpers: make_venv = $PYTHON -m venv --system-site-packages \$VENV (+ a .pth to the"
    echo "  interpreter's own site dirs), fails naming the fix; check_imports = the manifest's"
    echo "  modules and CUDA; run_gpu_tests ARGS = pytest ARGS --megatron-free, then"
    echo "  --megatron-line (tests/conftest.py; junit: \$OUT/gpu_tests*.xml);"
    echo "  print_environment / final_report = this script's Python blocks"
    echo "time budget: $(( total - n * GRACE_S )) s of limits + $n x ${GRACE_S} s kill grace" \
         "= $total s (limit $BUDGET_S s)"
    [[ $total -le $BUDGET_S ]] || ok=1

    echo
    echo "wheels ($MANIFEST -> $WHEELS/):"
    local -a missing=() listed=()
    while IFS= read -r line; do
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        if ! [[ $line =~ ^([A-Za-z0-9._-]+)==([^[:space:]]+)[[:space:]]+#[[:space:]]*import[[:space:]]+([A-Za-z0-9_.]+),[[:space:]]*([0-9]+)[[:space:]]+bytes ]]; then
            echo "  bad manifest line (want 'name==version  # import module, N bytes'): $line"
            ok=1; continue
        fi
        pin="${BASH_REMATCH[1]}"; version="${BASH_REMATCH[2]}"; module="${BASH_REMATCH[3]}"
        bytes="${BASH_REMATCH[4]}"
        local stem file
        stem="$(echo "$pin" | tr '[:upper:]' '[:lower:]' | sed 's/[-_.]\{1,\}/_/g')-$version-"
        file="$(compgen -G "$WHEELS/$stem*.whl" | head -n 1 || true)"
        if [[ -n $file ]]; then
            bytes="$(file_size "$file")"; listed+=("$(basename "$file")")
            printf '  %-24s %8.2f MiB  %s\n' "$pin==$version" "$(mib "$bytes")" \
                   "$(basename "$file")"
        else
            missing+=("$pin==$version")
            printf '  %-24s %8.2f MiB  MISSING (recorded size; import %s)\n' "$pin==$version" \
                   "$(mib "$bytes")" "$module"
        fi
        wheel_total=$(( wheel_total + bytes ))
    done <"$MANIFEST"
    if [[ -d $WHEELS ]]; then  # everything in the folder travels, pinned or not
        for file in "$WHEELS"/*; do
            [[ -f $file ]] || continue
            [[ " ${listed[*]} " == *" $(basename "$file") "* ]] && continue
            printf '  %-24s %8.2f MiB  %s (not in the manifest: delete it)\n' extra \
                   "$(mib "$(file_size "$file")")" "$(basename "$file")"
            wheel_total=$(( wheel_total + $(file_size "$file") ))
        done
    fi
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "  missing from $WHEELS/: ${missing[*]}: run 'make gpu-wheels' (with network)"
    fi
    repo_total="$(repository_bytes)"
    echo "wheels $(mib "$wheel_total") MiB + repository $(mib "$repo_total") MiB (what" \
         "travels: tracked and untracked-not-ignored files, no .venv*)" \
         "= $(mib $(( wheel_total + repo_total ))) MiB of $(mib "$CARRY_LIMIT") MiB"
    [[ $(( wheel_total + repo_total )) -le $CARRY_LIMIT ]] || ok=1
    if [[ $ok -eq 0 ]]; then echo "dry run: within budget"; else echo "dry run: OVER BUDGET"; fi
    return "$ok"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }

repository_bytes() {
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
            | { grep -zv -e '^\.venv' -e "^$WHEELS/" || true; } | sort -zu \
            | { xargs -0 -r stat -c %s 2>/dev/null || true; } \
            | awk '{ s += $1 } END { print s + 0 }'
    else
        find "$ROOT" -type f -not -path "$ROOT/.git/*" -not -path "$ROOT/.venv*" \
            -not -path "$ROOT/runs/*" -not -path "$ROOT/$WHEELS/*" -printf '%s\n' \
            | awk '{ s += $1 } END { print s + 0 }'
    fi
}

main() {
    case "${1:-}" in
        --dry-run) dry_run; return ;;
        --report) OUT="${2:?--report DIR}"; final_report; return ;;  # the table of a past run
        "") ;;
        *) echo "usage: bash tools/gpu_check.sh [--dry-run | --report DIR]" >&2; return 2 ;;
    esac
    if ! command -v "$PYTHON" >/dev/null; then
        echo "gpu_check: $PYTHON not found; set PYTHON=/path/to/python3.12" >&2; return 2
    fi
    mkdir -p "$OUT/logs"
    : >"$OUT/phases.tsv"
    STARTED=$SECONDS
    export -f make_venv check_imports run_gpu_tests print_environment final_report \
        python_for_report
    export BUDGET_S
    local failed=0 name
    for name in "${PHASES[@]}"; do
        if ! selected "$name"; then continue; fi
        run_phase "$name" || failed=1
        if [[ $name == install && ! -x $PY ]]; then
            say "no venv: the phases after install run on $PYTHON and will likely fail"
            PY="$PYTHON"
        fi
    done
    say "done in $(( SECONDS - STARTED ))s: $([[ $failed -eq 0 ]] && echo "every phase passed" ||
        echo "a phase FAILED: exit 1")"
    cat "$OUT/logs/report.log"  # the table, last
    return "$failed"
}

main "$@"
