"""Low-precision training (3.2): fp16 with fp32 master weights and dynamic loss scaling, bf16, or fp32.

fp16: the model keeps fp32 weights, autocast runs matmuls/convs in fp16, and the loss is multiplied by a
scale S before backward so small gradients do not flush to zero. An overflow (inf/NaN gradient) skips the
step and halves S; ``growth_interval`` clean steps double it. torch.amp.GradScaler implements exactly this
(on CPU too), so it is used rather than rewritten; this module adds the collapse guard it lacks.
bf16 has fp32's exponent range: no scaling needed.
"""

from __future__ import annotations

import contextlib

import torch

from ..config import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LossScaleCollapse(UserError, RuntimeError):
    """fp16 loss scale stuck at its minimum: the run would only skip steps or train on garbage."""


def autocast(precision: str, device: torch.device):
    """The forward-pass context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def make_grad_scaler(precision: str, device: torch.device, cfg) -> torch.amp.GradScaler:
    """A GradScaler configured from ``loss_scale.*``; disabled (a pass-through) unless precision is fp16."""
    return torch.amp.GradScaler(
        device.type,
        init_scale=cfg.init_scale,
        growth_factor=2.0,
        backoff_factor=cfg.backoff_factor,
        growth_interval=cfg.growth_interval,
        enabled=precision == "fp16",
    )


class LossScaleGuard:
    """Stops a run whose loss scale has sat at or below ``min_scale`` for ``max_steps_at_min`` steps in a row."""

    def __init__(self, min_scale: float, max_steps_at_min: int):
        self.min_scale, self.max_steps_at_min = min_scale, max_steps_at_min
        self.steps_at_min = 0
        self.skipped_total = 0

    def update(self, scale: float, skipped: bool) -> None:
        self.skipped_total += int(skipped)
        self.steps_at_min = self.steps_at_min + 1 if scale <= self.min_scale else 0
        if self.steps_at_min >= self.max_steps_at_min:
            raise LossScaleCollapse(
                f"fp16 loss scale has been <= {self.min_scale:g} for {self.steps_at_min} steps (now {scale:g}; "
                f"{self.skipped_total} steps skipped for overflow so far). The gradients overflow even "
                "unscaled: lower optim.base_lr_per_256, set optim.grad_clip_norm, or train with precision=bf16."
            )

    def state_dict(self) -> dict:
        return {"steps_at_min": self.steps_at_min, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.steps_at_min, self.skipped_total = state["steps_at_min"], state["skipped_total"]
