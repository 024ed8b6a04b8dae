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
both apply that draw. So are today's additions, drawn after those (turning one on changes none of the paper's): the
resize's interpolation (data.interpolation=random), the automatic augmentation's operations and magnitudes
(data.auto_augment: RandAugment, TrivialAugment, AutoAugment, with DALI's auto_aug suites below) and the random
erasing box (data.random_erasing), each only when it is on.

**Repeated augmentation** (data.repeated_aug = k, Hoffer et al. 2020, DeiT's and "ResNet strikes back"'s sampler):
the epoch's permutation with each image k times in a row, cut to the epoch's length, so that an epoch trains N/k
images k times each, the copies side by side, and so on k different processes (the shard takes every world-th).
Copy c of image i is planned as the index ``i + c x N``: loaders read image ``index % N`` and draw its
augmentation from the planned index, so each copy is augmented differently, and with k = 1 nothing changes.
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


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool, repeats: int = 1) -> np.ndarray:
    """The epoch's sample indices in order; with ``repeats`` k > 1 each image k times in a row, copy c planned as
    index + c x num_samples, cut to num_samples (see the module docstring)."""
    if not shuffle:
        return np.arange(num_samples)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    if repeats == 1:
        return order
    copies = np.arange(num_samples) % repeats  # position p holds copy p % k of image order[p // k]
    return np.repeat(order, repeats)[:num_samples] + copies * num_samples


def plan_epoch(
    num_samples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    accum: int,
    seed: int,
    epoch: int,
    shuffle=True,
    repeats: int = 1,
) -> list[StepPlan]:
    """The steps of one training epoch for process ``rank`` (``repeats``: data.repeated_aug)."""
    per_step = batch_size * world_size * accum
    order = epoch_order(num_samples, seed, epoch, shuffle, repeats)
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


