"""Session fixtures of the launcher tests: one real Slurm, and the tiny recipe's data built
once (not inside the first job, whose timing would then include it)."""

from __future__ import annotations

import atexit
import signal
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, unavailable_reason


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # pytest then tears the fixtures down


@pytest.fixture(scope="session")
def slurm():
    """The cluster is stopped at the end of the session, on failure, on SIGTERM (e.g. a CI
    timeout) and, failing all of those, at interpreter exit."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    atexit.register(cluster.stop)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    from ov2_megatron.data.synthetic import ensure_synthetic_dataset
    from ov2_megatron.recipes import get_recipe

    cache = tmp_path_factory.mktemp("ov2cache")
    ensure_synthetic_dataset(str(cache), **get_recipe("tiny_cpu").synthetic)
    return cache
