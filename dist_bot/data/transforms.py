"""The paper's augmentation (section 2.1) and the evaluation transform, as torchvision transforms.

Training, per image: RandomResizedCrop (8-100 % of the area, aspect 3/4-4/3), horizontal flip, colour
jitter with coefficients in [1 - x, 1 + x] (x = 0.4: [0.6, 1.4]) and PCA lighting noise (AlexNet).
The paper names brightness, saturation and hue; hue is an angle, not a scale, and GluonCV's ImageNet script
that trained the paper's released models jitters brightness, contrast and saturation: we do the same.
Evaluation: resize the shorter side to size / 0.875 (256 for 224), center crop.

CPU workers produce uint8 CHW tensors; conversion to float, PCA lighting and normalisation happen on the
training device in one batched op (4x less host-to-device traffic, as DALI and FFCV do).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision import transforms as T

# AlexNet's PCA of ImageNet RGB pixels in [0, 1] (as in fb.resnet.torch and GluonCV).
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def train_transform(image_size: int, min_crop_area: float, hflip: bool, color_jitter: float) -> T.Compose:
    ops = [T.RandomResizedCrop(image_size, scale=(min_crop_area, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


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


class CenterCrop:
    """Center crop whose offset rounds half up, (L - size + 1) // 2, as DALI's crop_pos 0.5 does;
    torchvision's CenterCrop rounds half to even, one pixel off on odd margins (73 - 64 = 9 -> 4, not 5)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        left, top = (w - self.size + 1) // 2, (h - self.size + 1) // 2
        return img.crop((left, top, left + self.size, top + self.size))


def eval_transform(image_size: int, resize_ratio: float) -> T.Compose:
    return T.Compose(
        [
            T.Resize(round(image_size / resize_ratio), antialias=True),
            CenterCrop(image_size),
            T.PILToTensor(),
        ]
    )


def pca_lighting(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Add sum_k alpha_k lambda_k v_k to every pixel of each image (float images in [0, 1]); ``alpha`` is
    (N, 3), drawn per image from N(0, std) (std 0.1 in the paper)."""
    rgb = (alpha.float() * PCA_EIGVAL) @ PCA_EIGVEC.T  # (N, 3)
    return images + rgb.to(images.device, images.dtype).view(-1, 3, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s
