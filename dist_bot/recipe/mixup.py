"""Mixup (5.4): x = lambda x_i + (1 - lambda) x_j, and the same for the targets, lambda ~ Beta(alpha, alpha)."""

from __future__ import annotations

import numpy as np
import torch


def mix_pairs(batch_size: int, pairing: str, rng: np.random.Generator) -> torch.Tensor:
    """Index j paired with each i: the reversed batch (``flip``) or a random permutation (``permute``)."""
    if pairing == "flip":
        return torch.arange(batch_size - 1, -1, -1)
    if pairing == "permute":
        return torch.from_numpy(rng.permutation(batch_size))
    raise ValueError(f"unknown mixup pairing {pairing!r}: use flip or permute")


def mixup(
    images: torch.Tensor, targets: torch.Tensor, alpha: float, rng: np.random.Generator, pairing: str = "flip"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with itself; ``targets`` are probability rows (already smoothed). Returns the mixed images,
    the mixed targets and lambda. ``rng`` makes lambda and the pairing reproducible (one per step)."""
    if alpha <= 0:
        return images, targets, 1.0
    lam = float(rng.beta(alpha, alpha))
    j = mix_pairs(images.shape[0], pairing, rng).to(images.device)
    mixed = images.mul(lam).add_(images[j], alpha=1.0 - lam)
    return mixed, targets * lam + targets[j] * (1.0 - lam), lam
