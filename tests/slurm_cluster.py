"""A throwaway single-node SLURM cluster on this machine, for tests that submit real jobs.

`SlurmCluster(directory).start()` runs munged, slurmctld and slurmd (as root, in the
foreground, each its own process) with every file they write under `directory`: a generated
slurm.conf, a fresh munge key, state, spool, logs and sockets. Clients find it through
`SLURM_CONF` (see `env()`). `stop()` ends the three daemons and whatever jobs still run.

Debian's packages: `apt-get install slurm-wlm munge`. `missing()` says why a cluster cannot
start here (for a skip reason).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel")
NODE = "localhost"
PARTITION = "debug"


def missing() -> str | None:
    """Why a local SLURM cluster cannot start here, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as their submitting user)"
    absent = [name for name in (*DAEMONS, *CLIENTS) if not _which(name)]
    if absent:
        return (
            f"{', '.join(absent)} not found: install Debian's slurm-wlm and munge "
            "(apt-get install slurm-wlm munge; .ci/run does this when it runs as root)"
        )
    return None


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost: one node with this machine's CPUs, one
    partition, no accounting, no cgroups (proctrack/linuxproc, task/none)."""

    def __init__(self, directory: Path, cpus: int | None = None) -> None:
        # Short paths: the munge socket's path must fit a sockaddr_un (108 bytes).
        self.dir = directory
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = max(1024, _memory_mb() - 1024)  # what the node offers jobs
        self.conf = directory / "slurm.conf"
        self.munge_socket = directory / "munge.sock"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, squeue, ...) of this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> str:
        """A client command (`sinfo`, `scontrol`, ...) against this cluster; its stdout."""
        proc = subprocess.run(
            command, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # munged refuses a socket directory others may write to
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(self._slurm_conf())
        try:
            self._spawn(
                "munged",
                "--foreground",
                "--force",  # runs as root, in a directory it did not create
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.dir / 'munged.pid'}",
                f"--seed-file={self.dir / 'munged.seed'}",
                f"--log-file={self.dir / 'log' / 'munged.log'}",
            )
            self._wait(lambda: self.munge_socket.exists(), timeout_s, "munged's socket")
            self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
            self._spawn("slurmd", "-D", "-N", NODE, "-f", str(self.conf))
            self._wait(self._node_idle, timeout_s, f"node {NODE} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (each by its own pid)."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", PARTITION, check=False, timeout=10)
            with suppress(TimeoutError):
                self._wait(lambda: not self.run("squeue", "-h", check=False).strip(), 15, "")
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, tail: int = 3000) -> str:
        """The daemons' logs, last `tail` characters each: for a failing test's message."""
        parts = []
        for path in sorted((self.dir / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def wait(self, job_id: str, timeout_s: float = 300) -> dict[str, str]:
        """Wait until the job (every task of an array) has left the queue; its `job_states`.
        Polls every 0.5 s: `sbatch --wait` backs off to 32 s between checks."""
        self._wait(
            lambda: not self.run("squeue", "-h", "-j", job_id, check=False).strip(),
            timeout_s,
            f"job {job_id} to finish",
        )
        return self.job_states(job_id)

    def job_states(self, job_id: str) -> dict[str, str]:
        """Each of a job's (array) tasks: its state and exit code, while slurmctld keeps the
        finished job (MinJobAge), e.g. {"12_0": "COMPLETED 0:0", "12_1": "COMPLETED 0:0"}."""
        out = self.run("scontrol", "-o", "show", "job", job_id)
        states = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            name = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
            states[name] = f"{fields['JobState']} {fields['ExitCode']}"
        return states

    def _slurm_conf(self) -> str:
        d = self.dir
        ctld_port, slurmd_port = _free_port(), _free_port()
        return f"""\
ClusterName=pipelinetest
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "log" / "slurmctld.log"}
SlurmdLogFile={d / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.dir / "log" / f"{name}.out").open("wb")
        self._procs[name] = subprocess.Popen(
            [_which(name) or name, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,  # a Ctrl-C meant for pytest does not reach it first
        )

    def _node_idle(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.logs()}")
        out = self.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False, timeout=10)
        return out.strip() == "idle"

    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.2)
