"""How the model is distributed, behind one small interface the engine calls (see Strategy)."""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn

from .env import DistEnv, init_distributed, shutdown


class Strategy(Protocol):
    """What the engine needs from DDP, FSDP2 or DeepSpeed; it knows nothing else about them."""

    model: nn.Module  # the wrapped model, for the training forward pass

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled under fp16)."""

    def step(self) -> bool:
        """Unscale, clip, optimizer step, update the loss scale; False when skipped for overflow."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally for a micro-batch that is not the last of its step."""

    def set_lr(self, lr: float) -> None: ...

    @property
    def loss_scale(self) -> float:
        """Current fp16 loss scale (1.0 when not scaling)."""

    def eval_model(self) -> nn.Module:
        """The plain module with full weights and synced BN statistics, for evaluation (no collectives in its
        forward). A collective itself: every process calls it."""

    def state_dict(self) -> dict:
        """Model, optimizer and scaler state for a checkpoint."""

    def load_state_dict(self, state: dict) -> None: ...

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's full state_dict (for export, evaluation and distillation teachers)."""


def build_strategy(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, cfg) -> Strategy:
    if name == "ddp":
        from .ddp import DDPStrategy

        return DDPStrategy(model, optimizer, env, cfg)
    raise NotImplementedError(
        f"strategy={name!r} is not available in this version; use strategy=ddp (FSDP2 and DeepSpeed: issue 5)"
    )


__all__ = ["DistEnv", "Strategy", "build_strategy", "init_distributed", "shutdown"]
