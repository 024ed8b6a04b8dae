"""How the model is distributed, behind one small interface the engine calls (see Strategy)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import UserError
from .env import DistEnv, init_distributed, shutdown


class Strategy(Protocol):
    """What the engine needs from DDP, FSDP2 or DeepSpeed; it knows nothing else about them."""

    model: nn.Module  # the wrapped model, for the training forward pass

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled under fp16)."""

    def step(self) -> torch.Tensor:
        """Unscale, clip, optimizer step, update the loss scale. Returns a 0-dim bool tensor, False when the step
        was skipped (an inf/NaN gradient, fp16 overflow or not: no weight changes, on any rank); on the device
        where the strategy can decide there, so nothing waits for it."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally for a micro-batch that is not the last of its step."""

    def set_lr(self, lr: float) -> None: ...

    @property
    def loss_scale(self) -> float:
        """Current fp16 loss scale (1.0 when not scaling); reading it waits for the device."""

    @property
    def loss_scale_async(self) -> torch.Tensor | float:
        """The same without waiting: a 0-dim device tensor (or a float where the strategy keeps it on the host)."""

    def eval_model(self, sync_buffers: bool = True) -> nn.Module:
        """The plain module with full weights and BN statistics averaged over processes (unless ``sync_buffers`` is
        False: they already are), for evaluation (no collectives in its forward). A collective: every process
        calls it."""

    def ema_source(self) -> tuple[nn.Module, dict[str, int]]:
        """For the weights' EMA (recipe/ema.py): the module whose state_dict is model.pt's (under FSDP2 its
        parameters are DTensor shards), and the rank that averages each parameter named here; a parameter not
        named is averaged on every rank (its replica, or its local shard)."""

    def save(self, folder: Path) -> None:
        """Collective: write model.pt (full weights, one file) and the training state into ``folder``."""

    def read(self, folder: Path) -> Any:
        """Collective: this process's part of a checkpoint (model, optimizer, loss scaler), read completely and
        checked, NOT applied; raises CheckpointError when a file is missing, damaged or does not fit."""

    def apply(self, state: Any) -> None:
        """Restore what ``read`` returned (on every process, after all of them read theirs)."""


def build_strategy(
    name: str, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv, cfg
) -> Strategy:
    """Wrap ``model`` for ``name`` and build its optimizer (after sharding, for the strategies that shard)."""
    if name == "ddp":
        from .ddp import DDPStrategy

        return DDPStrategy(model, make_optimizer, env, cfg)
    if name == "fsdp":
        from .fsdp import FSDPStrategy

        return FSDPStrategy(model, make_optimizer, env, cfg)
    if name == "deepspeed":
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(model, make_optimizer, env, cfg)
    raise UserError(f"unknown strategy={name!r}: use ddp, fsdp or deepspeed")


__all__ = ["DistEnv", "Strategy", "build_strategy", "init_distributed", "shutdown"]
