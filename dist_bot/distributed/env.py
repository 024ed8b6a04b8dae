"""Who am I: rank and world size from torchrun, from Slurm (`srun`, one task per GPU) or a plain process.

torchrun (and submitit's TorchDistributedEnvironment) export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT.
Under `srun` without torchrun we derive them from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first
host of SLURM_JOB_NODELIST. Data is always sharded by the GLOBAL rank.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import PeerFailed, UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable, safe as a shared default
    source: str = "single"  # torchrun | slurm | single
    local_world_size: int = 1  # processes on this node (they share its CPUs)
    generation: int = 0  # which process group of this process (see store_prefix)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host name of a Slurm node list: 'node[3-5,9],gpu01' -> 'node3'."""
    try:  # scontrol knows every syntax Slurm accepts
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_tasks_on_this_node(env: dict[str, str]) -> int:
    """Tasks of this job step on this node: SLURM_NTASKS_PER_NODE, else the first count of SLURM_TASKS_PER_NODE
    ('4(x2),3' -> 4; Slurm fills nodes in order, so it bounds this node's count)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    m = re.match(r"(\d+)", env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    return int(m.group(1)) if m else 1


def read_launch_env(environ: dict[str, str] | None = None) -> dict[str, str | int]:
    """rank, world_size, local_rank, local_world_size, master_addr, master_port and the launcher, from the
    environment. The launcher ("source") is "slurm" for a process that is one Slurm task of its own (srun, or
    submitit, which exports the torch variables from Slurm's), "torchrun" for a process that torchrun (or
    anything setting the torch variables) started, "single" for a plain process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, submitit, or dist_bot's own export (init_distributed)
        own_task = (
            "TORCHELASTIC_RUN_ID" not in env
            and env.get("SLURM_PROCID") == env["RANK"]
            and env.get("SLURM_NTASKS") == env["WORLD_SIZE"]
        )
        return {
            "source": "slurm" if own_task else "torchrun",
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "local_world_size": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": env.get("MASTER_PORT", "29500"),
        }
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun, one task per process
        job = int(env.get("SLURM_JOB_ID", "0"))
        return {
            "source": "slurm",
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "local_world_size": slurm_tasks_on_this_node(env),
            "master_addr": env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # a port derived from the job id, so two jobs sharing a node do not collide
            "master_port": env.get("MASTER_PORT", str(20000 + job % 20000)),
        }
    return {
        "source": "single",
        "rank": 0,
        "world_size": 1,
        "local_rank": 0,
        "local_world_size": 1,
        "master_addr": "",
        "master_port": "",
    }


def export_launch_env(launch: dict[str, str | int], environ=None) -> None:
    """Export the torch variables that libraries read (DeepSpeed asserts LOCAL_RANK, torch's env:// reads RANK,
    WORLD_SIZE, MASTER_ADDR/PORT), whichever launcher started this process; a plain process exports none, so it
    stays a plain process when read again."""
    environ = os.environ if environ is None else environ
    if launch["source"] == "single":
        return
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for name in names:
        environ[name] = str(launch[name.lower()])


def device_index(local_rank: int, local_world_size: int, device_count: int, environ=None) -> int:
    """The GPU of this process among those it sees: its local rank when each process sees all the node's GPUs,
    0 when the launcher gave each its own (srun --gpus-per-task=1: one visible GPU per task). More processes on
    a node than GPUs is an error now: shared GPUs would fail later in NCCL ("Duplicate GPU"), or run slowly."""
    environ = os.environ if environ is None else environ
    if device_count == 1 and local_world_size > 1 and environ.get("SLURM_GPUS_PER_TASK") == "1":
        return 0
    if local_world_size > device_count or local_rank >= device_count:
        raise UserError(
            f"{local_world_size} processes on this node, but {device_count} GPU(s) visible to each: start one "
            f"process per GPU (torchrun --nproc-per-node={device_count}, srun --ntasks-per-node={device_count}, "
            "or srun --gpus-per-task=1)"
        )
    return local_rank


_GROUPS = [0]  # process groups this process has made: each gets key spaces of its own in a store that outlives it


