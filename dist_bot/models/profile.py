"""Parameter and multiply-add counts, measured by torch.utils.flop_counter rather than by hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import MODEL_NAMES, build_model, parse_name


@dataclass(frozen=True)
class ModelProfile:
    name: str
    params: int
    macs: int  # multiply-adds of one forward pass of one image (conv and fc; BN, ReLU, pooling excluded)
    image_size: int


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, image_size: int = 224) -> int:
    """Multiply-adds of one forward pass of a single image, counted by FlopCounterMode.

    FlopCounterMode reports FLOPs = 2 x multiply-adds for convolutions and matmuls. It works from shapes
    alone, so a model on the meta device is counted without computing anything.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2


def profile(name: str, image_size: int = 224, num_classes: int = 1000) -> ModelProfile:
    parse_name(name)  # a clear error for a bad name before anything is built
    with torch.device("meta"):  # no memory, no compute: a ResNet-152 profiles in milliseconds
        model = build_model(name, num_classes=num_classes)
    return ModelProfile(name, count_params(model), count_macs(model, image_size), image_size)


def model_table(image_size: int = 224, num_classes: int = 1000) -> str:
    """The `dist-bot models` table: every registered variant with its size and cost."""
    rows = [profile(n, image_size, num_classes) for n in MODEL_NAMES]
    head = f"{'model':<12} {'params':>12} {'params (M)':>10} {f'GMACs @{image_size}px':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<12} {r.params:>12,} {r.params / 1e6:>10.2f} {r.macs / 1e9:>15.3f}")
    return "\n".join(lines)
