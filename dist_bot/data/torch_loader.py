"""The torchvision loader: PIL decoding in DataLoader workers, exact sharding, augmentation seeded per sample.

Each sample's augmentation is drawn from a generator seeded by (seed, epoch, index), so a batch is the same
whatever the number of workers, and a resumed run sees exactly the images it would have seen.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import os

import torch

from ..errors import BadImageError
from ..signals import end_with_trainer, helpers_shielded
from .augment import sample_seed
from .folder import ImageList, load_rgb
from .sharding import EpochStream, PlannedLoader, dataloader_workers, shard_eval
from .transforms import PCA_EIGVAL, PCA_EIGVEC, normalize, pca_lighting

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 4  # batches each DataLoader worker keeps ready


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 CHW image, label, ok, lighting noise) for a key (index, sample_seed); ``ok`` is 0 for a skipped
    bad image. An image that cannot be read (and is not to be skipped) gives its BadImageError instead, which
    ``collate`` hands to the trainer as the batch: raised in a worker, the DataLoader would re-raise it wrapped
    in the worker's traceback, and the one-line error would become twenty."""

    def __init__(self, images: ImageList, transform, skip_bad: bool):
        self.images, self.transform, self.skip_bad = images, transform, skip_bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        for attempt in range(len(self.images)):
            i = (index + attempt) % len(self.images)
            path, label = self.images.samples[i]
            try:
                img = load_rgb(path, self.images.read(i))
                break
            except BadImageError as e:
                if not self.skip_bad:
                    return e
                log.warning("skipping: %s", e)
        else:
            raise BadImageError(f"no readable image in {self.images.root}")
        with torch.random.fork_rng(devices=[]):  # the process-wide RNG stays untouched
            torch.manual_seed(sample_seed)
            x = self.transform(img)
            lighting = torch.randn(3)  # PCA lighting's alpha / std, applied on the device
        # A skipped bad image is replaced by the next readable one: counted, not silently used.
        return x, label, int(attempt == 0), lighting


def collate(samples: list):
    """A batch of samples, or the first BadImageError among them (raised by the trainer, see ImageDataset)."""
    bad = next((s for s in samples if isinstance(s, BadImageError)), None)
    return bad if bad is not None else torch.utils.data.default_collate(samples)


def init_worker(trainer_pid: int, worker_id: int) -> None:
    """First thing in each worker: it blocks SIGTERM and is a child of the forkserver, so torch's own ways of
    ending it when the trainer ends or fails do not work (see end_with_trainer)."""
    end_with_trainer(trainer_pid)


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "PIL.Image", __name__])  # workers start in ms
    # The forkserver, and so every worker forked from it, never sees Slurm's preemption signals: the step
    # and evaluation that finish a preempted run still get their batches (see dist_bot/signals.py).
    with helpers_shielded():
        multiprocessing.forkserver.ensure_running()
    return ctx


