"""The paper's augmentation (section 2.1) as the torch loader applies it, and the evaluation transform.

Training applies each image's ``plan.draw`` as DALI's pipeline does: with PIL, in the DataLoader workers, the
crop box resized to image_size (antialiased bilinear) and the flip; on the training device, in one batched op,
colour jitter with DALI's color_twist formula (brightness, contrast, saturation, then rounded to uint8), PCA
lighting (AlexNet) and normalisation. The crops are RandomResizedCrop's (8-100 % of the area, aspect 3/4-4/3),
the jitter coefficients in [1 - x, 1 + x] (x = 0.4: [0.6, 1.4]). The paper names brightness, saturation and
hue; hue is an angle, not a scale, and GluonCV's ImageNet script that trained the paper's released models
jitters brightness, contrast and saturation: we do the same. Workers hand over uint8 CHW tensors: 4x less
host-to-device traffic than float, as DALI and FFCV do.

Evaluation: resize the shorter side to size / 0.875 (256 for 224), center crop.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from . import plan

PCA_EIGVAL = torch.tensor(plan.PCA_EIGVAL, dtype=torch.float32)
PCA_EIGVEC = torch.tensor(plan.PCA_EIGVEC, dtype=torch.float32)


class DrawnCrop:
    """A training image's ``plan.draw`` applied with PIL: crop box resized to image_size, and the flip; returns the
    uint8 CHW tensor with the draw's colour twist and lighting coefficients, which the trainer's device applies
    to the batch (``color_twist``, ``pca_lighting``)."""

    def __init__(self, seed: int, image_size: int, min_crop_area: float, hflip: bool, jitter: float):
        self.seed, self.size = seed, image_size
        self.min_crop_area, self.hflip, self.jitter = min_crop_area, hflip, jitter

    def __call__(self, img: Image.Image, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = plan.draw(self.seed, epoch, index, *img.size, self.min_crop_area, self.hflip, self.jitter)
        x, y, w, h = d.box
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h))
        if d.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img), torch.tensor(d.twist), torch.tensor(d.alpha)


# DALI's color_twist: saturation scales I and Q in YIQ, i.e. x -> s x + (1 - s) Y with Y the luma below
LUMA = (0.299, 0.587, 0.114)


def color_twist(images: torch.Tensor, twist: torch.Tensor) -> torch.Tensor:
    """DALI's ``fn.color_twist`` on uint8-valued float images (N, 3, H, W) in [0, 255]: for (brightness b,
    contrast c, saturation s) per image, b (c (s x + (1 - s) Y) + 128 (1 - c)), rounded and clamped to uint8 as
    DALI's uint8 output is."""
    b, c, s = (twist[:, k].to(images.dtype).view(-1, 1, 1, 1) for k in range(3))
    luma = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    y = (images * luma).sum(dim=1, keepdim=True)
    out = b * (c * (s * images + (1 - s) * y) + 128 * (1 - c))
    return out.round_().clamp_(0, 255)


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
