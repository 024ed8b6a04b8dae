"""DistributedDataParallel: every process holds the whole model; gradients are averaged in backward."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import read_file, read_model, write_file
from ..recipe.precision import make_grad_scaler
from .env import DistEnv


class DDPStrategy:
    def __init__(self, model: nn.Module, make_optimizer, env: DistEnv, cfg):
        self.module, self.optimizer, self.env = model, make_optimizer(model), env
        self.grad_clip_norm = cfg.optim.grad_clip_norm
        self.scaler = make_grad_scaler(cfg.precision, env.device, cfg.loss_scale)
        if env.distributed:
            self.model = DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
        else:
            self.model = model

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)  # skipped by the scaler when a gradient is inf/NaN
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # Gradients were all-reduced before the scaler looked at them, so every rank decides the same.
        return scale_before is None or self.scaler.get_scale() >= scale_before

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if isinstance(self.model, DistributedDataParallel) else contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def eval_model(self) -> nn.Module:
        """The bare module, with BN running statistics averaged over processes (a collective: call it on
        every process). DDP's own forward would broadcast buffers per batch, which hangs when ranks run
        different numbers of validation batches (exact evaluation shards unevenly); and each rank's last
        training forward updated its statistics from its own images only."""
        if self.env.distributed:
            for buf in self.module.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf.div_(self.env.world_size)
        return self.module

    def save(self, folder: Path) -> None:
        if self.env.is_main:  # every rank holds the same state
            write_file(self.module.state_dict(), folder / "model.pt")
            state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
            write_file(state, folder / "train_state.pt")

    def load(self, folder: Path) -> None:
        self.module.load_state_dict(read_model(folder, self.env.device))
        state = read_file(folder / "train_state.pt", self.env.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