class TorchLoader(PlannedLoader):
    """Iterates (images, labels) on the device: float, normalized, in the model's memory format.

    Training: ``set_epoch(e, start_step)`` fixes the order; ``steps`` describes each optimizer step's
    micro-batches for the engine. Validation: exact shards, no padding (``samples`` = this process's images).
    """

    def __init__(self, images: ImageList, transform, cfg, env, train: bool):
        self.dataset = ImageDataset(images, transform, cfg.data.skip_bad_images)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.dtype = torch.float16 if cfg.precision == "fp16" else torch.float32  # as DALI emits: half the bytes
        self.workers = dataloader_workers(cfg, env)
        self.prefetch_batches = PREFETCH_FACTOR * self.workers  # batches made ahead of the training thread
        if self.workers > 0:  # start the forkserver now: its imports overlap the model's build, not the first step
            worker_context()
        # Constants on the device once: made per batch, each would be a copy from pageable memory that waits.
        d, dev = cfg.data, env.device
        self.pca = (PCA_EIGVAL.to(dev), PCA_EIGVEC.to(dev))
        self.mean = torch.tensor(d.mean, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(d.std, device=dev).view(1, 3, 1, 1)
        self._stream = None  # training: the DataLoader iterator over an EpochStream, kept across epochs
        self._val_stream = None  # validation: the DataLoader iterator of the pass under way
        super().__init__(images, cfg, env, train)

    def __len__(self) -> int:
        """Optimizer steps per epoch (training) or batches on this process (validation)."""
        if self.train:
            return len(self.steps)
        return len(self._eval_batches())

    @property
    def samples(self) -> int:
        """Images this process reads in one pass (validation: its exact share)."""
        return sum(len(b) for b in self._batches())

    def _eval_batches(self) -> list[tuple[int, ...]]:
        bs = self.cfg.data.val_batch_size or self.cfg.data.batch_size
        return shard_eval(len(self.images), bs, self.env.rank, self.env.world_size)

    def _batches(self) -> list[tuple[int, ...]]:
        return self.train_batches() if self.train else self._eval_batches()

    def _dataloader(self, batches) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            # Workers start from a clean forkserver, not by forking this process: a fork while gloo/NCCL or
            # OpenMP threads hold locks deadlocks the child now and then (seen here in evaluation).
            multiprocessing_context=worker_context() if self.workers > 0 else None,
            prefetch_factor=PREFETCH_FACTOR if self.workers > 0 else None,
            collate_fn=collate,
            worker_init_fn=functools.partial(init_worker, os.getpid()) if self.workers > 0 else None,
        )

    def close(self) -> None:
        """End the workers now. Call it when the run ends, however it ends: left to the garbage collector, a
        DataLoader kept alive by a reference cycle (an error's traceback, the trainer's) keeps its workers until
        the interpreter's exit, where only multiprocessing's terminate() ends them (see end_with_trainer)."""
        super().close()
        streams, self._stream, self._val_stream = (self._stream, self._val_stream), None, None
        for it in streams:
            if hasattr(it, "_shutdown_workers"):  # a multi-process DataLoader iterator
                it._shutdown_workers()

    def __iter__(self):
        """This epoch's batches. Training reads them from one DataLoader over an endless stream of epochs, kept
        from one epoch to the next, so its workers decode the next epoch's first batches while this one's last
        train; a new one starts only for a resume, an abandoned epoch or an epoch out of order. Set up here, at
        iter(), not at the first next() (which the engine calls inside a training step)."""
        if not self.train:
            self._val_stream = iter(self._dataloader(self._keyed(self._eval_batches())))
            return self._deliver(self._val_stream, None)
        if not self.stream_continues():
            self._stream = None  # the old DataLoader's workers end before new ones start
            stream = EpochStream(self.planner(), self.epoch, self.start_step)
            self._stream = iter(self._dataloader(KeyedBatches(stream, self.cfg.run.seed)))
        return self._deliver(self._stream, len(self.train_batches()))

    def _keyed(self, batches: list[tuple[int, ...]]) -> list[list[tuple[int, int]]]:
        seed, epoch = self.cfg.run.seed, self.epoch
        return [[(i, sample_seed(seed, epoch, i)) for i in b] for b in batches]

    def _deliver(self, batches, count: int | None):
        """``count`` batches of ``batches`` (all, for None), on the device. Nothing here waits for the device: the
        batch is pinned (copies are asynchronous), the bad-image count stays a CPU tensor until bad_images is
        read, and the constants are already on the device."""
        self._bad = torch.zeros((), dtype=torch.int64)
        lighting_std = self.cfg.data.pca_lighting
        if count == 0:
            self.stream_served()
        for k in itertools.count() if count is None else range(count):
            batch = next(batches, None)
            if batch is None:
                self._val_stream = None  # a validation pass's workers end now
                return
            if isinstance(batch, BadImageError):
                raise batch
            if count is not None and k == count - 1:  # the engine never asks past the last batch
                self.stream_served()
            images, labels, ok, lighting = batch
            self._bad += (ok == 0).sum()
            x = images.to(self.device, non_blocking=True).float().div_(255)
            if self.train and lighting_std > 0:
                x = pca_lighting(x, lighting.to(self.device, non_blocking=True) * lighting_std, *self.pca)
            x = normalize(x, self.mean, self.std).to(self.dtype)
            x = x.contiguous(memory_format=self.memory_format)
            yield x, labels.to(self.device, non_blocking=True)


class KeyedBatches:
    """A DataLoader's batch sampler over an EpochStream: each sample's key is (index, its augmentation seed)."""

    def __init__(self, stream: EpochStream, seed: int):
        self.stream, self.seed = stream, seed

    def __iter__(self):
        for epoch, indices in self.stream:
            yield [(i, sample_seed(self.seed, epoch, i)) for i in indices]
