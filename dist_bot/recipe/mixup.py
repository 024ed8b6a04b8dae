"""Mixup (5.4): x = lambda x_i + (1 - lambda) x_j, and the same for the targets, lambda ~ Beta(alpha, alpha).

lambda is drawn on the host from a seeded generator (a scalar: it reaches the device as a kernel argument, not
as a copy); the pairing j is made where the images are (a flip, or a permutation drawn by a device generator),
so mixing never waits for the device nor copies an index tensor to it.
"""

from __future__ import annotations

import numpy as np
import torch


def mix_pairs(batch_size: int, pairing: str, rng: np.random.Generator, device=None) -> torch.Tensor:
    """Index j paired with each i: the reversed batch (``flip``) or a random permutation (``permute``), made on
    ``device``; the permutation is drawn by a generator seeded from ``rng``."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if pairing == "flip":
        return torch.arange(batch_size - 1, -1, -1, device=device)
    if pairing == "permute":
        g = torch.Generator(device=device)
        g.manual_seed(int(rng.integers(2**63)))
        return torch.randperm(batch_size, generator=g, device=device)
    raise ValueError(f"unknown mixup pairing {pairing!r}: use flip or permute")


def mixup(
    images: torch.Tensor, targets: torch.Tensor, alpha: float, rng, pairing: str = "flip"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with itself; ``targets`` are probability rows (already smoothed). Returns the mixed images,
    the mixed targets and lambda. ``rng`` (a numpy Generator, or a seed such as the plan's micro-batch seed)
    makes lambda and the pairing reproducible, so a resumed run mixes identically."""
    if alpha <= 0:
        return images, targets, 1.0
    rng = np.random.default_rng(rng)
    lam = float(rng.beta(alpha, alpha))
    if pairing == "flip":  # a view-free reversal on the device, no index tensor
        other_images, other_targets = images.flip(0), targets.flip(0)
    else:
        j = mix_pairs(images.shape[0], pairing, rng, images.device)
        other_images, other_targets = images[j], targets[j]
    mixed = images.mul(lam).add_(other_images, alpha=1.0 - lam)
    return mixed, targets * lam + other_targets * (1.0 - lam), lam
