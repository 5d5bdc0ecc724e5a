"""Run a function on N gloo ranks (NCCL where CUDA exists) in fresh processes and collect what each rank returns.

    results = run_distributed(check_tp_linear, world_size=2, args=(seed,))

Each rank is a fresh process (nothing inherited from the pytest process: megatron's global
state, the CPU layer and torch's thread pools start clean) with the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and an initialised gloo process group.
`fn` must be importable (a module-level function). A failing rank's traceback is raised in
the test; a rank that neither returns nor fails within `timeout` seconds fails the test and
every rank is killed, so a collective that never completes cannot hang CI.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from ov2_megatron.parallel.initialize import free_port

DEFAULT_TIMEOUT_S = 150.0

# Ranks fork from a forkserver that has imported these and nothing else (no process group,
# no CPU layer, no megatron global state, no torch thread pool yet): importing megatron-core
# costs a rank ~4-8 s of CPU, paid once per test session instead of once per rank.
_PRELOADED_MODULES = ["torch", "torch.distributed", "megatron.core", "ov2_megatron.training.loop"]


def _rank_context(fresh_interpreter: bool):
    if fresh_interpreter or os.environ.get("OV2_BLOCK_MEGATRON") == "1":
        # Spawned ranks read the environment at interpreter start (glibc, MKL), and a
        # megatron-free test (tests/conftest.py) must not preload megatron.
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOADED_MODULES)
    return ctx


class DistributedFailure(AssertionError):
    """One or more ranks raised or timed out; the message holds each rank's traceback."""


def _rank_main(fn, rank, world_size, port, results, args, kwargs, stderr_path):
    # The rank's fd 2 goes to a file: a rank killed inside C++ (gloo's abort, a segfault)
    # leaves no Python traceback, only what the library printed there.
    stderr_fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(stderr_fd, 2)
    os.close(stderr_fd)
    faulthandler.enable(all_threads=True)  # Python stacks of a SIGABRT / SIGSEGV, into it
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        backend = "gloo"
        if torch.cuda.is_available():  # GPU-marked tests run the real NCCL path
            torch.cuda.set_device(rank % torch.cuda.device_count())
            backend = "nccl"
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        except dist.DistNetworkError as error:
            if "EADDRINUSE" in str(error):  # the port was taken between pick and bind
                results.put((rank, PORT_TAKEN, traceback.format_exc()))
                return
            raise
        value = fn(*args, **kwargs)
        # Plain pickle, not the queue's ForkingPickler: torch would share tensors through
        # shared memory that dies with this process before the parent reads it.
        results.put((rank, "ok", pickle.dumps(value)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report everything, including SystemExit and KeyboardInterrupt
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    fresh_interpreter: bool = False,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` ranks; return the per-rank results in order.

    `fresh_interpreter=True` starts each rank as a new interpreter (spawn) instead of forking
    it from the preloaded server: for tests whose environment must act at process start."""
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size {world_size} outside 1..8")
    for _ in range(_PORT_ATTEMPTS):
        outcomes = _launch(fn, world_size, args, kwargs, timeout, fresh_interpreter)
        if not any(status == PORT_TAKEN for status, _ in outcomes.values()):
            break
    errors = {r: v for r, (status, v) in outcomes.items() if status != "ok"}
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{text}" for r, text in sorted(errors.items()))
        raise DistributedFailure(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]


# free_port() closes the port it found before rank 0 binds it: on a loaded machine another
# process (a parallel test run) can take it in between. Rank 0 then fails in
# init_process_group, before any work, and the whole launch is retried on a new port.
PORT_TAKEN = "port_taken"
_PORT_ATTEMPTS = 3


def _launch(fn, world_size: int, args: tuple, kwargs: dict | None, timeout: float,
            fresh_interpreter: bool) -> dict[int, tuple[str, Any]]:
    ctx = _rank_context(fresh_interpreter)
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ov2-ranks-") as logs:
        stderr_paths = [os.path.join(logs, f"rank{r}.stderr") for r in range(world_size)]
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, port, results, args,
                                                 kwargs or {}, stderr_paths[r]))
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            outcomes = _collect(results, procs, timeout)
        finally:
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        _attach_stderr(outcomes, stderr_paths)
    return outcomes


def _attach_stderr(outcomes: dict[int, tuple[str, Any]], stderr_paths: list[str]) -> None:
    """Replay each rank's stderr into this process's (pytest shows it for a failed test) and
    add its tail to the report of a rank that died without a result."""
    for rank, path in enumerate(stderr_paths):
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if text:
            sys.stderr.write(f"--- rank {rank} stderr ---\n{text}")
        status, value = outcomes[rank]
        if status == "error" and "no result" in value:
            tail = "\n".join(text.splitlines()[-_STDERR_TAIL_LINES:]) or "(nothing)"
            outcomes[rank] = (status, f"{value}; its stderr ended with:\n{tail}")


_STDERR_TAIL_LINES = 30


def _collect(results, procs, timeout: float) -> dict[int, tuple[str, Any]]:
    """Wait for one message per rank. After the first error, give the others a short grace."""
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(procs):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, status, value = results.get(timeout=min(remaining, 1.0))
            outcomes[rank] = (status, value)
            if status in ("error", PORT_TAKEN):
                deadline = min(deadline, time.monotonic() + 10.0)
        except queue.Empty:
            dead_silent = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcomes]
            if dead_silent and results.empty():
                time.sleep(0.5)  # a message may still be in flight from a rank that just exited
                if results.empty():
                    for r in dead_silent:
                        code = procs[r].exitcode
                        outcomes[r] = ("error", f"process exited with code {code} and no result")
    for rank in range(len(procs)):
        if rank not in outcomes:
            outcomes[rank] = ("error", f"timed out after {timeout:.0f} s (hung collective?)")
    return outcomes