# -- the automatic augmentations (data.auto_augment) ------------------------------------------------------------
# DALI's nvidia.dali.auto_aug suites (2.4, use_shape=True), written out so that the torch loader applies the same
# operations without DALI; a test checks them against DALI's own. An operation: (name, magnitude at bin 0, at the
# last bin, randomly negated); its parameter is the magnitude, of a linspace over the bins in float32 as DALI's, except
# brightness, contrast, color and sharpness in RandAugment and TrivialAugment, whose enhancement factor is 1 + it
# (ENHANCE_SHIFT). Translations are fractions of the width (x) or height (y); posterize keeps that many bits (at
# least 1); solarize inverts pixels at or above the threshold; solarize_add adds it to pixels below 128.
AugOp = tuple[str, float, float, bool]
_NONE: tuple[float, float, bool] = (0.0, 0.0, False)  # an operation without magnitude
AUGMENT_SUITES: dict[str, tuple[AugOp, ...]] = {
    "rand": (  # RandAugment (Cubuk et al. 2020): data.auto_augment_ops operations at bin data.auto_augment_magnitude
        ("translate_x", 0.0, 100 / 224, True),
        ("translate_y", 0.0, 100 / 224, True),
        ("shear_x", 0.0, 0.3, True),
        ("shear_y", 0.0, 0.3, True),
        ("rotate", 0.0, 30.0, True),
        ("brightness", 0.0, 0.9, True),
        ("contrast", 0.0, 0.9, True),
        ("color", 0.0, 0.9, True),
        ("sharpness", 0.0, 0.9, True),
        ("posterize", 8.0, 4.0, False),
        ("solarize", 256.0, 0.0, False),
        ("equalize", *_NONE),
        ("auto_contrast", *_NONE),
        ("identity", *_NONE),
    ),
    "trivial": (  # TrivialAugment Wide (Muller & Hutter 2021): one operation at a uniformly drawn bin
        ("translate_x", 0.0, 1.0, True),
        ("translate_y", 0.0, 1.0, True),
        ("shear_x", 0.0, 0.99, True),
        ("shear_y", 0.0, 0.99, True),
        ("rotate", 0.0, 135.0, True),
        ("brightness", 0.01, 0.99, True),
        ("contrast", 0.01, 0.99, True),
        ("color", 0.01, 0.99, True),
        ("sharpness", 0.01, 0.99, True),
        ("posterize", 8.0, 2.0, False),
        ("solarize", 256.0, 0.0, False),
        ("equalize", *_NONE),
        ("auto_contrast", *_NONE),
        ("identity", *_NONE),
    ),
    "auto": (  # AutoAugment's ImageNet policy (Cubuk et al. 2019): the operations its sub-policies use
        ("auto_contrast", *_NONE),
        ("color", 0.1, 1.9, False),
        ("equalize", *_NONE),
        ("invert", *_NONE),
        ("posterize", 0.0, 4.0, False),
        ("rotate", 0.0, 30.0, True),
        ("shear_x", 0.0, 0.3, True),
        ("shear_y", 0.0, 0.3, True),
        ("solarize", 0.0, 256.0, False),
        ("solarize_add", 0.0, 110.0, False),
        ("translate_y", 0.0, 1.0, True),
        ("identity", *_NONE),
    ),
}
AUGMENT_BINS = {"rand": 31, "trivial": 31, "auto": 11}
ENHANCE_SHIFT = {"rand": 1.0, "trivial": 1.0, "auto": 0.0}
# AutoAugment's ImageNet sub-policies: (operation, probability, magnitude bin), applied in order
AUTO_AUGMENT_POLICY: tuple[tuple[tuple[str, float, int], ...], ...] = (
    (("equalize", 0.8, 0), ("shear_y", 0.8, 4)),
    (("color", 0.4, 9), ("equalize", 0.6, 0)),
    (("color", 0.4, 1), ("rotate", 0.6, 8)),
    (("solarize", 0.8, 3), ("equalize", 0.4, 0)),
    (("solarize", 0.4, 2), ("solarize", 0.6, 2)),
    (("color", 0.2, 0), ("equalize", 0.8, 0)),
    (("equalize", 0.4, 0), ("solarize_add", 0.8, 3)),
    (("shear_x", 0.2, 9), ("rotate", 0.6, 8)),
    (("color", 0.6, 1), ("equalize", 1.0, 0)),
    (("invert", 0.4, 0), ("rotate", 0.6, 0)),
    (("equalize", 1.0, 0), ("shear_y", 0.6, 3)),
    (("color", 0.4, 7), ("equalize", 0.6, 0)),
    (("posterize", 0.4, 6), ("auto_contrast", 0.4, 0)),
    (("solarize", 0.6, 8), ("color", 0.6, 9)),
    (("solarize", 0.2, 4), ("rotate", 0.8, 9)),
    (("rotate", 1.0, 7), ("translate_y", 0.8, 9)),
    (("solarize", 0.8, 4),),
    (("shear_y", 0.8, 0), ("color", 0.6, 4)),
    (("color", 1.0, 0), ("rotate", 0.6, 2)),
    (("equalize", 0.8, 0),),
    (("equalize", 1.0, 0), ("auto_contrast", 0.6, 0)),
    (("shear_y", 0.4, 7), ("solarize_add", 0.6, 7)),
    (("posterize", 0.8, 2), ("solarize", 0.6, 10)),
    (("solarize", 0.6, 8), ("equalize", 0.6, 0)),
    (("color", 0.8, 6), ("rotate", 0.4, 5)),
)


def augment_slots(settings: Augmentation) -> int:
    """Operations each image gets under data.auto_augment (identity where one is not applied)."""
    return {"none": 0, "rand": settings.aa_ops, "trivial": 1, "auto": 2}[settings.auto_augment]


def augment_param(suite: str, op: int, bin: int, sign: int) -> tuple[str, float]:
    """(name, parameter) of operation ``op`` of ``suite`` at magnitude ``bin``, negated when ``sign`` is 1 and the
    operation is randomly negated; the enhancement operations' parameter is their factor."""
    name, lo, hi, signed = AUGMENT_SUITES[suite][op]
    magnitude = float(np.linspace(lo, hi, AUGMENT_BINS[suite], dtype=np.float32)[bin])
    if signed and sign:
        magnitude = -magnitude
    if name in ("brightness", "contrast", "color", "sharpness"):
        magnitude += ENHANCE_SHIFT[suite]
    return name, magnitude


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation's settings (data.*): what ``draw`` needs besides the image and its key."""

    min_crop_area: float = 0.08
    hflip: bool = True
    jitter: float = 0.4
    interpolation: str = "bilinear"  # bilinear | bicubic | random (one of the two per image)
    auto_augment: str = "none"  # none | rand | trivial | auto
    aa_ops: int = 2  # RandAugment's operations per image
    aa_magnitude: int = 9  # RandAugment's magnitude bin (of 31)
    random_erasing: float = 0.0  # probability


