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
import signal

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def preemption_signals_blocked():
    """Processes started inside inherit PREEMPT_SIGNALS blocked; this process receives them on exit."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
