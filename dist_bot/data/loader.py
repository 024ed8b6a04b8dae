"""What every loader is to the trainer (``Loader``), which one a config gets (``make_loaders``), and what the file
loaders share (``PlannedLoader``: the split, this process's place in the plan, and the worker policy that sizes
their helpers from this process's CPUs). No torch here: DALI's Python workers import it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

from ..errors import DataError
from .plan import Augmentation, Step, StepPlan, plan_epoch, shard_eval, train_size
from .source import open_dataset

log = logging.getLogger(__name__)


class Loader(Protocol):
    """The loader contract the trainer relies on, met by the torch, DALI and synthetic loaders.

    Training: ``set_epoch(e, start_step)`` fixes the epoch's plan from (seed, epoch) and resumes inside it;
    iterating yields the ``Step``s from ``start_step`` to the epoch's end, each yielding its micro-batches
    (images on the device, float, normalized, in the model's memory format). ``len()`` is optimizer steps per
    epoch, the same on every process. Evaluation: iterating yields (images, labels) batches of this process's
    exact shard (``samples`` images, no padding); ``len()`` is its number of batches.
    """

    train: bool
    num_classes: int
    class_names: list[str]
    class_descriptions: dict[str, str] | None  # class name -> description, where the data has them (ImageNet's)
    num_samples: int  # images in the split, over all processes
    samples: int  # images this process reads in one pass
    prefetch_batches: int  # batches made ahead of the training thread
    bad_images: int  # unreadable images skipped so far this epoch on this process

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Step] | Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...


def make_loaders(cfg, env) -> tuple[Loader, Loader]:
    """(train, val) loaders of ``data.loader`` over ``data.path`` (a folder or a pack)."""
    loader = cfg.data.loader
    if loader == "auto":
        from .dali_loader import dali_available

        loader = "dali" if dali_available() else "torch"
    if loader == "synthetic":
        from .synthetic import synthetic_loaders

        return synthetic_loaders(cfg, env)
    train_list, val_list = open_dataset(cfg.data.path)  # a folder or a pack
    if loader == "dali":
        from .dali_loader import DaliLoader, dali_available

        if not dali_available():
            raise DataError(
                "data.loader=dali but DALI is not installed: pip install 'dist-bot[dali]', or data.loader=torch"
            )
        return DaliLoader(train_list, cfg, env, train=True), DaliLoader(val_list, cfg, env, train=False)
    # imported here, not above: DALI's Python workers import this package and should not pay for torch
    from .torch_loader import TorchLoader

    return TorchLoader(train_list, cfg, env, train=True), TorchLoader(val_list, cfg, env, train=False)


def train_sizes(cfg) -> functools.partial:
    """epoch -> the training crop's size (``plan.train_size`` of data.image_size and data.progressive); picklable, for
    the loaders' workers."""
    d, p = cfg.data, cfg.data.progressive
    end = cfg.schedule.epochs - 1 if p.end_epoch is None else p.end_epoch
    ramp = {"min_size": p.min_size, "start": p.start_epoch, "end": end, "step": p.step}
    return functools.partial(train_size, size=d.image_size, **ramp)


def train_augmentation(data) -> Augmentation:
    """The training augmentation's settings that ``plan.draw`` reads, from data.*."""
    return Augmentation(
        min_crop_area=data.min_crop_area,
        hflip=data.hflip,
        jitter=data.color_jitter,
        interpolation=data.interpolation,
        auto_augment=data.auto_augment,
        aa_ops=data.auto_augment_ops,
        aa_magnitude=data.auto_augment_magnitude,
        random_erasing=data.random_erasing,
    )


def val_size(data) -> int:
    """Validation's center crop: data.val_image_size, or (None) data.image_size."""
    return data.val_image_size or data.image_size


def eval_batch_size(data) -> int:
    """Images per process per validation batch: data.val_batch_size, or (None) data.batch_size."""
    return data.val_batch_size or data.batch_size


def micro_batches(loader: Loader) -> Iterator[tuple[Any, Any]]:
    """(images, labels) of each micro-batch a training loader serves this epoch, step after step: what the data
    benchmark and the tests read."""
    for step in loader:
        for micro in step:
            yield micro.images, micro.labels


def over_epochs(loader: Loader, first_epoch: int = 0) -> Iterator[tuple[Any, Any]]:
    """A training loader's micro-batches (images, labels), epoch after epoch from ``first_epoch``, for as long as
    asked: what the benchmarks and the doctor time (a small dataset's epoch may be shorter than their runs)."""
    for epoch in itertools.count(first_epoch):
        loader.set_epoch(epoch)
        yield from micro_batches(loader)


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


class PlannedLoader:
    """What every file-based loader shares: the split, this process's place, and the epoch's plan."""

    def __init__(self, images, cfg, env, train: bool):
        self.images, self.cfg, self.env, self.train = images, cfg, env, train
        self.device = env.device
        self.epoch, self.start_step = 0, 0
        self._bad = 0  # see bad_images: a loader may keep it as a CPU tensor, read only when asked for
        self.steps: list[StepPlan] = []
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
    def class_descriptions(self) -> dict[str, str] | None:
        return self.images.class_descriptions

    @property
    def num_samples(self) -> int:
        """Images in the split (all processes)."""
        return len(self.images)

    def __len__(self) -> int:
        """Optimizer steps per epoch (training) or batches on this process (validation)."""
        return len(self.steps) if self.train else len(self.eval_batches())

    @property
    def samples(self) -> int:
        """Images this process reads in one pass (validation: its exact share)."""
        return sum(map(len, self.train_batches() if self.train else self.eval_batches()))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Fix the epoch's order from (seed, epoch); iteration starts at optimizer step ``start_step``."""
        self.epoch, self.start_step = epoch, start_step
        if self.train:
            self.steps = self.planner()(epoch=epoch)
            if self.cfg.data.progressive.min_size is not None:  # numbered as the progress lines are, from 1
                log.info(
                    "epoch %d/%d trains on %d px crops (data.progressive)",
                    epoch + 1,
                    self.cfg.schedule.epochs,
                    train_sizes(self.cfg)(epoch),
                )

    def planner(self) -> functools.partial:
        """``plan_epoch`` for this process, given the epoch: a small, picklable function of it (DALI's Python
        workers plan each epoch themselves)."""
        d, o, env = self.cfg.data, self.cfg.optim, self.env
        return functools.partial(
            plan_epoch,
            len(self.images),
            d.batch_size,
            env.rank,
            env.world_size,
            o.grad_accum_steps,
            self.cfg.run.seed,
            repeats=d.repeated_aug,
        )

    @property
    def val_batch_size(self) -> int:
        return eval_batch_size(self.cfg.data)

    def eval_batches(self) -> list[tuple[int, ...]]:
        """This process's validation batches (its exact shard)."""
        return shard_eval(len(self.images), self.val_batch_size, self.env.rank, self.env.world_size)

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