@dataclass(frozen=True)
class Draw:
    """One training image's augmentation."""

    box: tuple[int, int, int, int]  # the crop (x, y, width, height) in the decoded image's pixels
    flip: bool  # mirror horizontally
    twist: tuple[float, float, float]  # colour jitter's brightness, contrast and saturation factors
    alpha: tuple[float, float, float]  # PCA lighting's coefficients / std: N(0, 1), scaled by data.pca_lighting
    bicubic: bool = False  # resize with bicubic, else bilinear, interpolation
    ops: tuple[tuple[int, int, int], ...] = ()  # auto_augment: (operation, magnitude bin, sign) per slot
    erase: tuple[int, int, int, int] = (0, 0, 0, 0)  # random erasing's (x, y, width, height) in the output; 0: none


def draw_ops(settings: Augmentation, rng: np.random.Generator) -> tuple[tuple[int, int, int], ...]:
    """The automatic augmentation's operations for one image, as DALI's rand_augment, trivial_augment_wide and
    auto_augment draw them: RandAugment n operations with replacement at one bin, TrivialAugment one at a uniform
    bin, AutoAugment a uniform sub-policy whose operations each apply with their probability (identity if not);
    every operation with a random sign."""
    suite = settings.auto_augment
    names = [op[0] for op in AUGMENT_SUITES[suite]]
    n = augment_slots(settings)
    signs = rng.integers(0, 2, size=n)
    if suite == "rand":
        ops = rng.integers(0, len(names), size=n)
        return tuple((int(o), settings.aa_magnitude, int(g)) for o, g in zip(ops, signs, strict=True))
    if suite == "trivial":
        return ((int(rng.integers(0, len(names))), int(rng.integers(0, AUGMENT_BINS[suite])), int(signs[0])),)
    policy = AUTO_AUGMENT_POLICY[int(rng.integers(0, len(AUTO_AUGMENT_POLICY)))]
    run = rng.random(n)
    slots = []
    for k in range(n):
        name, p, bin = policy[k] if k < len(policy) else ("identity", 0.0, 0)
        slots.append((names.index(name), bin, int(signs[k])) if run[k] < p else (names.index("identity"), 0, 0))
    return tuple(slots)


def erase_box(size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random erasing's rectangle in a size x size image (torchvision's RandomErasing: 2-33 % of the area, aspect
    0.3-3.3 log-uniform, ten tries), or (0, 0, 0, 0) when no try fits."""
    area, log_ratio = size * size, (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target = area * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < h < size and 0 < w < size:
            return int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)), w, h
    return 0, 0, 0, 0


def draw(seed: int, epoch: int, index: int, width: int, height: int, settings: Augmentation, size: int) -> Draw:
    """The augmentation of planned sample ``index`` in ``epoch`` for an image of width x height, resized to
    ``size``: its own generator's draws, always in this order (a resumed run repeats them); those after the paper's
    only when their setting is on, so that turning one on changes none of the paper's."""
    rng = np.random.default_rng(sample_seed(seed, epoch, index))
    box = sample_resized_crop(width, height, (settings.min_crop_area, 1.0), (3 / 4, 4 / 3), rng)
    flip = bool(settings.hflip and rng.random() < 0.5)
    twist = tuple(float(t) for t in rng.uniform(1 - settings.jitter, 1 + settings.jitter, size=3))
    alpha = tuple(float(a) for a in rng.standard_normal(3))
    bicubic = settings.interpolation == "bicubic" or (settings.interpolation == "random" and rng.random() < 0.5)
    ops = draw_ops(settings, rng) if settings.auto_augment != "none" else ()
    erase = (0, 0, 0, 0)
    if settings.random_erasing > 0 and rng.random() < settings.random_erasing:
        erase = erase_box(size, rng)
    return Draw(box, flip, twist, alpha, bicubic, ops, erase)
