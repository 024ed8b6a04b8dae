"""DistributedDataParallel: every process holds the whole model; gradients are averaged in backward."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    MODEL_FILE,
    TRAIN_STATE_FILE,
    check_optimizer_state,
    check_state_dict,
    read_file,
    read_model,
    write_file,
)
from ..errors import CheckpointError
from .env import DistEnv, average_buffers
from .strategy import ScaledOptimizer, device_lr


class DDPStrategy(ScaledOptimizer):
    def __init__(self, model: nn.Module, make_optimizer, env: DistEnv, cfg):
        self.module, self.env = model, env
        self.init_steps(make_optimizer(model), env, cfg)
        if dist.is_initialized():  # also a group of one (torchrun --nproc_per_node=1): the same code as on many
            self.model = DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
        else:
            self.model = model

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if isinstance(self.model, DistributedDataParallel) else contextlib.nullcontext()

    def eval_model(self, sync_buffers: bool = True) -> nn.Module:
        """The bare module, with BN running statistics averaged over processes (a collective: call it on
        every process). DDP's own forward would broadcast buffers per batch, which hangs when ranks run
        different numbers of validation batches (exact evaluation shards unevenly); and each rank's last
        training forward updated its statistics from its own images only."""
        if sync_buffers:
            average_buffers(self.module, self.env)
        return self.module

    def ema_source(self) -> tuple[nn.Module, dict[str, int]]:
        return self.module, {}  # a full EMA on every rank, replicated like the model

    def save(self, folder: Path) -> None:
        if self.env.is_main:  # every rank holds the same state
            write_file(self.module.state_dict(), folder / MODEL_FILE)
            state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
            write_file(state, folder / TRAIN_STATE_FILE)

    def read(self, folder: Path) -> dict:
        """The checkpoint's model, optimizer and loss-scaler state, read and checked; nothing applied yet."""
        model = read_model(folder, self.env.device)
        check_state_dict(model, self.module.state_dict(), folder / MODEL_FILE)
        state = read_file(folder / TRAIN_STATE_FILE, self.env.device)
        if not isinstance(state, dict) or not {"optimizer", "scaler"} <= state.keys():
            raise CheckpointError(f"{folder / 'train_state.pt'} is not a dist_bot training state")
        check_optimizer_state(state["optimizer"], self.optimizer, folder / TRAIN_STATE_FILE)
        return state | {"model": model}

    def apply(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        device_lr(self.optimizer)  # the loaded lr (a float in checkpoints before it was a tensor) back on the device
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
