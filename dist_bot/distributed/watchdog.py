"""A hang ends the job, and says where every process waited.

A collective that never completes (a node lost, a link down, one rank stuck in its loader or stopped) blocks
every process; NCCL's own timeout (dist.timeout_min) ends them only after 30 minutes, with no stack and no
record of the last collectives. So every process of a run keeps a heartbeat, beaten where work completes (an
optimizer step, an evaluation batch, a checkpoint write: ``HEARTBEAT.beat``), and a thread watches it: when
nothing has completed for ``dist.hang_timeout_min``, it writes every thread's Python stack (faulthandler) to
<run>/hang/rank<R>.txt and stderr (on NCCL also torch's flight recorder of the last collectives,
<run>/hang/nccl/rank<R>, read by `torchfrtrace <run>/hang/nccl --prefix rank`), announces the hang through the
launcher's store (FailureWatch), and ends its process with HANG_EXIT_CODE. A process that reads the
announcement dumps its own stacks and ends the same way; one that cannot (stopped, or dead) is ended by its
launcher when the others have exited (torchrun at once; srun after its --wait). HANG_EXIT_CODE is not the
requeue status (75), so a hung job ends rather than being requeued again and again.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

HANG_EXIT_CODE = 3
HANG_MARK = "hang: "  # how a hang announcement starts (FailureWatch carries it beside other failures' messages)


def flight_recorder_env(folder: Path, environ=None) -> None:
    """Turn on torch's NCCL flight recorder (the last collectives of each process) before the process group is
    made, writing to ``folder`` on NCCL's own timeout too; a user's own settings win."""
    environ = os.environ if environ is None else environ
    if not torch.cuda.is_available():
        return
    (folder / "nccl").mkdir(parents=True, exist_ok=True)  # torch writes its dumps there, it does not make it
    environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")  # collectives kept (torch's name since 2.7)
    environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", environ["TORCH_FR_BUFFER_SIZE"])  # its name before
    environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(folder / "nccl" / "rank"))  # + the rank
    environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", environ["TORCH_FR_DUMP_TEMP_FILE"])


def dump_stacks(folder: Path, rank: int, why: str) -> Path:
    """Every thread's Python stack to folder/rank<R>.txt and stderr; on NCCL, the flight recorder beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.txt"
    with open(path, "w") as f:
        f.write(f"{why}\n\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    sys.stderr.write(f"rank {rank}: {why}; every thread's stack follows (also in {path})\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        try:  # a private API (torch >= 2.3), so a failure is a line in the stack file, not an error
            from torch._C._distributed_c10d import _dump_nccl_trace

            (folder / "nccl").mkdir(exist_ok=True)
            (folder / "nccl" / f"rank{rank}").write_bytes(_dump_nccl_trace())  # torch's own name for a dump
        except Exception as e:
            with open(path, "a") as f:
                f.write(f"\nno NCCL flight recorder dump: {type(e).__name__}: {e}\n")
    return path


class Heartbeat:
    """When work last completed in this process, and what it was; one per process, like the signal handlers."""

    def __init__(self) -> None:
        self.last, self._done = time.monotonic(), ("start-up", None)

    def beat(self, what: str, step: int | None = None) -> None:
        """Called once per training step (and after other work): it only stores; ``what`` is formatted when a hang
        is reported."""
        self.last, self._done = time.monotonic(), (what, step)

    @property
    def what(self) -> str:
        what, step = self._done  # one read: a beat between two reads cannot mix two beats
        return what if step is None else f"{what} {step}"

    def idle_s(self) -> float:
        return time.monotonic() - self.last


HEARTBEAT = Heartbeat()


class HangWatch:
    """Calls ``on_hang(why)`` from a thread of its own once HEARTBEAT has been idle for ``timeout_s``."""

    def __init__(self, timeout_s: float, rank: int, on_hang: Callable[[str], None]):
        self.timeout_s, self.rank, self.on_hang = timeout_s, rank, on_hang
        self._stop = threading.Event()
        HEARTBEAT.beat("start-up")
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="hang-watch", daemon=True).start()

    def _watch(self) -> None:
        poll = min(5.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            idle = HEARTBEAT.idle_s()
            if idle >= self.timeout_s:
                self.on_hang(
                    f"rank {self.rank}: nothing completed for {idle / 60:.2f} min (dist.hang_timeout_min="
                    f"{self.timeout_s / 60:g}); the last thing that did: {HEARTBEAT.what}"
                )
                return

    def close(self) -> None:
        self._stop.set()
