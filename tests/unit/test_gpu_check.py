"""tools/gpu_check.sh without a GPU: its dry run (every phase with a limit, the limits within
the 6 minutes that leave a second run room in a 15-minute GPU session, the pinned wheel set,
and the repository plus wheels within the 64 MiB a call carries), and its final table built
from a finished run's files, which must call what did not run (TE, FP8, DALI absent on the
GPU box) "not measured", never passing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
MANIFEST = ROOT / "tools" / "gpu_wheels.txt"
WHEELS = ROOT / "tools" / "wheels"
BUDGET_S = 360
CARRY_BYTES = 64 * 2**20
PHASES = ["install", "environment", "gpu_tests", "kernels", "kernel_speed", "data_decode",
          "bench_stage1", "bench_stage2", "report"]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)\s+#\s*import\s+([A-Za-z0-9_.]+),\s*(\d+)\s+bytes$")
KNOBS = ("ONLY", "OUT", "PYTHON", "VENV", "STEPS", "S1_MB", "S1_M", "S2_MB", "S2_M")


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("LIMIT_")}
    env["VENV"] = "/nonexistent/gpu_check_venv"  # --report then runs on plain python3
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def dry_run() -> subprocess.CompletedProcess:
    return run_script("--dry-run")


def manifest() -> list[tuple[str, str, str, int]]:
    pins = []
    for line in MANIFEST.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"{line!r} is not 'name==version  # import module, N bytes'"
        name, version, module, size = match.groups()
        pins.append((name.lower(), version, module, int(size)))
    return pins


def test_dry_run_exits_zero_within_budget(dry_run):
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    assert "dry run: within budget" in dry_run.stdout


def test_every_phase_has_a_limit_and_all_fit_six_minutes(dry_run):
    rows = re.findall(r"^(\w+)\s+(\d+) s  (\S.*)$", dry_run.stdout, re.M)
    assert [name for name, _, _ in rows] == PHASES
    limits = {name: int(limit) for name, limit, _ in rows}
    assert all(limit > 0 for limit in limits.values()), limits
    grace = re.search(r"\+ (\d+) x (\d+) s kill grace = (\d+) s", dry_run.stdout)
    assert grace and int(grace[1]) == len(PHASES)
    worst = sum(limits.values()) + int(grace[1]) * int(grace[2])  # every phase runs out
    assert int(grace[3]) == worst <= BUDGET_S
    commands = {name: command for name, _, command in rows}
    assert "--no-index --find-links" in commands["install"]
    assert "-m gpu" in commands["gpu_tests"]
    assert "--stage 1" in commands["bench_stage1"] and "--stage 2" in commands["bench_stage2"]


def test_manifest_pins_the_python312_line():
    pins = manifest()
    names = [name for name, *_ in pins]
    assert len(names) == len(set(names)) and "megatron-core" in names
    tested = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "requirements-py312.txt")
                             .read_text(), re.M))
    tested = {name.lower(): version for name, version in tested.items()}
    for name, version, _, _ in pins:  # megatron-core above all: the release the 3.12 CI proves
        if name in tested:
            assert version == tested[name], f"{name}=={version} vs requirements-py312.txt"


def repository_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in set(files.split("\0"))
               if f and not f.startswith((".venv", "tools/wheels/")) and (ROOT / f).is_file())


def test_repository_and_wheels_fit_one_call(dry_run):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list what travels")
    wheels = 0
    for name, version, _, size in manifest():
        stem = re.sub(r"[-_.]+", "_", name) + f"-{version}-"
        found = sorted(WHEELS.glob(stem + "*.whl")) if WHEELS.is_dir() else []
        wheels += found[0].stat().st_size if found else size
    total = repository_bytes() + wheels
    assert total <= CARRY_BYTES, f"{total / 2**20:.1f} MiB > 64 MiB"
    printed = re.search(r"= ([0-9.]+) MiB of 64\.00 MiB", dry_run.stdout)
    assert printed and float(printed[1]) == pytest.approx(total / 2**20, abs=0.25)  # same accounting


def test_no_user_site_install():
    text = SCRIPT.read_text()
    assert "venv --system-site-packages" in text
    assert not re.search(r"pip[^\n]*--user", text) and "PYTHONUSERBASE" not in text


def _junit(cases: dict[str, str | None]) -> str:
    """{"module::test": None (passed) | "skipped: why" | "failed: why"} -> junit XML."""
    rows = []
    for key, outcome in cases.items():
        module, name = key.split("::")
        inner = ""
        if outcome:
            kind, message = outcome.split(": ", 1)
            inner = f'<{"skipped" if kind == "skipped" else "failure"} message="{message}"/>'
        rows.append(f'<testcase classname="{module}" name="{name}">{inner}</testcase>')
    return f'<testsuites><testsuite name="pytest">{"".join(rows)}</testsuite></testsuites>'


def finished_run(out: Path, te: bool, te_outcome: str | None, kernels: str = "PASS") -> None:
    """The files a run on an H200 leaves: stage 1 measured, stage 2 timed out after its first
    step; `kernels` the kernels phase's status (a phase that timed out wrote no junit file)."""
    (out / "logs").mkdir(parents=True)
    absent = {"present": False, "version": None, "note": "absent"}
    (out / "environment.json").write_text(json.dumps({
        "python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0",
        "gpu": "NVIDIA H200", "gpus": 1, "sm": [9, 0], "memory_gib": 139.8,
        "packages": {"megatron-core": {"present": True, "version": "0.19.2", "note": ""},
                     "Transformer Engine": {"present": te, "version": "2.9" if te else None,
                                            "note": ""},
                     "DALI": absent, "Apex": dict(absent, fused_softmax=False)}}))
    (out / "phases.tsv").write_text("".join(f"{name}\t60\t{status}\t10\n" for name, status in [
        ("install", "PASS"), ("environment", "PASS"), ("gpu_tests", "PASS"),
        ("kernels", kernels), ("kernel_speed", "PASS"), ("bench_stage1", "PASS"),
        ("bench_stage2", "TIMEOUT")]))
    te_tests = ["test_transformer_engine_spec_matches_local",
                "test_transformer_engine_padded_matches_local_unpadded",
                "test_fp8_tensorwise_step_is_finite"]
    gpu = {f"tests.gpu.test_transformer_engine_spec::{t}": te_outcome for t in te_tests}
    gpu.update({"tests.gpu.test_local_spec_step::test_local_spec_step_on_cuda_equals_reference":
                None,
                "tests.kernels.test_token_gather::test_gpu_vit_l14_shapes": None,
                "tests.data.test_dali_pipeline::test_mixed_gpu_decoding_matches_cpu":
                    "skipped: needs NVIDIA DALI"})
    (out / "gpu_tests.xml").write_text(_junit(gpu))
    if kernels != "TIMEOUT":
        (out / "kernels.xml").write_text(_junit({"tests.kernels.test_token_gather::test_dispatch":
                                                 None if kernels == "PASS" else "failed: bad"}))
    (out / "l14_stage1_84px.json").write_text(json.dumps({
        "impl": "local", "images_per_s": 2000.0, "step_time_s": 0.512, "time_to_first_step_s": 38.5,
        "tflops_per_device": 300.0, "mfu": 0.38, "peak_memory_gib": 40.0,
        "predicted_memory_gib": 42.0}))
    (out / "logs" / "bench_stage2.log").write_text("bench.py: first step done 41.2 s after start\n")


