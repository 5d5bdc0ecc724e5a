"""A training rank's lifetime: stop signals honoured from its first second, and helper
processes that never outlive it.

Stop signals. SIGTERM / SIGUSR1 (Slurm preemption or time limit, torchrun forwarding) and a
first Ctrl-C only set a flag, which the training loop's StopRequested reads at each step end
(checkpoint, exit 0). `install_stop_handlers()` is called by `ov2_megatron.train.main` before
torch and megatron are imported (~3 s of imports during which a default SIGTERM would kill the
process); StopRequested installs the same handlers again and adopts a signal that came first.
This module imports nothing heavy for that reason.

Helpers. megatron's checkpoint writer runs in other processes: a spawned multiprocessing
Manager owning the write-results queue (started once per rank, see
checkpoint.start_writer_shielded) and, in megatron-core 0.16, forked write workers during each
save; spawn also starts multiprocessing's resource tracker. A SIGKILLed rank used to leave all
of them behind for good (they ignore SIGTERM on purpose: see checkpoint.py). Now the helpers
ask the kernel to SIGKILL them when their parent ends (Linux prctl(PR_SET_PDEATHSIG)), or poll
their parent where that is unavailable; the resource tracker exits by itself once the last
process holding its pipe (rank, Manager, writers) is gone.

torchrun workers. torchrun's agent dies on SIGUSR1 (it handles only SIGTERM, SIGINT, SIGHUP
and SIGQUIT unless started with --signals-to-handle) and is gone after a SIGKILL; its workers
run in their own sessions, so nothing stops them. `watch_launcher()` makes a worker treat the
loss of its agent as a stop signal: checkpoint at the step end, exit 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_received: int | None = None
_fork_hook_installed = False
_fork_from_main_thread = True
_forking_pid = 0


def install_stop_handlers() -> None:
    """SIGTERM, SIGUSR1 and a first SIGINT set the stop flag, saying so; a second SIGINT
    interrupts (a KeyboardInterrupt raised inside DALI's iteration can deadlock it, so not the
    first one), except while a checkpoint is being written: that one completes first (then the
    run stops, the flag being set), rather than leaving a half-written directory and losing
    the steps since the previous one. SIGINT stays ignored where it is (background jobs).
    Safe to call again: a SIGINT already received keeps the second one interrupting."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_stop_signal)


_saving = False


@contextlib.contextmanager
def checkpoint_in_progress():
    """While a checkpoint is written, a second Ctrl-C waits for it (install_stop_handlers)."""
    global _saving
    _saving = True
    try:
        yield
    finally:
        _saving = False


def _on_stop_signal(signum, frame) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:  # a second Ctrl-C
        if _saving:
            _say("ov2-train: a checkpoint is being written: it completes first, then the run "
                 "stops")
            return
        raise KeyboardInterrupt
    first = _received is None
    _received = signum
    if first:
        again = " (Ctrl-C again to interrupt at once)" if signum == signal.SIGINT else ""
        _say(f"ov2-train: {signal_name(signum)} received: the run stops after this step, with "
             f"a checkpoint{again}")


def _say(line: str) -> None:
    """One line on stderr from a signal handler, on the first rank only (os.write: Python's
    buffered streams must not be re-entered from a handler that may interrupt them)."""
    if os.environ.get("RANK", "0") != "0":
        return
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


def stop_signal() -> int | None:
    """The last stop signal received by this process, or None."""
    return _received


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "none"


def watch_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), stop like on SIGTERM once the agent that
    started this worker is gone (a worker's parent is its agent; an orphan is re-parented)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # srun, a plain process, nohup: the parent may come and go legitimately
    agent = os.getppid()

    def watch():
        while os.getppid() == agent:
            time.sleep(poll_s)
        print(f"ov2-train: the torchrun agent (pid {agent}) is gone: stopping at the end of "
              "this step with a checkpoint", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ov2-watch-torchrun-agent", daemon=True).start()


def die_with_parent(parent_pid: int) -> None:
    """In a helper child: end it when `parent_pid` (its parent) ends, whatever ends that."""
    if not _parent_death_signal(signal.SIGKILL):
        _poll_parent(parent_pid)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux: the kernel sends `sig` when the parent *thread*
    that created this process ends. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="ov2-watch-parent", daemon=True).start()


def shield_helper(parent_pid: int) -> None:
    """Initializer of a spawned helper (the checkpoint writer's Manager): stop signals
    ignored, so a signal sent to the whole job step or process group cannot break the save it
    asks for, and death with the parent, so the helper cannot outlive the rank. The parent
    starts it with the stop signals blocked (inherited, pending rather than lost), so none
    reaches it before this runs."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent(parent_pid)


def tie_forked_children() -> None:
    """Every process forked from now on (megatron 0.16's checkpoint write workers) ends with
    this one. PR_SET_PDEATHSIG fires when the forking *thread* ends, so a child forked from
    another thread polls its parent instead."""
    global _fork_hook_installed
    if _fork_hook_installed:
        return
    _fork_hook_installed = True
    os.register_at_fork(before=_note_forking_thread, after_in_child=_forked_child)


def _note_forking_thread() -> None:
    global _fork_from_main_thread, _forking_pid
    _fork_from_main_thread = threading.current_thread() is threading.main_thread()
    _forking_pid = os.getpid()


def _forked_child() -> None:
    if not (_fork_from_main_thread and _parent_death_signal(signal.SIGKILL)):
        _poll_parent(_forking_pid)
    elif os.getppid() != _forking_pid:  # the parent died before the request took effect
        os._exit(1)
