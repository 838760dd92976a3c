"""A one-node Slurm cluster on localhost for the scheduler tests (Debian's slurm-wlm + munge).

Everything lives under one temporary folder: munge's socket, key copy and logs, slurm.conf
(read by the client commands through ``$SLURM_CONF``), a plugstack file loading
``spank_pbs.so`` (so jobs get the Torque ``PBS_*`` variables), state and spool directories.
No system file is written.  The daemons run in the foreground as children of this process
and are stopped by their PIDs.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

#: Commands the cluster needs (Debian packages slurm-wlm, slurm-wlm-torque, munge).
REQUIRED_COMMANDS = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scancel", "qsub", "qstat")
#: Where Debian keeps the shared munge key and the SPANK plugin exporting PBS_* variables.
DEBIAN_MUNGE_KEY = Path("/etc/munge/munge.key")
SPANK_PBS_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_pbs.so"),
    Path("/usr/lib/aarch64-linux-gnu/slurm-wlm/spank_pbs.so"),
    Path("/usr/lib/slurm-wlm/spank_pbs.so"),
)
MUNGE_USER = "munge"
MUNGE_KEY_BYTES = 1024
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.25
PARTITION = "debug"


class ClusterError(RuntimeError):
    """The test cluster cannot start; the message says why."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _real_memory_mb() -> int:
    """The node's memory as slurmd itself measures it (``slurmd -C``)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=False).stdout
    for token in out.split():
        if token.startswith("RealMemory="):
            return int(token.split("=", 1)[1])
    raise ClusterError(f"slurmd -C printed no RealMemory: {out.strip()!r}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"{path}: (no log)"
    return f"{path}: " + " | ".join(text[-lines:])


class SlurmCluster:
    """A one-node Slurm cluster; use :meth:`running` (a context manager) or start/stop."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="lymphcv-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket_path = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self._processes: List[subprocess.Popen] = []
        self._logs: Dict[int, Path] = {}

    @property
    def env(self) -> Dict[str, str]:
        """Variables the client commands (sbatch, qsub, squeue, …) need."""
        return {"SLURM_CONF": str(self.conf)}

    # -- start -------------------------------------------------------------------------
    def _check_host(self) -> Path:
        if os.geteuid() != 0:
            raise ClusterError("the test cluster needs root (slurmd runs jobs as their user)")
        missing = [name for name in REQUIRED_COMMANDS if shutil.which(name) is None]
        if missing:
            raise ClusterError(f"missing commands {', '.join(missing)}: run `make sysdeps`")
        for candidate in SPANK_PBS_CANDIDATES:
            if candidate.is_file():
                return candidate
        raise ClusterError("spank_pbs.so not found: install slurm-wlm-basic-plugins")

    def _munge_key(self, munge: pwd.struct_passwd) -> Path:
        key = self.munge_dir / "munge.key"
        if DEBIAN_MUNGE_KEY.is_file():
            shutil.copyfile(DEBIAN_MUNGE_KEY, key)
        else:
            key.write_bytes(os.urandom(MUNGE_KEY_BYTES))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        return key

    def _start_munge(self) -> None:
        try:
            munge = pwd.getpwnam(MUNGE_USER)
        except KeyError as exc:
            raise ClusterError(f"no '{MUNGE_USER}' user: install the munge package") from exc
        self.munge_dir.mkdir()
        self.munge_dir.chmod(0o755)  # munged requires its socket folder searchable by all
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = self._munge_key(munge)
        self._spawn(
            ["munged", "--foreground", f"--socket={self.socket_path}", f"--key-file={key}",
             f"--log-file={self.munge_dir / 'munged.log'}", f"--pid-file={self.munge_dir / 'munged.pid'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            user=MUNGE_USER, log=self.log_dir / "munged.out",
        )
        self._wait(lambda: self.socket_path.exists(), "munged socket", self.munge_dir / "munged.log")

    def _write_conf(self, spank_pbs: Path) -> None:
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir()
        spool.mkdir()
        plugstack = self.root / "plugstack.conf"
        plugstack.write_text(f"required {spank_pbs}\n")
        lines = [
            "ClusterName=lymphcv",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket_path}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerParameters=sched_interval=1",
            "DependencyParameters=kill_invalid_depend",
            "MailProg=/bin/true",
            "ReturnToService=2",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            f"PlugStackConfig={plugstack}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} "
            f"RealMemory={_real_memory_mb()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, argv: List[str], log: Path, user: Optional[str] = None) -> None:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, user=user, start_new_session=True,
            )
        self._processes.append(process)
        self._logs[process.pid] = log

    def _wait(self, ready, what: str, log: Path, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for process in self._processes:
                if process.poll() is not None:
                    raise ClusterError(f"{process.args[0]} exited with {process.returncode}; "
                                       f"{_tail(self._logs[process.pid])}; {_tail(log)}")
            time.sleep(POLL_S)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; {_tail(log)}")

    def node_state(self) -> str:
        """The node's state as ``sinfo`` reports it (``idle``, ``mixed``, ``down*``, …)."""
        result = subprocess.run(
            ["sinfo", "--noheader", "--nodes", self.host, "--format=%T"],
            capture_output=True, text=True, env={**os.environ, **self.env}, check=False,
        )
        return result.stdout.strip()

    def start(self) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        spank_pbs = self._check_host()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (as the munge user) must reach its socket folder
        try:
            self._start_munge()
            self._write_conf(spank_pbs)
            self._spawn(["slurmctld", "-D", "-c", "-f", str(self.conf)], log=self.log_dir / "slurmctld.out")
            self._spawn(["slurmd", "-D", "-f", str(self.conf)], log=self.log_dir / "slurmd.out")
            self._wait(lambda: self.node_state() == "idle", "the node to be idle", self.log_dir / "slurmctld.log")
        except BaseException:
            self.stop()
            raise
        return self

    # -- stop --------------------------------------------------------------------------
    def cancel_all(self) -> None:
        """Cancel every job still queued or running."""
        subprocess.run(["scancel", "--full", "--partition", PARTITION], env={**os.environ, **self.env},
                       capture_output=True, check=False)

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons (newest first) by PID and remove the folder."""
        if any(process.poll() is None for process in self._processes):
            self.cancel_all()
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator["SlurmCluster"]:
        """Start the cluster for the duration of a ``with`` block."""
        self.start()
        try:
            yield self
        finally:
            self.stop()
