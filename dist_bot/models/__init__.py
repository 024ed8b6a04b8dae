"""Model registry: ``build_model("resnet50d", num_classes=1000)`` and the list of known names."""

from __future__ import annotations

import difflib

from torch import nn

from ..errors import ConfigError
from .resnet import VARIANTS, BasicBlock, Bottleneck, ResNet

# depth -> (block, blocks per stage), as in He et al. 2016, Table 1; ResNet-10 (one basic block per stage, not in
# the table) is the family's smallest member: 5.4 M parameters to ResNet-18's 11.7 M, for smoke runs and tests.
DEPTHS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

MODEL_NAMES: tuple[str, ...] = tuple(f"resnet{d}{v}" for d in DEPTHS for v in VARIANTS)


def parse_name(name: str) -> tuple[int, str]:
    """``"resnet50d"`` -> ``(50, "d")``; an unknown name raises a ConfigError (a ValueError, and bad input that
    the CLI reports in one line) naming the closest ones."""
    if name in MODEL_NAMES:
        return int(name[len("resnet") : -1]), name[-1]
    close = difflib.get_close_matches(name, MODEL_NAMES, n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown model {name!r}.{hint} Known models: resnet{{10,18,34,50,101,152}}{{a,b,c,d}} "
        f"(`dist-bot models` lists them)."
    )


def build_model(name: str, num_classes: int = 1000, zero_init_last: bool = True) -> nn.Module:
    """Build one of ``MODEL_NAMES`` with fresh weights (zero gamma on each block's last BN by default)."""
    depth, variant = parse_name(name)
    block, layers = DEPTHS[depth]
    return ResNet(block, layers, variant=variant, num_classes=num_classes, zero_init_last=zero_init_last)


__all__ = ["MODEL_NAMES", "ResNet", "build_model", "parse_name"]
