"""Exact sharding: every sample once per epoch across all processes, in an order fixed by (seed, epoch).

An epoch is a sequence of optimizer steps. Step s takes the next G = batch x world x accumulation indices
of the epoch's permutation; process r takes every world-th of them (shares differ by at most one), and
micro-batch k of its share every accumulation-th of those. So micro-batch k of rank r holds the step's
indices k x world + r (mod world x accumulation): 1 process accumulating 2 micro-batches sees exactly the
batches 2 processes see, and trains to the same weights. The last step of an epoch is shorter; when it
would leave fewer than two samples per micro-batch it is folded into the step before. Every process runs
the same number of steps (so collectives line up) and the engine weights each micro-batch's mean loss by
``len(micro) x world / step_size`` so that the gradient is exactly the mean over the step's samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

MIN_PER_MICRO_BATCH = 2  # BatchNorm needs more than one value per channel in training


@dataclass(frozen=True)
class Step:
    micro_batches: tuple[tuple[int, ...], ...]  # this process's sample indices, one tuple per micro-batch
    step_size: int  # samples in this step over all processes


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
    for lo, hi in itertools.pairwise(bounds):
        share = order[lo:hi][rank::world_size]
        n = min(accum, max(1, len(share) // MIN_PER_MICRO_BATCH))
        steps.append(Step(tuple(tuple(int(i) for i in share[k::n]) for k in range(n)), hi - lo))
    return steps


class PlannedLoader:
    """What every file-based loader shares: the split, this process's place, and the epoch's plan."""

    def __init__(self, images, cfg, env, train: bool):
        self.images, self.cfg, self.env, self.train = images, cfg, env, train
        self.device = env.device
        self.epoch, self.start_step = 0, 0
        self.bad_images = 0  # unreadable images skipped so far this epoch, on this process
        self.steps: list[Step] = []
        self.set_epoch(0)

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    @property
    def num_samples(self) -> int:
        """Images in the split (all processes)."""
        return len(self.images)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Fix the epoch's order from (seed, epoch); iteration starts at optimizer step ``start_step``."""
        self.epoch, self.start_step = epoch, start_step
        if self.train:
            d, o, env = self.cfg.data, self.cfg.optim, self.env
            self.steps = plan_epoch(
                len(self.images), d.batch_size, env.rank, env.world_size, o.grad_accum_steps, self.cfg.run.seed, epoch
            )

    def train_batches(self) -> list[tuple[int, ...]]:
        """This process's micro-batches from ``start_step`` to the end of the epoch."""
        return [mb for step in self.steps[self.start_step :] for mb in step.micro_batches]


def shard_eval(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, ...]]:
    """Validation batches of process ``rank``: every world-th sample, no padding, nothing dropped.

    Shares differ by at most one sample, so processes may run different numbers of batches: evaluation
    must not use collectives per batch (the engine sums counts once at the end)."""
    share = list(range(rank, num_samples, world_size))
    return [tuple(share[i : i + batch_size]) for i in range(0, len(share), batch_size)]
