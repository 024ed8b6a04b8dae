"""Pieces the strategies share: BN statistics averaging, and torch-optimizer stepping with a GradScaler."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..recipe.precision import make_grad_scaler
from .env import DistEnv


def average_buffers(module: nn.Module, env: DistEnv) -> None:
    """Average floating buffers (BN running statistics) over processes, in place; a collective."""
    if env.distributed:
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(env.world_size)


class ScaledOptimizerSteps:
    """backward/step/set_lr/loss_scale for strategies that drive a torch optimizer through a GradScaler
    (DDP, FSDP2). Subclasses set ``self.model`` and call ``init_steps`` with their optimizer."""

    model: nn.Module

    def init_steps(self, optimizer: torch.optim.Optimizer, env: DistEnv, cfg) -> None:
        self.optimizer = optimizer
        self.grad_clip_norm = cfg.optim.grad_clip_norm
        self.scaler = make_grad_scaler(cfg.precision, env.device, cfg.loss_scale)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)  # over all ranks' shards
        self.scaler.step(self.optimizer)  # skipped by the scaler when a gradient is inf/NaN
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # Gradients were reduced over ranks before the scaler looked at them: every rank decides the same.
        return scale_before is None or self.scaler.get_scale() >= scale_before

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