def init_distributed(backend: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join the process group (when there is more than one process) and pick this process's device."""
    launch = read_launch_env()
    rank, world, local = int(launch["rank"]), int(launch["world_size"]), int(launch["local_rank"])
    local_world = int(launch["local_world_size"])
    if torch.cuda.is_available():
        device = torch.device("cuda", device_index(local, local_world, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    export_launch_env(launch)
    generation = _GROUPS[0]
    # A launcher's single process joins a group too (of one): the same NCCL/gloo and DDP code runs as on many.
    if (world > 1 or launch["source"] != "single") and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_min)
        _GROUPS[0] += 1
        dist.init_process_group(
            backend,
            store=restart_safe_store(world, timeout, generation),  # None: the usual env:// rendezvous
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank, world, local, device, str(launch["source"]), local_world, generation)


def store_prefix(generation: int) -> str:
    """The key space of one process group in a store that outlives it: torchrun's store lives through every
    restart of its workers (TORCHELASTIC_RESTART_COUNT), and through several groups made one after the other in
    one process (dist_bot.cli.main called twice: a sweep driven from Python)."""
    return f"dist_bot/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/group_{generation}/"


def restart_safe_store(world: int, timeout: datetime.timedelta, generation: int = 0) -> dist.Store | None:
    """Under torchrun, the agent's store with a key prefix of its own for each process group (store_prefix).

    torchrun (--max-restarts) keeps one store for the whole job, and the keys an earlier group's processes wrote
    stay in it: gloo's rendezvous then reads the earlier processes' addresses and the new group never forms, or
    hangs (a test in tests/system/test_faults.py restarts a group after a SIGKILL; one in
    tests/system/test_launch.py trains twice in one torchrun). Elsewhere: None.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(store_prefix(generation), store)


def shutdown(finished: bool = False) -> None:
    """Leave the process group cleanly: an exit-time abort turns a good run's exit status into an error.

    ``finished``: every process got here without an error, so they meet at a barrier first. A gloo worker thread
    still retiring the last collective when the interpreter starts finalizing needs the GIL to free a Python
    tensor, is ended inside a C++ destructor instead, and aborts the process ("terminate called without an
    active exception", exit -6; a core dump of tests/probes/strategy_probe.py under CPU load showed
    ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork -> THPVariable_dealloc -> PyThread_exit_thread). Once DDP has
    been built, destroy_process_group does not end gloo's workers (torch keeps references to the group), so
    they live into the finalization; the barrier's round trip lets them retire their work first, and the
    collection frees what still refers to the groups while Python can still run their destructors."""
    if not dist.is_initialized():
        return
    if finished and dist.get_world_size() > 1:
        with contextlib.suppress(RuntimeError):  # a peer failed after the last collective: its error is the news
            dist.barrier()
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        # through DeepSpeed, which then also drops the groups it keeps: a later run in this process (a sweep
        # driven from Python) would otherwise hand this destroyed group to its ZeRO ("is not registered")
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    gc.collect()


class FailureWatch:
    """Makes a fatal error on one process end every process of the run within seconds, each with that error.

    Without it, the others learn of a failure only from their next collective: with gloo, as an unexplained
    "Connection closed by peer" (a traceback, and the cause is in another process's log); with NCCL, not at
    all until the process group's timeout (30 minutes), since a dead peer does not make NCCL's wait fail. So a
    failing process writes its error to the launcher's key-value store (``announce``), before it leaves the
    process group; a thread of every other process polls that key once a second (``POLL_S``), on a connection of
    its own, and keeps the message. The process that then fails in a collective raises
    PeerFailed with it (``peer_failure``); one that is still blocked after ``grace_s`` (NCCL) is ended by
    ``on_peer_failure`` (which prints the message and exits at once: its loaders' workers end with it)."""

    ACK_WAIT_S = 5.0  # how long a failing process waits for the others to have read its error
    # How often the watching thread checks the store for a failure. A check, not a blocking wait: close() then ends
    # the thread before the interpreter ends (a thread blocked in the store's C++ wait at exit, its store's host
    # gone, aborted the process: "terminate called without an active exception"), and a timed-out wait would log
    # a warning each time. One small request per second per process to rank 0's store.
    POLL_S = 1.0

    def __init__(
        self,
        env: DistEnv,
        on_peer_failure: Callable[[str], None],
        grace_s: float = 10.0,
        on_message: Callable[[str], None] | None = None,
    ):
        self.env, self.on_peer_failure, self.grace_s = env, on_peer_failure, grace_s
        self.on_message = on_message  # called first with every message read (a hang's ends this process there)
        self.message: str | None = None
        self.received, self.handled = threading.Event(), threading.Event()
        self.store: dist.Store | None = None
        if not (env.distributed and dist.is_initialized()):
            return
        # One key space per process group: torchrun's store outlives an elastic restart, and a group.
        self.prefix = store_prefix(env.generation) + "failure/"
        self.store = self._connect()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="failure-watch", daemon=True)
        self._thread.start()

    def _connect(self) -> dist.Store:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        timeout = datetime.timedelta(seconds=self.ACK_WAIT_S)
        return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)

    def _watch(self) -> None:
        key = self.prefix + "error"
        while not self._stop.wait(self.POLL_S):
            try:
                if self.store.check([key]):
                    break
            except Exception:
                return  # the store is gone, so is the run (its host, rank 0 under srun, ended)
        else:
            return  # closed
        try:
            self.message = self.store.get(key).decode()
            self.store.set(f"{self.prefix}read/{self.env.rank}", "1")
        except Exception:  # the store is gone
            self.message = "another process failed (its error is in its log)"
        self.received.set()
        if self.on_message is not None and not self.handled.is_set():
            self.on_message(self.message)
        if not self.handled.wait(self.grace_s):  # still blocked, in a collective that a dead peer does not end
            self.on_peer_failure(f"stopping: {self.message}")

    def peer_failure(self, wait_s: float = 3.0) -> PeerFailed | None:
        """The error another process announced, as this process's own (None without one, after ``wait_s``)."""
        if self.store is None or not self.received.wait(wait_s):
            return None
        self.handled.set()
        return PeerFailed(f"stopping: {self.message}")

    def close(self) -> None:
        """The run has ended here, one way or another: a failure announced from now on ends nothing, and the
        watching thread ends (within POLL_S) before the process does."""
        self.handled.set()
        if self.store is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=10 * self.POLL_S)

    def announce(self, error: BaseException) -> None:
        """Tell the other processes that this one failed with ``error``; wait (briefly) until they have read it,
        since the store may live in this process (rank 0 under srun)."""
        if self.store is None or self.received.is_set():  # a peer failed first: this error is a consequence
            return
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        what = first_line if isinstance(error, UserError) else f"{type(error).__name__}: {first_line}"
        self.announce_text(f"rank {self.env.rank} failed: {what}")

    def announce_text(self, text: str) -> None:
        """``text`` to every other process (see announce)."""
        if self.store is None or self.received.is_set():
            return
        try:
            store = self._connect()
            store.set(self.prefix + "error", text)
            others = [f"{self.prefix}read/{r}" for r in range(self.env.world_size) if r != self.env.rank]
            store.wait(others, datetime.timedelta(seconds=self.ACK_WAIT_S))
        except Exception:  # a peer that died, or no store: the others still stop, from their collective
            pass


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over all processes (float64, so sample counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], env: DistEnv) -> list[float]:
    """The largest value of each over all processes."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def local_peak_memory_mb(env: DistEnv) -> tuple[float, float]:
    """This process's peak resident memory and peak GPU memory allocated (0 without a GPU), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated(env.device) / 2**20 if env.device.type == "cuda" else 0.0
    return rss, gpu


def average_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Average floating buffers (BN running statistics) over processes, in place; a collective. Summed in fp32
    whatever their dtype: fp16 buffers (DeepSpeed's fp16) would overflow the sum of 32 ranks' running_var once a
    variance exceeds 2,047."""
    if env.distributed:
        for buf in module.buffers():
            if not buf.is_floating_point():
                continue
            if buf.dtype in (torch.float32, torch.float64):
                dist.all_reduce(buf)
                buf.div_(env.world_size)
            else:
                total = buf.float()
                dist.all_reduce(total)
                buf.copy_(total.div_(env.world_size))


BROADCAST_BUCKET_BYTES = 250 * 2**20  # DDP's default bucket for its buffer broadcast


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BN running statistics) on every rank, in place: DDP's rule before every training forward,
    so all ranks normalize with the same statistics. One coalesced broadcast, not one collective per buffer."""
    buffers = [b.detach() for b in module.buffers()]
    dist._broadcast_coalesced(dist.group.WORLD, buffers, BROADCAST_BUCKET_BYTES, 0)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every process if it is True on any (e.g. a preemption signal that reached only one rank)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
