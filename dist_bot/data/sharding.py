"""Exact sharding: every sample once per epoch across all processes, in an order fixed by (seed, epoch).

An epoch is a sequence of optimizer steps. Step s takes the next G = batch x world x accumulation indices
of the epoch's permutation; process r takes every world-th of them (shares differ by at most one), and
micro-batch k of its share every accumulation-th of those. So micro-batch k of rank r holds the step's
indices k x world + r (mod world x accumulation): 1 process accumulating 2 micro-batches sees exactly the
batches 2 processes see, and trains to the same weights. The last step of an epoch is shorter; when it
would leave fewer than two samples per micro-batch it is folded into the step before. Every process runs
the same number of steps (so collectives line up).

The plan also fixes what the engine needs besides the images (``Step.feed`` hands it over as ``MicroBatch``):
each micro-batch's loss weight ``len(micro) x world / step_size``, so that the gradient summed over
micro-batches and averaged over processes is exactly the mean over the step's samples; and its mixup seed
(seed, epoch, step, k x world + rank), keyed like the sharding, so that a resumed run mixes identically and
accumulation mixes exactly as more processes would.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_PER_MICRO_BATCH = 2  # BatchNorm needs more than one value per channel in training


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the engine trains on it."""

    images: Any  # on the device, normalized, in the model's memory format
    labels: Any
    loss_weight: float  # its mean loss x this, summed over micro-batches and averaged over processes: the step's mean
    mix_seed: tuple[int, ...]  # seeds mixup's lambda and pairing: (seed, epoch, step, k x world + rank)
    last: bool  # the step's last micro-batch: gradients are reduced over processes after its backward

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Step:
    micro_batches: tuple[tuple[int, ...], ...]  # this process's sample indices, one tuple per micro-batch
    step_size: int  # samples in this step over all processes
    world_size: int = 1
    mix_seeds: tuple[tuple[int, ...], ...] = ()  # one per micro-batch (see the module docstring)

    def feed(self, batches: Iterator) -> Iterator[MicroBatch]:
        """This step's micro-batches from the loader's iterator, fetched one at a time as the engine asks."""
        n = len(self.micro_batches)
        for k, indices in enumerate(self.micro_batches):
            images, labels = next(batches)
            weight = len(indices) * self.world_size / self.step_size
            yield MicroBatch(images, labels, weight, self.mix_seeds[k], k == n - 1)


