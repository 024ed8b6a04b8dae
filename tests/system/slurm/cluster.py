"""TEST HELPER: a real two-node Slurm 22.05 cluster on this one machine, for the tests marked `slurm`.

    python tests/system/slurm/cluster.py up DIR      # prints the SLURM_CONF to export; `down DIR` stops it

munged, slurmctld and two slurmd (node1, node2: Debian's build has MULTIPLE_SLURMD) run as root with every
state, log, socket and pid file under DIR. The slurmds run in a private mount namespace whose /etc/hosts maps
node1/node2 to 127.0.0.1, so a job's MASTER_ADDR=node1 resolves. There is no accounting daemon (slurmdbd
needs a MySQL server): `tests/system/slurm/bin/sacct` stands in for the one sacct call submitit makes.
Tasks are bound to CPUs as production clusters bind them (TaskPlugin=task/affinity: each task's affinity is the
CPUs it was given; it runs in this container, task/cgroup was not tried), so a launcher that gives a task too few
CPUs shows here. Both nodes have this machine's CPUs (at least 2).
MinJobAge=4 keeps finished jobs visible for a few seconds only: `sbatch --wait` then polls every 2 s (with
Slurm's default of 300 s it sleeps 2, 8, then 32 s between polls, which cost a test up to half a minute).
cred_expire=5 (a job step's credential lifetime, 120 s by default) is also how long a requeued job waits before
it may start again (cred_expire + 1 s: PENDING, Reason=BeginTime), which the preemption tests pay.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NODES = ("node1", "node2")
HERE = Path(__file__).resolve().parent
CTLD_PORT = 16817
SLURMD_PORTS = (17001, 17002)


class ClusterError(RuntimeError):
    pass


def missing() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    need = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "unshare", "mount"]
    absent = [b for b in need if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): bash scripts/install_slurm.sh (Debian, root)"
    if os.geteuid() != 0:
        return "starting Slurm daemons needs root"
    return None


def _conf(d: Path) -> str:
    cpus = max(2, os.cpu_count() or 2)
    return f"""# written by tests/system/slurm/cluster.py: a throw-away test cluster
ClusterName=distbot
SlurmctldHost=localhost
SlurmctldPort={CTLD_PORT}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=4
KillWait=10
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{SLURMD_PORTS[0]}-{SLURMD_PORTS[1]}] \
CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def _run(cmd: list[str], env: dict | None = None) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if out.returncode:
        raise ClusterError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")


def client_env(d: Path) -> dict[str, str]:
    """The environment a Slurm client (sbatch, squeue, submitit) needs to talk to this cluster."""
    return {"SLURM_CONF": str(d / "slurm.conf"), "PATH": f"{HERE / 'bin'}:{os.environ['PATH']}"}


def up(d: Path, timeout: float = 60) -> dict[str, str]:
    """Start munged, slurmctld and both slurmds; return the client environment once both nodes are idle."""
    why = missing()
    if why:
        raise ClusterError(why)
    d = d.resolve()
    for sub in ("state", "spool/node1", "spool/node2"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "slurm.conf").write_text(_conf(d))
    (d / "hosts").write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 " + " ".join(NODES) + "\n")
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    _run(
        [
            "munged",
            "--force",
            f"--socket={d}/munge.sock",
            f"--key-file={key}",
            f"--pid-file={d}/munged.pid",
            f"--log-file={d}/munged.log",
            f"--seed-file={d}/munged.seed",
        ]
    )
    env = os.environ | client_env(d)
    _run(["slurmctld", "-f", str(d / "slurm.conf")], env)
    for node in NODES:
        script = f"mount --bind {d}/hosts /etc/hosts && exec slurmd -N {node} -f {d}/slurm.conf"
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env)
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env)
        states = out.stdout.strip()
        if out.returncode == 0 and sorted(states.split()) == sorted([*NODES, "idle", "idle"]):
            return client_env(d)
        time.sleep(0.3)
    raise ClusterError(f"the Slurm nodes did not become idle within {timeout:.0f} s (sinfo: {states!r}); logs in {d}")


def _pid(f: Path) -> int | None:
    try:
        return int(f.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(pids: list[int], timeout: float = 15) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _processes_using(d: Path) -> list[int]:
    """slurmstepd and job processes of this cluster: SLURM_CONF points here and they are a step or in a job.

    (Not "anything naming DIR": the test runner itself carries DIST_BOT_SLURM_DIR in its environment.)
    """
    conf = f"SLURM_CONF={d / 'slurm.conf'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        in_job = any(v.startswith(b"SLURM_JOB_ID=") for v in environ) or cmdline.startswith(b"slurmstepd")
        if conf in environ and in_job:
            found.append(int(proc.name))
    return found


def down(d: Path, remove: bool = False) -> None:
    """Cancel every job, stop the daemons, end leftover job processes; optionally delete DIR."""
    d = d.resolve()
    if (d / "slurm.conf").exists():
        env = os.environ | client_env(d)
        subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, env=env, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env, timeout=30)
            if q.returncode or not q.stdout.strip():
                break
            time.sleep(0.5)
    daemons = [p for f in ("slurmd-node1.pid", "slurmd-node2.pid", "slurmctld.pid") if (p := _pid(d / f))]
    _stop(daemons)
    _stop(_processes_using(d))
    munged = _pid(d / "munged.pid")
    if munged:
        _stop([munged])
    if remove:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("up", "down") or sys.argv[3:] not in ([], ["--remove"]):
        sys.exit("usage: python tests/system/slurm/cluster.py up DIR | down DIR [--remove]")
    folder = Path(sys.argv[2])
    if sys.argv[1] == "up":
        t0 = time.monotonic()
        print(f"export SLURM_CONF={up(folder)['SLURM_CONF']}  # cluster up in {time.monotonic() - t0:.1f} s")
    else:
        down(folder, remove=len(sys.argv) == 4)
