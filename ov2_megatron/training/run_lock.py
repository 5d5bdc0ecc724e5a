"""One run per output directory: `<train.output_dir>/run.lock`.

Two runs writing one directory would interleave their metrics, race at every checkpoint save
and prune each other's checkpoints. So global rank 0 creates the lock before the run writes
anything there (config.json, checkpoints, metrics), and every rank learns the outcome through
the process group: a refused run stops on all ranks with one message naming the owner and the
fix, instead of some ranks hanging.

The lock is created atomically (O_CREAT | O_EXCL, which also holds on NFSv3+), holds its
owner as JSON (host, PID, start time, the PID's kernel start time, boot and PID-namespace ids,
Slurm job and restart count) and is removed when the run ends. A heartbeat touches it every
HEARTBEAT_S seconds. A lock left by a run that died without removing it (SIGKILL, node
failure) is stale, and the next run takes it over, saying so, when:
  - its owner ran on this host, in this PID namespace and boot, and that process is gone
    (PID not alive, or alive with another start time: a reused PID);
  - it was written by an earlier run of the same Slurm job (a requeue; Slurm starts the next
    run only after the previous one ended, possibly on another node);
  - otherwise (another host or container), its heartbeat is older than STALE_AFTER_S.
Otherwise the owner counts as alive and the run is refused.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: far longer than any pause of a live run
_UNREADABLE_GRACE_S = 60.0  # a lock being written is readable within this


class RunDirectoryInUse(FileExistsError):
    """Another live run owns the output directory; the message names it and the fix."""


class _Held:
    def __init__(self, path: str, token: str):
        self.path, self.token, self.stop = path, token, threading.Event()
        threading.Thread(target=self._beat, name="ov2-run-lock-heartbeat", daemon=True).start()

    def _beat(self):
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the directory went away; release() will find out


_held: dict[str, _Held] = {}


def take_for_run(run_dir: str) -> None:
    """Collective: rank 0 takes the lock of `run_dir`; every rank raises the same error if it
    cannot (RunDirectoryInUse, or OSError for an unwritable directory)."""
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    outcome = [None]
    if rank0:
        try:
            outcome = [("ok", acquire(run_dir))]
        except RunDirectoryInUse as error:
            outcome = [("in_use", str(error))]
        except OSError as error:
            outcome = [("error", f"cannot lock {run_dir}: {error}")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    status, text = outcome[0]
    if status == "in_use":
        raise RunDirectoryInUse(text)
    if status == "error":
        raise OSError(text)
    if rank0 and text:
        print(text, flush=True)


def acquire(run_dir: str) -> str | None:
    """Take the lock of `run_dir` for this process; returns a note if a stale lock was taken
    over, None otherwise; raises RunDirectoryInUse naming the live owner."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    if os.path.realpath(path) in _held:
        return None  # this process holds it already
    note = None
    for _ in range(3):  # created, or a stale lock removed and creation retried
        token = uuid.uuid4().hex
        try:
            _create(path, _owner_record(token))
        except FileExistsError:
            owner, age = _read(path)
            if owner is _VANISHED:
                continue
            reason = _stale_reason(owner, age)
            if reason is None:
                raise RunDirectoryInUse(_in_use_message(run_dir, path, owner)) from None
            _remove_stale(path, owner)
            note = (f"run lock {path}: took over a stale lock ({_describe(owner)}): {reason}")
            continue
        _held[os.path.realpath(path)] = _Held(path, token)
        return note
    raise RunDirectoryInUse(f"{path} keeps being re-created by another run starting in "
                            f"{run_dir}: start only one run per train.output_dir")


def release_all() -> None:
    """Remove the locks this process holds (at the end of a run; also atexit)."""
    for key, held in list(_held.items()):
        held.stop.set()
        owner, _ = _read(held.path)
        if isinstance(owner, dict) and owner.get("token") == held.token:
            try:
                os.unlink(held.path)
            except FileNotFoundError:
                pass
        del _held[key]


