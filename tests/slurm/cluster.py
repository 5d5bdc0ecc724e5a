"""A real one-node Slurm (munged + slurmctld + slurmd) started and stopped by the tests.

Everything lives under one private directory: the munge key and socket, slurm.conf (found by
the clients through SLURM_CONF), state, spool, PID and log files; the ports are free ones
picked at start. The daemons run in the foreground as children of the test process, so they
are stopped by the PIDs we started; jobs are cancelled and waited for first, and any process
still carrying this cluster's marker in its environment (a job step left behind) is killed
before the daemons go.

Config notes: `SlurmdParameters=config_overrides` lets the node declare 4 CPUs on a 2-core
machine; `AuthInfo=cred_expire` also sets how long a requeued job waits before it may start
again (120 s by default, shortened here), and the 1 s scheduler intervals start it promptly.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ov2_megatron.parallel.initialize import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue",
           "sinfo")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _which(name: str) -> str | None:
    """`name` on PATH or in the sbin directories (where Debian puts the daemons)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def unavailable_reason() -> str | None:
    """Why a Slurm cluster cannot be started here, or None if it can."""
    missing = [name for name in DAEMONS if _which(name) is None]
    if missing:
        return (f"Slurm is not installed (missing {', '.join(missing)}): apt-get install "
                "--no-install-recommends slurmctld slurmd slurm-client munge (.ci/run does)")
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """Wait `grace` s for a process told to exit, then SIGTERM, then SIGKILL."""
    for action, timeout in ((None, grace), (proc.terminate, 10), (proc.kill, 5)):
        if proc.poll() is not None:
            return
        if action:
            action()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


class SlurmCluster:
    def __init__(self, cpus: int = 4):
        self.root = Path(tempfile.mkdtemp(prefix="ov2-slurm-"))
        self.root.chmod(0o755)  # munged (user munge) must reach its socket directory
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.marker = f"ov2-slurm-test-{os.getpid()}-{self.root.name}"
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- environment -------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """The submitting environment: ours without any outer Slurm job's variables, plus
        this cluster's config and a marker that every job process inherits (the daemons and
        their helpers do not carry it: see _kill_marked)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_",
                                                                       "SRUN_", "SALLOC_"))}
        env.update(SLURM_CONF=str(self.conf), OV2_SLURM_TEST_MARKER=self.marker, **extra)
        return env

    def _daemon_env(self) -> dict[str, str]:
        env = self.env()
        del env["OV2_SLURM_TEST_MARKER"]
        return env

    # ---- start / stop ------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        munge_dir = self.root / "munge"
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        munge_dir.mkdir(mode=0o755)
        munge = pwd.getpwnam("munge")
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        socket_path = munge_dir / "munge.sock"
        self.conf.write_text(self._slurm_conf(socket_path))

        self._spawn("munged", ["munged", "--foreground", f"--socket={socket_path}",
                               f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--log-file={munge_dir / 'munged.log'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait_for(lambda: socket_path.exists(), "munged socket", timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait_for(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0,
                       "slurmctld to answer", timeout)
        self._spawn("slurmd", ["slurmd", "-D"])
        self._wait_for(lambda: "idle" in self._run(["sinfo", "-h", "-o", "%T"],
                                                   check=False).stdout,
                       "the node to register idle", timeout)

    def _slurm_conf(self, munge_socket: Path) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=ov2test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",  # keep finished jobs visible to scontrol for the assertions
            "KillWait=10",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, argv: list[str], **kwargs) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        argv = [_which(argv[0]), *argv[1:]]
        self.procs[name] = subprocess.Popen(argv, env=self._daemon_env(), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            **kwargs)
        log.close()

    def _wait_for(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"Slurm daemon exited while waiting for {what}: {dead}\n"
                                   + self.daemon_logs())
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                           + self.daemon_logs())

    def stop(self) -> None:
        """Cancel and wait for every job, kill leftovers by marker, then stop our daemons.
        Safe to call more than once."""
        if not self.root.exists():
            return
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._run(["scancel", "--user", "root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not self._run(["squeue", "-h"], check=False).stdout.strip():
                    break
                time.sleep(0.5)
        self._kill_marked()
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Asks slurmctld and slurmd to exit at once (on SIGTERM slurmctld lingers ~15 s).
            self._run(["scontrol", "shutdown"], check=False)
        for name, shutting_down in (("slurmctld", 5), ("slurmd", 5), ("munged", 0)):
            if name in self.procs:
                _stop(self.procs[name], shutting_down)
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_marked(self) -> None:
        """SIGKILL any job process left behind: its environment carries this cluster's marker
        (submitted with it), which the daemons and their helpers lack."""
        needle = f"OV2_SLURM_TEST_MARKER={self.marker}".encode()
        ours = {os.getpid()} | {p.pid for p in self.procs.values()}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in ours:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ---- jobs ----------------------------------------------------------------------------
    def _run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60,
                              **kwargs)

    def sbatch(self, argv: list[str], cwd: Path, env: dict[str, str]) -> int:
        result = self._run(["sbatch", "--parsable", *argv], cwd=cwd, env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, RunTime...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float, done=None) -> dict[str, str]:
        """Poll until `done(info)` (default: a terminal state); raise with the log if late."""
        done = done or (lambda info: info["JobState"] in TERMINAL_STATES)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if done(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout:.0f} s\n--- job log ---\n{self.job_log(info)}")
            time.sleep(0.5)

    @staticmethod
    def job_log(info: dict[str, str]) -> str:
        try:
            return Path(info.get("StdOut", "")).read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"

    def daemon_logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-20:]
                parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)
