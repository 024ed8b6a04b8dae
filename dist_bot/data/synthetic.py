"""Synthetic data for throughput runs: random batches made once on the device, no decoding at all.

The same ``Loader`` contract as the real loaders (loader.py), so `dist-bot train ... data.loader=synthetic`
measures the model, optimizer and communication alone. 1,000 classes unless model.num_classes says otherwise.
"""

from __future__ import annotations

import itertools

import torch

from .loader import eval_batch_size
from .plan import make_step, serve

TRAIN_IMAGES_PER_PROCESS = 1024  # steps per epoch = this / batch ...
MIN_TRAIN_STEPS = 64  # ... but at least this many, whatever the batch: enough for a throughput run
VAL_IMAGES_PER_PROCESS = 64


class SyntheticLoader:
    def __init__(self, cfg, env, train: bool, num_classes: int):
        self.cfg, self.env, self.train = cfg, env, train
        self.num_classes = num_classes
        self.class_names = [f"class_{i}" for i in range(num_classes)]  # random labels: no names to give
        self.class_descriptions = None
        d = cfg.data
        self.batch = d.batch_size if train else eval_batch_size(d)
        g = torch.Generator().manual_seed(cfg.run.seed + env.rank)
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        dtype = torch.float16 if cfg.precision == "fp16" else torch.float32  # as the real loaders emit
        self.images = torch.randn(self.batch, 3, d.image_size, d.image_size, generator=g).to(
            env.device, dtype, memory_format=fmt
        )
        self.labels = torch.randint(0, num_classes, (self.batch,), generator=g).to(env.device)
        if train:
            n_steps = max(MIN_TRAIN_STEPS, TRAIN_IMAGES_PER_PROCESS // self.batch)
        else:
            n_steps = max(1, VAL_IMAGES_PER_PROCESS // self.batch)
        accum = cfg.optim.grad_accum_steps if train else 1
        size = self.batch * env.world_size * accum
        self._plan = (tuple(tuple(range(self.batch)) for _ in range(accum)), size, n_steps)
        self.set_epoch(0)
        self.bad_images = 0
        self.prefetch_batches = 0  # one batch, made once

    @property
    def num_samples(self) -> int:
        return len(self.steps) * self.batch * self.env.world_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        micro, size, n_steps = self._plan
        seed, rank, world = self.cfg.run.seed, self.env.rank, self.env.world_size
        self.steps = [make_step(micro, size, seed, epoch, i, rank, world) for i in range(n_steps)]
        self.start_step = start_step

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def samples(self) -> int:
        return len(self.steps) * self.batch

    def close(self) -> None:
        """Nothing to end: no helper processes."""

    def __iter__(self):
        if not self.train:
            return iter([(self.images, self.labels)] * len(self.steps))
        return serve(self.steps[self.start_step :], itertools.repeat((self.images, self.labels)))


def synthetic_loaders(cfg, env):
    num_classes = cfg.model.num_classes or 1000
    return SyntheticLoader(cfg, env, True, num_classes), SyntheticLoader(cfg, env, False, num_classes)
