"""Each training image's random augmentation, drawn from a generator seeded by (seed, epoch, index) alone.

So an image is augmented the same way whichever process, worker or loader reads it, and a resumed run sees
exactly the images it would have seen. numpy only: DALI's Python workers import this module without torch
(transforms.py holds the torchvision side of the same recipe).
"""

from __future__ import annotations

import math

import numpy as np

# AlexNet's PCA of ImageNet RGB pixels in [0, 1] (as in fb.resnet.torch and GluonCV).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def sample_resized_crop(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a random crop covering ``scale`` of the area with aspect ratio in ``ratio`` (log-uniform):
    torchvision's RandomResizedCrop algorithm, drawn from ``rng`` so a loader can seed it per image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: the largest center crop within the ratio range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def lighting_rgb(alpha: np.ndarray) -> np.ndarray:
    """PCA lighting noise: sum_k alpha_k lambda_k v_k, the RGB shift (in [0, 1] pixel units) of each image;
    ``alpha`` is (N, 3), drawn per image from N(0, std) (std 0.1 in the paper)."""
    return (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T