def report_rows_of(out: Path, te: bool, te_outcome: str | None,
                   kernels: str = "PASS") -> tuple[dict[str, str], str]:
    """The final table of `finished_run`: its check rows by name, and the whole text."""
    finished_run(out, te, te_outcome, kernels)
    proc = run_script("--report", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("\ncheck ", 1)[1]
    rows = dict(re.findall(r"^(\S.{25}) (.+)$", table, re.M))
    return {name.strip(): result for name, result in rows.items()}, proc.stdout


def test_report_calls_absent_packages_not_measured(tmp_path):
    rows, text = report_rows_of(tmp_path, te=False,
                                te_outcome="skipped: Transformer Engine is not installed")
    for check in ("Transformer Engine spec", "FP8 (TE, tensorwise)", "DALI mixed decoding",
                  "Apex fused kernels"):
        assert rows[check].startswith("not measured (absent)"), (check, rows[check])
    assert rows["Triton kernels, compiled"].startswith("PASS")
    assert rows["local spec step on CUDA"].startswith("PASS")
    stage1 = next(line for line in text.splitlines() if line.startswith("l14_stage1_84px"))
    # time to first step, MFU, peak / memory model
    assert "38.5" in stage1 and "38.0%" in stage1 and "0.95" in stage1
    stage2 = next(line for line in text.splitlines() if line.startswith("l14_stage2_224px"))
    assert "no result" in stage2 and "TIMEOUT" in stage2 and "41.2" in stage2
    for px in ("84 px", "224 px"):  # GPU decoding: DALI absent
        decode = next(line for line in text.splitlines() if line.startswith(px))
        assert "not measured (absent)" in decode, decode


def test_report_shows_the_gpu_decode_rates_when_dali_ran(tmp_path):
    finished_run(tmp_path, te=False, te_outcome="skipped: Transformer Engine is not installed")
    env = json.loads((tmp_path / "environment.json").read_text())
    env["packages"]["DALI"] = {"present": True, "version": "2.4.0", "note": ""}
    (tmp_path / "environment.json").write_text(json.dumps(env))
    (tmp_path / "decode_84px.txt").write_text(
        "dali (mixed (GPU) decoding, no colour ops): 12345.6 images/s (900 per CPU-second)\n")
    proc = run_script("--report", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "12345.6" in next(line for line in lines if line.startswith("84 px"))
    assert "no result (phase data_decode" in next(line for line in lines
                                                   if line.startswith("224 px"))


@pytest.mark.parametrize("outcome,expected", [
    ("skipped: FP8 needs sm89+", "not measured (skipped"), ("failed: loss differs", "FAIL"),
    (None, "PASS")])
def test_report_with_te_present_reports_what_its_tests_did(tmp_path, outcome, expected):
    rows, _ = report_rows_of(tmp_path, te=True, te_outcome=outcome)
    assert rows["Transformer Engine spec"].startswith(expected)
    assert rows["FP8 (TE, tensorwise)"].startswith(expected)


@pytest.mark.parametrize("kernels,expected", [
    ("TIMEOUT", "INCOMPLETE (1 passed; phase kernels: TIMEOUT)"), ("FAIL(1)", "FAIL (1 failed: bad)")])
def test_report_does_not_pass_kernels_whose_phase_did_not_finish(tmp_path, kernels, expected):
    # The two GPU-marked kernel tests passed in gpu_tests; the kernels phase's own did not.
    rows, _ = report_rows_of(tmp_path, te=False, te_outcome=None, kernels=kernels)
    assert rows["Triton kernels, compiled"] == expected


def test_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    result = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
