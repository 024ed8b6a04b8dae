"""dist_bot's ResNets under timm's and torchvision's names: the same networks, other names for two parts.

    dist_bot          timm                      torchvision
    resnet{N}b        resnet{N}                 resnet{N}        (ResNet-B: the stride on the 3x3 conv)
    resnet10{a..d}    -                         -                (timm's resnet10t has another stem)
    resnet{18,34}a    resnet{18,34}             resnet{18,34}    (basic blocks: A and B are one network)
    resnet{N}c        resnet{50,101,152}c       -
    resnet{N}d        resnet{N}d                -
    resnet{50,..}a    -                         -                (v1: stride on the first 1x1; no twin)

State-dict keys differ only in the stem and the projection shortcut: dist_bot names them (``stem.conv1``,
``downsample.conv``), timm and torchvision number them in Sequentials (``conv1.0``, ``downsample.0``).
torchvision's ResNet keys are exactly timm's ResNet-B keys, so one mapping serves both.
"""

from __future__ import annotations

import re

from . import DEPTHS, parse_name
from .resnet import BasicBlock, VariantSpec


def _basic(depth: int) -> bool:
    return DEPTHS[depth][0] is BasicBlock


def timm_name(name: str) -> str | None:
    """timm's model of the same architecture as dist_bot's ``name``, or None where timm has none."""
    depth, variant = parse_name(name)
    if depth == 10:  # timm's resnet10t has a narrower, tiered deep stem; timm has no resnet10 or resnet10d
        return None
    if variant == "b" or (variant == "a" and _basic(depth)):
        return f"resnet{depth}"
    if variant == "d" or (variant == "c" and not _basic(depth)):  # timm has no resnet18c / resnet34c
        return f"resnet{depth}{variant}"
    return None


def timm_twin(name: str) -> tuple[str, dict] | None:
    """``timm.create_model``'s name and keyword arguments for ``name``'s architecture, or None. timm names no
    ResNet-10, but its ResNet-18 of the same variant with one block per stage is the same network (the benchmark's
    timm side for the small models the CPU rehearsals run)."""
    depth, variant = parse_name(name)
    if depth == 10:
        twin = timm_name(f"resnet18{variant}")
        return (twin, {"layers": (1, 1, 1, 1)}) if twin else None
    twin = timm_name(name)
    return (twin, {}) if twin else None


def torchvision_name(name: str) -> str | None:
    """torchvision's model of the same architecture (its ResNets are ResNet-B), or None."""
    depth, variant = parse_name(name)
    if depth == 10:  # torchvision starts at resnet18
        return None
    return f"resnet{depth}" if variant == "b" or (variant == "a" and _basic(depth)) else None


def _stem(spec: VariantSpec) -> dict[str, str]:
    """dist_bot stem module -> timm's. The deep stem is timm's Sequential conv1 (conv, bn, act, conv, bn, act,
    conv) followed by bn1."""
    if spec.deep_stem:
        return {
            "stem.conv1": "conv1.0",
            "stem.bn1": "conv1.1",
            "stem.conv2": "conv1.3",
            "stem.bn2": "conv1.4",
            "stem.conv3": "conv1.6",
            "stem.bn3": "bn1",
        }
    return {"stem.conv1": "conv1", "stem.bn1": "bn1"}


def _shortcut(spec: VariantSpec) -> tuple[str, ...]:
    """The shortcut's parts in the order of timm's Sequential (the pool has no weights, but takes index 0)."""
    return ("pool", "conv", "bn") if spec.avg_down else ("conv", "bn")


def to_timm_key(key: str, spec: VariantSpec) -> str:
    for ours, theirs in _stem(spec).items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    parts = _shortcut(spec)
    return re.sub(r"\.downsample\.(pool|conv|bn)\.", lambda m: f".downsample.{parts.index(m.group(1))}.", key)


def from_timm_key(key: str, spec: VariantSpec) -> str:
    for ours, theirs in _stem(spec).items():
        if key.startswith(theirs + "."):
            return ours + key[len(theirs) :]
    parts = _shortcut(spec)
    return re.sub(r"\.downsample\.(\d)\.", lambda m: f".downsample.{parts[int(m.group(1))]}.", key)


def to_timm(state: dict, name: str) -> dict:
    """A dist_bot state_dict of model ``name`` under timm's keys (= torchvision's for ResNet-B)."""
    spec = VariantSpec.of(parse_name(name)[1])
    return {to_timm_key(k, spec): v for k, v in state.items()}


def from_timm(state: dict, name: str) -> dict:
    """A timm (or torchvision) ResNet state_dict under the keys of dist_bot's model ``name``."""
    spec = VariantSpec.of(parse_name(name)[1])
    return {from_timm_key(k, spec): v for k, v in state.items()}
