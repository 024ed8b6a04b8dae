"""The paper's augmentation (section 2.1) and the evaluation transform, as torchvision transforms.

Training, per image: RandomResizedCrop (8-100 % of the area, aspect 3/4-4/3), horizontal flip, colour
jitter with coefficients in [1 - x, 1 + x] (x = 0.4: [0.6, 1.4]) and PCA lighting noise (AlexNet).
The paper names brightness, saturation and hue; hue is an angle, not a scale, and GluonCV's ImageNet script
that trained the paper's released models jitters brightness, contrast and saturation: we do the same.
Evaluation: resize the shorter side to size / 0.875 (256 for 224), center crop.

CPU workers produce uint8 CHW tensors; conversion to float, PCA lighting and normalisation happen on the
training device in one batched op (4x less host-to-device traffic, as DALI and FFCV do). The DALI loader draws
this recipe's parameters per image with augment.py and applies them inside its pipeline.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

from . import augment

PCA_EIGVAL = torch.tensor(augment.PCA_EIGVAL, dtype=torch.float32)
PCA_EIGVEC = torch.tensor(augment.PCA_EIGVEC, dtype=torch.float32)


def train_transform(image_size: int, min_crop_area: float, hflip: bool, color_jitter: float) -> T.Compose:
    ops = [T.RandomResizedCrop(image_size, scale=(min_crop_area, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


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


def pca_lighting(
    images: torch.Tensor, alpha: torch.Tensor, eigval: torch.Tensor = PCA_EIGVAL, eigvec: torch.Tensor = PCA_EIGVEC
) -> torch.Tensor:
    """Add sum_k alpha_k lambda_k v_k to every pixel of each image (float images in [0, 1]); ``alpha`` is
    (N, 3), drawn per image from N(0, std) (std 0.1 in the paper). On a GPU pass ``alpha`` and the PCA
    constants on the device (made once): a copy from pageable CPU memory would wait for the device."""
    rgb = (alpha.float() * eigval) @ eigvec.T  # (N, 3)
    return images + rgb.to(images.device, images.dtype).view(-1, 3, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(images - mean) / std per channel; ``mean`` and ``std`` are sequences, or tensors already on the device
    (made once: building them per batch would copy them to the device, and wait for it, every time)."""
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s
