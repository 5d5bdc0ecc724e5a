"""cpu_allocator: a step's freed tensors are reused, not faulted in again (the CPU runs'
page-fault cost, docs/benchmarks/2026-12-02-cpu-allocator.md), measured against glibc's own
defaults in fresh processes: the settings only act process-wide, and the environment wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fault_unit() -> int:
    """Bytes one minor fault brings in for a fresh mapping: 2 MiB where THP is always on."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as thp:
            return 2**21 if "[always]" in thp.read() else 4096
    except OSError:
        return 4096


PAGES = 2 * 64 * 2**20 // _fault_unit()  # two 64 MiB tensors per round

# A step in miniature: two 64 MiB tensors allocated, written and freed, over and over. Ten
# rounds let the heap settle; the next ten are counted in minor page faults per round.
PROBE = """
import resource, torch
from ov2_megatron import cpu_allocator
how = cpu_allocator.reuse_freed_memory()
def rounds(n):
    for _ in range(n):
        x = torch.ones(16 * 2**20); y = x * 2; del x, y
rounds(10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(how)
"""


def _faults_per_round(**environment) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "OV2_CPU_MALLOC"))}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=dict(env, **environment),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults, how = proc.stdout.strip().splitlines()
    return float(faults), how


@pytest.fixture(scope="module")
def glibc_defaults():
    faults, how = _faults_per_round(OV2_CPU_MALLOC="glibc")
    assert how == "malloc with glibc's defaults (OV2_CPU_MALLOC=glibc)"
    # The reference behaviour: each 64 MiB tensor is mapped on its own and unmapped on free,
    # so every round faults all its pages in again.
    assert faults >= 0.5 * PAGES, faults
    return faults


def test_freed_memory_is_reused(glibc_defaults):
    faults, how = _faults_per_round()
    assert how.startswith("malloc keeps freed memory for reuse"), how
    assert faults <= 0.25 * glibc_defaults, (faults, glibc_defaults)


def test_the_environment_wins(glibc_defaults):
    faults, how = _faults_per_round(MALLOC_MMAP_THRESHOLD_="65536")  # the memory method's pin
    assert how == "malloc as the environment sets it (MALLOC_*_ / GLIBC_TUNABLES)"
    assert faults >= 0.5 * PAGES, faults