def make_step(
    micro_batches: tuple[tuple[int, ...], ...], step_size: int, seed: int, epoch: int, index: int, rank: int, world: int
) -> Step:
    """Step ``index`` of an epoch; micro-batch k of process ``rank`` gets the mixup seed of sample group
    k x world + rank."""
    seeds = tuple((seed, epoch, index, k * world + rank) for k in range(len(micro_batches)))
    return Step(micro_batches, step_size, world, seeds)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def plan_epoch(
    num_samples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    accum: int,
    seed: int,
    epoch: int,
    shuffle=True,
) -> list[Step]:
    """The steps of one training epoch for process ``rank``."""
    per_step = batch_size * world_size * accum
    order = epoch_order(num_samples, seed, epoch, shuffle)
    bounds = [*range(0, num_samples, per_step), num_samples]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_PER_MICRO_BATCH * world_size * accum:
        del bounds[-2]  # fold a too-short last step into the previous one
    if num_samples < MIN_PER_MICRO_BATCH * world_size:
        raise ValueError(
            f"{num_samples} training samples cannot feed {world_size} processes with at least "
            f"{MIN_PER_MICRO_BATCH} each: use more data or fewer processes"
        )
    steps = []
    for s, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        share = order[lo:hi][rank::world_size]
        n = min(accum, max(1, len(share) // MIN_PER_MICRO_BATCH))
        micro = tuple(tuple(int(i) for i in share[k::n]) for k in range(n))
        steps.append(make_step(micro, hi - lo, seed, epoch, s, rank, world_size))
    return steps


def cpus_per_process(env, environ: dict[str, str] | None = None) -> int:
    """The CPUs this process may use for data loading: its CPU affinity (capped by SLURM_CPUS_PER_TASK), shared
    with the other processes of the node unless srun gave each process its own task and CPUs."""
    environ = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0))
    per_task = environ.get("SLURM_CPUS_PER_TASK")
    if per_task:
        cpus = min(cpus, int(per_task))
    own_task = env.source == "slurm" and per_task  # srun, one task per process: these CPUs are this process's
    return max(1, cpus // (1 if own_task else max(1, env.local_world_size)))


def decode_workers(cfg, env) -> int:
    """data.workers, or (None) this process's CPUs."""
    return cpus_per_process(env) if cfg.data.workers is None else cfg.data.workers


def dataloader_workers(cfg, env) -> int:
    """torch DataLoader processes: data.workers, or (None) this process's CPUs but one, which the training
    thread needs itself (it receives, transfers and normalizes the batches); at least one."""
    return max(1, cpus_per_process(env) - 1) if cfg.data.workers is None else cfg.data.workers


MAX_DALI_PY_WORKERS = 8  # reading files and drawing crops is light next to decoding: a few keep ahead of it


def dali_py_workers(cfg, env) -> int:
    """DALI's Python workers: data.dali_py_workers, or (None) a quarter of this process's CPUs, 1 to 8; 0 runs
    their work in the training thread."""
    if cfg.data.dali_py_workers is not None:
        return cfg.data.dali_py_workers
    return min(MAX_DALI_PY_WORKERS, max(1, cpus_per_process(env) // 4))


class EpochStream:
    """This process's micro-batches of epoch ``first_epoch`` from step ``first_step`` on, then of every following
    epoch from its start, without end: ``stream[i]`` is (epoch, sample indices) of the i-th. A loader reads it
    ahead across an epoch's end, so the next epoch's first batches are decoded while this one's last train, with
    no stop-and-restart of the loader between epochs. Picklable (DALI's workers index it themselves)."""

    def __init__(self, planner, first_epoch: int, first_step: int):
        self.planner, self.first_epoch, self.first_step = planner, first_epoch, first_step
        self._cache: dict[int, list[tuple[int, ...]]] = {}

    def epoch(self, epoch: int) -> list[tuple[int, ...]]:
        """The micro-batches the stream serves of ``epoch`` (from ``first_step`` for the first)."""
        if epoch not in self._cache:
            start = self.first_step if epoch == self.first_epoch else 0
            self._cache = {e: v for e, v in self._cache.items() if e == epoch - 1}  # two epochs at most
            self._cache[epoch] = [mb for step in self.planner(epoch=epoch)[start:] for mb in step.micro_batches]
        return self._cache[epoch]

    def __getitem__(self, i: int) -> tuple[int, tuple[int, ...]]:
        first = self.epoch(self.first_epoch)
        if i < len(first):
            return self.first_epoch, first[i]
        i -= len(first)
        whole = len(self.epoch(self.first_epoch + 1))  # every epoch's plan has as many micro-batches
        epoch = self.first_epoch + 1 + i // whole
        return epoch, self.epoch(epoch)[i % whole]

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        i = 0
        while True:
            yield self[i]
            i += 1

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_cache": {}}  # a worker plans for itself


class PlannedLoader:
    """What every file-based loader shares: the split, this process's place, and the epoch's plan."""

    def __init__(self, images, cfg, env, train: bool):
        self.images, self.cfg, self.env, self.train = images, cfg, env, train
        self.device = env.device
        self.epoch, self.start_step = 0, 0
        self._bad = 0  # see bad_images: a loader may keep it as a CPU tensor, read only when asked for
        self.steps: list[Step] = []
        self._follows: tuple[int, int] | None = None  # (epoch, step) the loader's stream serves next, if at hand
        self.set_epoch(0)

    @property
    def bad_images(self) -> int:
        """Unreadable images skipped so far this epoch on this process (each replaced by the next readable one)."""
        return int(self._bad)

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    @property
    def class_names(self) -> list[str]:
        """Label i's class folder name."""
        return list(self.images.classes)

    @property
    def num_samples(self) -> int:
        """Images in the split (all processes)."""
        return len(self.images)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Fix the epoch's order from (seed, epoch); iteration starts at optimizer step ``start_step``."""
        self.epoch, self.start_step = epoch, start_step
        if self.train:
            self.steps = self.planner()(epoch=epoch)

    def planner(self) -> functools.partial:
        """``plan_epoch`` for this process, given the epoch: a small, picklable function of it (DALI's Python
        workers plan each epoch themselves)."""
        d, o, env = self.cfg.data, self.cfg.optim, self.env
        return functools.partial(
            plan_epoch, len(self.images), d.batch_size, env.rank, env.world_size, o.grad_accum_steps, self.cfg.run.seed
        )

    def train_batches(self) -> list[tuple[int, ...]]:
        """This process's micro-batches from ``start_step`` to the end of the epoch."""
        return [mb for step in self.steps[self.start_step :] for mb in step.micro_batches]

    def stream_continues(self) -> bool:
        """Whether the stream at hand serves (epoch, start_step) next: it served the epoch before in full and this
        epoch starts at its first step. Else the loader starts a new stream (a resume, an abandoned epoch, or an
        epoch out of order). Either way, until this epoch is served in full it serves no other."""
        follows, self._follows = self._follows == (self.epoch, self.start_step), None
        return follows

    def stream_served(self) -> None:
        """The epoch was served in full: its stream serves the next epoch from its first step next."""
        self._follows = (self.epoch + 1, 0)

    def close(self) -> None:
        """End the loader's helper processes and threads now (a later iter() starts new ones)."""
        self._follows = None


def shard_eval(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, ...]]:
    """Validation batches of process ``rank``: every world-th sample, no padding, nothing dropped.

    Shares differ by at most one sample, so processes may run different numbers of batches: evaluation
    must not use collectives per batch (the engine sums counts once at the end)."""
    share = list(range(rank, num_samples, world_size))
    return [tuple(share[i : i + batch_size]) for i in range(0, len(share), batch_size)]
