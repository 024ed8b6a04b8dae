"""The plan: which images each process trains on at each step, and how each image is augmented, as pure functions
of (seed, epoch, step, index). numpy only: DALI's Python workers import it without torch. Every loader follows it,
so a batch is the same whichever loader, process, worker or resume reads it.

**Steps.** An epoch is a sequence of optimizer steps. Step s takes the next G = batch x world x accumulation
indices of the epoch's permutation; process r takes every world-th of them (shares differ by at most one), and
micro-batch k of its share every accumulation-th of those. So micro-batch k of rank r holds the step's indices
k x world + r (mod world x accumulation): 1 process accumulating 2 micro-batches sees exactly the batches 2
processes see, and trains to the same weights. The last step of an epoch is shorter; when it would leave fewer
than two samples per micro-batch it is folded into the step before. Every process runs the same number of steps
(so collectives line up).

Besides the images a step fixes each micro-batch's loss weight ``len(micro) x world / step_size``, so that the
gradient summed over micro-batches and averaged over processes is exactly the mean over the step's samples; and
its mixup seed (seed, epoch, step, k x world + rank), keyed like the sharding, so that a resumed run mixes
identically and accumulation mixes exactly as more processes would.

**Evaluation** shards contiguously: rank r evaluates [floor(N r / W), floor(N (r + 1) / W)), DALI's reader shard.

**Augmentation** (the paper's section 2.1): each training image's crop, flip, colour jitter and PCA lighting are
drawn from a generator seeded by (seed, epoch, index) alone (``draw``); the DALI pipeline and the torch loader
both apply that draw.
"""

from __future__ import annotations

import itertools
import math
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
class StepPlan:
    """One optimizer step of this process, as planned: its micro-batches' sample indices."""

    micro_batches: tuple[tuple[int, ...], ...]  # this process's sample indices, one tuple per micro-batch
    step_size: int  # samples in this step over all processes
    world_size: int = 1
    mix_seeds: tuple[tuple[int, ...], ...] = ()  # one per micro-batch (see the module docstring)

    @property
    def samples(self) -> int:
        """This process's images in the step."""
        return sum(map(len, self.micro_batches))


class Step:
    """One optimizer step as a loader serves it: iterating it yields its ``MicroBatch``es, each loaded as the
    trainer asks for it (so accumulation holds one micro-batch's images at a time). Iterate it once."""

    def __init__(self, plan: StepPlan, batches: Iterator[tuple[Any, Any]]):
        self.plan, self._batches = plan, batches

    def __len__(self) -> int:
        return len(self.plan.micro_batches)

    @property
    def samples(self) -> int:
        return self.plan.samples

    def __iter__(self) -> Iterator[MicroBatch]:
        p, n = self.plan, len(self.plan.micro_batches)
        for k, indices in enumerate(p.micro_batches):
            images, labels = next(self._batches)
            yield MicroBatch(images, labels, len(indices) * p.world_size / p.step_size, p.mix_seeds[k], k == n - 1)


def serve(plans: list[StepPlan], batches: Iterator[tuple[Any, Any]]) -> Iterator[Step]:
    """The steps of ``plans``, their micro-batches taken in order from ``batches`` (images, labels)."""
    for plan in plans:
        yield Step(plan, batches)


def make_step(
    micro_batches: tuple[tuple[int, ...], ...], step_size: int, seed: int, epoch: int, index: int, rank: int, world: int
) -> StepPlan:
    """Step ``index`` of an epoch; micro-batch k of process ``rank`` gets the mixup seed of sample group
    k x world + rank."""
    seeds = tuple((seed, epoch, index, k * world + rank) for k in range(len(micro_batches)))
    return StepPlan(micro_batches, step_size, world, seeds)


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
) -> list[StepPlan]:
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


def train_size(epoch: int, size: int, min_size: int | None, start: int, end: int, step: int) -> int:
    """The training crop of ``epoch`` (from 0): ``size``, or under progressive resizing (data.progressive, FFCV's
    ResNet-50 recipe) ``min_size`` up to epoch ``start``, ``size`` from epoch ``end``, and in between the straight
    line from one to the other rounded down to a multiple of ``step`` (never below ``min_size``)."""
    if min_size is None or epoch >= end:
        return size
    if epoch <= start:
        return min_size
    exact = min_size + (size - min_size) * (epoch - start) / (end - start)
    return max(min_size, int(exact // step) * step)


def eval_shard(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the validation images process ``rank`` evaluates: contiguous, shares differ by at most one
    (DALI's reader shard, so both loaders and a pack evaluate the same images on each rank)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def shard_eval(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, ...]]:
    """Validation batches of process ``rank`` (its ``eval_shard``): no padding, nothing dropped.

    Processes may run different numbers of batches: evaluation must not use collectives per batch (the engine
    sums counts once at the end)."""
    lo, hi = eval_shard(num_samples, rank, world_size)
    return [tuple(range(i, min(hi, i + batch_size))) for i in range(lo, hi, batch_size)]


# AlexNet's PCA of ImageNet RGB pixels in [0, 1] (as in fb.resnet.torch and GluonCV).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def sample_resized_crop(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a random crop covering ``scale`` of the area with aspect ratio in ``ratio`` (log-uniform):
    torchvision's RandomResizedCrop algorithm, drawn from ``rng`` so a loader can seed it per image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: the largest center crop within the ratio range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def lighting_rgb(alpha: np.ndarray) -> np.ndarray:
    """PCA lighting noise: sum_k alpha_k lambda_k v_k, the RGB shift (in [0, 1] pixel units) of each image;
    ``alpha`` is (N, 3), drawn per image from N(0, std) (std 0.1 in the paper)."""
    return (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T


@dataclass(frozen=True)
class Draw:
    """One training image's augmentation."""

    box: tuple[int, int, int, int]  # the crop (x, y, width, height) in the decoded image's pixels
    flip: bool  # mirror horizontally
    twist: tuple[float, float, float]  # colour jitter's brightness, contrast and saturation factors
    alpha: tuple[float, float, float]  # PCA lighting's coefficients / std: N(0, 1), scaled by data.pca_lighting


def draw(
    seed: int, epoch: int, index: int, width: int, height: int, min_crop_area: float, hflip: bool, jitter: float
) -> Draw:
    """The augmentation of sample ``index`` in ``epoch`` for an image of width x height: its own generator's draws,
    always in this order (a resumed run repeats them)."""
    rng = np.random.default_rng(sample_seed(seed, epoch, index))
    box = sample_resized_crop(width, height, (min_crop_area, 1.0), (3 / 4, 4 / 3), rng)
    flip = bool(hflip and rng.random() < 0.5)
    twist = tuple(float(t) for t in rng.uniform(1 - jitter, 1 + jitter, size=3))
    alpha = tuple(float(a) for a in rng.standard_normal(3))
    return Draw(box, flip, twist, alpha)