atexit.register(release_all)


_VANISHED = object()  # the lock disappeared between the failed create and the read


def _create(path: str, record: dict) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, (json.dumps(record, indent=1) + "\n").encode())
        os.fsync(fd)
    except OSError:
        os.unlink(path)  # no half-written lock left behind (disk full, quota)
        raise
    finally:
        os.close(fd)


def _read(path: str):
    """(owner dict, or None if unreadable, or _VANISHED; age of the last heartbeat in s)."""
    age = 0.0
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path) as f:
            owner = json.load(f)
        return (owner if isinstance(owner, dict) else None), age
    except FileNotFoundError:
        return _VANISHED, 0.0
    except (OSError, ValueError):
        return None, age


def _owner_record(token: str) -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), pid_start_ticks=_start_ticks(os.getpid()),
        boot_id=_boot_id(), pid_namespace=_pid_namespace(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        slurm_restart_count=_restart_count(), token=token)


def _restart_count() -> int:
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def _stale_reason(owner, age: float) -> str | None:
    """Why the lock's owner is certainly gone, or None if it may be alive."""
    if owner is not None and not isinstance(owner.get("pid"), int):
        owner = None  # not a lock this module wrote
    if owner is None:
        if age > _UNREADABLE_GRACE_S:
            return f"the lock is unreadable and {age:.0f} s old"
        return None
    same_machine = (owner.get("host") == socket.gethostname()
                    and owner.get("pid_namespace") == _pid_namespace())
    if same_machine and owner.get("boot_id") != _boot_id():
        return "this host has rebooted since"
    if same_machine:
        pid = owner["pid"]
        if not _alive(pid):
            return f"process {pid} is gone"
        ticks = owner.get("pid_start_ticks")
        if ticks is not None and _start_ticks(pid) not in (None, ticks):
            return f"PID {pid} now belongs to another process"
        return None
    job = os.environ.get("SLURM_JOB_ID")
    earlier = owner.get("slurm_restart_count")
    if job and owner.get("slurm_job_id") == job and isinstance(earlier, int) and (
            earlier < _restart_count()):
        return f"it is from an earlier run of Slurm job {job}, which has ended"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (another host: stale after {STALE_AFTER_S:.0f} s)"
    return None


def _remove_stale(path: str, owner) -> None:
    """Remove the stale lock unless it changed meanwhile (another run took it over first).
    Renaming to a private name first makes the check-and-remove one atomic step."""
    aside = f"{path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    now, _ = _read(aside)
    if now == owner or (now is None and owner is None):
        os.unlink(aside)
        return
    # Not the lock we judged stale: another run took it over and created its own between
    # our read and the rename. Put it back and refuse. (A third run creating a lock in the
    # instant between the rename and the link is not covered: three simultaneous starts on
    # one stale lock.)
    try:
        os.link(aside, path)
    except OSError:
        pass
    os.unlink(aside)
    raise RunDirectoryInUse(f"{path}: another run took this directory over just now: start "
                            "only one run per train.output_dir")


def _in_use_message(run_dir: str, path: str, owner) -> str:
    if owner is None:
        who = "a run whose lock is still being written (or is unreadable)"
    else:
        who = f"another run: {_describe(owner)}"
    return (f"train.output_dir {run_dir} is in use by {who}. Two runs in one directory would "
            "mix their metrics and checkpoints. Wait for it to end or stop it (SIGTERM makes it "
            "checkpoint and exit), or choose another train.output_dir. If no run uses this "
            f"directory any more, delete {path} (a lock from another host is also taken over "
            f"once its heartbeat is {STALE_AFTER_S:.0f} s old).")


def _describe(owner) -> str:
    if owner is None:
        return "unreadable"
    job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return (f"host {owner.get('host')}, PID {owner.get('pid')}, started "
            f"{owner.get('started')}{job}")


def _alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    except (OSError, IndexError):
        pass  # no /proc (or gone): ask kill(2)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
