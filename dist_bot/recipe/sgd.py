"""The paper's optimizer: SGD with (Nesterov) momentum over param_groups.py's groups, fused where torch can."""

from __future__ import annotations

import torch
from torch import nn


def make_sgd(groups: list[dict], momentum: float, nesterov: bool) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum, fused where torch has the kernel (CUDA, CPU): one kernel per parameter group
    instead of one per tensor, and it takes GradScaler's scale and overflow flag as device tensors, so a step
    never waits for the GPU. Elsewhere the multi-tensor (foreach) form."""
    return torch.optim.SGD(groups, lr=0.0, momentum=momentum, nesterov=nesterov, fused=fusable(groups))


def fusable(groups: list[dict]) -> bool | None:
    """True where torch has the fused SGD kernel for every parameter (plain tensors on CUDA or CPU, not FSDP2's
    DTensors); None (torch's choice: the multi-tensor form) elsewhere."""
    params = [p for g in groups for p in g["params"]]
    return all(type(p) is nn.Parameter and p.device.type in ("cuda", "cpu") for p in params) or None
