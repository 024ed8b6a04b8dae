"""The preemption signals, and starting helper processes that must not act on them.

Slurm signals EVERY process of a job step: SIGTERM when it preempts the job or its time is up, the user's
warning signal (--signal: SIGUSR1 for our sbatch scripts, SIGUSR2 for submitit) ahead of that. Only the
training process may act on them: it finishes its step and all ranks write one checkpoint together. A helper
process that died of the signal instead (a DataLoader worker or its forkserver, W&B's service) would fail
that last step, evaluation or log. So helpers are started with these signals blocked: a blocked signal stays
blocked through fork and exec, and while blocked in this process a signal waits instead of being lost.
"""

from __future__ import annotations

import contextlib
import multiprocessing.resource_tracker
import os
import select
import signal
import threading

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def preemption_signals_blocked():
    """Processes started inside inherit PREEMPT_SIGNALS blocked; this process receives them on exit."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def helpers_shielded():
    """Start helper processes inside (DataLoader's forkserver, DALI's Python workers): they inherit PREEMPT_SIGNALS
    blocked. multiprocessing's resource tracker, which a spawn or forkserver start launches first when it is not
    running, is started here beforehand: launching it, multiprocessing unblocks SIGTERM on its way out."""
    with preemption_signals_blocked():
        multiprocessing.resource_tracker.ensure_running()
        with preemption_signals_blocked():
            yield


def end_with_trainer(trainer_pid: int) -> None:
    """Called first thing in a helper process whose parent is not the trainer (a DataLoader worker is a child of
    the forkserver): end it when the trainer ends, or when the trainer terminates it.

    Such a helper has SIGTERM blocked (above), so neither of the ways it would otherwise end works: torch's
    worker watches its PARENT, the forkserver, which outlives the trainer (a worker holds the forkserver's
    alive pipe open), and multiprocessing's terminate() at the trainer's exit sends a SIGTERM that stays
    pending, after which the trainer joins the worker forever. A daemon thread takes SIGTERM from the blocked
    set itself: the trainer's ends the helper, anyone else's (Slurm's, to every process of the job) is dropped;
    and it ends the helper within a second of the trainer's end, however that ended (an error, SIGKILL)."""
    try:
        pidfd = os.pidfd_open(trainer_pid)
    except ProcessLookupError:  # the trainer is already gone
        os._exit(1)

    def watch() -> None:
        while True:
            info = signal.sigtimedwait([signal.SIGTERM], 0.5)
            if info is not None and info.si_pid == trainer_pid:
                os._exit(0)
            if select.select([pidfd], [], [], 0)[0]:  # readable once the trainer has exited
                os._exit(1)

    threading.Thread(target=watch, name="end-with-trainer", daemon=True).start()


class PreemptionRequests:
    """The preemption signals this process received, caught from ``install()`` on.

    `dist-bot train` installs the handlers first thing, before torch is imported, so a signal during start-up
    (loaders, DALI's build, resume, W&B) is recorded rather than killing the process with a status the launchers
    do not requeue; the Trainer acts on it at its first agreement (exit 75, no checkpoint written). ``restore()``
    puts the previous handlers back: the CLI does that last, after the tracker and the process group are closed.
    """

    def __init__(self) -> None:
        self.received: tuple[int, ...] = ()
        self._previous: dict[int, object] | None = None

    @property
    def installed(self) -> bool:
        return self._previous is not None

    def install(self) -> bool:
        """Catch PREEMPT_SIGNALS from now on; False (and nothing done) when already installed."""
        if self._previous is not None:
            return False
        self.received = ()  # an earlier run's signals (of this same process) are not this run's
        self._previous = {s: signal.signal(s, self._handle) for s in PREEMPT_SIGNALS}
        return True

    def restore(self) -> None:
        if self._previous is not None:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received += (signum,)


PREEMPTION = PreemptionRequests()  # one per process: signal handlers are process-wide
