"""`run.profile_steps=A:B`: a torch.profiler trace of optimizer steps A to B-1 on every process.

Each process writes ``<run dir>/profile/rank<R>_steps<A>-<B-1>.pt.trace.json.gz``: a Chrome trace (gzipped JSON)
that Perfetto (ui.perfetto.dev) opens as it is, and that TensorBoard's PyTorch profiler plugin reads
(``tensorboard --logdir <run dir>/profile``; the ``.pt.trace.json.gz`` ending is what it looks for). Rank 0 also
logs a table of the operators that took the most time in its window.

Steps are counted over the whole run, from 1, as metrics.jsonl's "step": a resumed run profiles the window's
steps it runs (a run stopped inside the window writes what it profiled, the requeued run the rest). The
profiler starts one step early (a warm-up step whose events are dropped: the first traced step would carry the
profiler's start-up) and exists only around the window: outside it, a step pays one integer comparison, and the
marks (``mark("forward_backward")``) are a shared no-op context.

    profiler = StepProfiler(profile_window(cfg.run.profile_steps), run_dir, env)
    with profiler.step(global_step + 1):   # around each optimizer step
        ...
    profiler.close()                       # at the run's end, whatever ended it
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile, record_function

log = logging.getLogger(__name__)

TOP_OPERATORS = 12  # rows of the logged table
_OFF = contextlib.nullcontext()  # reusable: the mark of an unprofiled step costs a method call


class StepProfiler:
    def __init__(self, window: tuple[int, int] | None, run_dir: Path, rank: int, device: torch.device):
        self.window, self.folder, self.rank, self.device = window, Path(run_dir) / "profile", rank, device
        self._prof: profile | None = None
        self._stack = contextlib.ExitStack()
        self._first = self._last = 0  # the steps traced so far (after the warm-up step)

    def mark(self, name: str):
        """A named range in the trace (data_wait, forward_backward, optimizer_step); nothing when not tracing."""
        return record_function(name) if self._prof is not None else _OFF

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """Around optimizer step ``number`` (counted from 1 over the whole run)."""
        if self.window is None or number >= self.window[1] or number < self.window[0] - 1:
            yield  # outside the window and its warm-up step: the usual case
            return
        if self._prof is None:
            self._start(number)
        yield
        if number >= self.window[0]:
            self._first, self._last = self._first or number, number
        if number == self.window[1] - 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the window's last kernels belong in its trace
            self._prof.step()  # the schedule says "save": the trace is written (export below)
            self.close()
        else:
            self._prof.step()

    def _start(self, number: int) -> None:
        first, end = self.window

        def action(step: int) -> ProfilerAction:
            step = max(step, number)  # the profiler asks about step 0 when it is made: that is `number`
            if step < first:
                return ProfilerAction.WARMUP
            if step < end - 1:
                return ProfilerAction.RECORD
            return ProfilerAction.RECORD_AND_SAVE if step == end - 1 else ProfilerAction.NONE

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        prof = profile(activities=activities, schedule=action, on_trace_ready=self._export)
        prof.step_num = number  # the trace's ProfilerStep#N are the run's step numbers
        self._prof = self._stack.enter_context(prof)  # started; close() stops it (and frees its step counter)

    def _export(self, prof: profile) -> None:
        if not self._last:  # stopped during the warm-up step: nothing was traced
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self.rank}_steps{self._first}-{self._last}.pt.trace.json.gz"
        prof.export_chrome_trace(str(path))
        if self.rank == 0:
            sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_OPERATORS)
            log.info(
                "profile of steps %d-%d: traces %s (one per process; open in ui.perfetto.dev or "
                "`tensorboard --logdir %s`); top operators on rank 0:\n%s",
                self._first,
                self._last,
                self.folder / f"rank*_steps{self._first}-{self._last}.pt.trace.json.gz",
                self.folder,
                table,
            )

    def close(self) -> None:
        """Stop tracing: a run that ends inside the window (a stop, an error) writes the steps it traced."""
        self._prof = None
        self._stack.close()  # from RECORD: the trace is saved (on_trace_ready); after the window: nothing more
