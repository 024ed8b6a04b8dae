"""The paper's training refinements on the targets and the loss: label smoothing (5.2), knowledge distillation
(5.3) and mixup (5.4), all on probability targets, so they compose: smooth, then mix, then the (distilled) loss.

Mixup: x = lambda x_i + (1 - lambda) x_j, and the same for the targets, lambda ~ Beta(alpha, alpha). CutMix (Yun et
al. 2019, not in the paper): x_i with a box of x_j pasted in, of area 1 - lambda, the targets mixed by the box's
actual share (timm's Mixup with correct_lam); with both on, each micro-batch takes one of the two, with even odds.

lambda is drawn on the host from a seeded generator (a scalar: it reaches the device as a kernel argument, not
as a copy); the pairing j is made where the images are (a flip, or a permutation drawn by a device generator),
so mixing never waits for the device nor copies an index tensor to it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def smooth_targets(labels: torch.Tensor, num_classes: int, eps: float, form: str = "paper") -> torch.Tensor:
    """One-hot targets, smoothed.

    paper: q_i = 1 - eps for the true class and eps / (K - 1) for each other class (section 5.2).
    torch: PyTorch's ``label_smoothing``: (1 - eps) one-hot + eps / K everywhere, so the true class gets
        1 - eps + eps / K.
    """
    if form == "paper":
        off, on = eps / (num_classes - 1), 1.0 - eps
    elif form == "torch":
        off, on = eps / num_classes, 1.0 - eps + eps / num_classes
    else:
        raise ValueError(f"unknown label smoothing form {form!r}: use paper or torch")
    q = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return q.scatter_(1, labels.long().unsqueeze(1), on)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch mean of CE(q, softmax(z)) = -sum_i q_i log softmax(z)_i, computed in fp32."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 20.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
) -> torch.Tensor:
    """w_hard CE(p, softmax(z)) + w_soft T^2 CE(softmax(r / T), softmax(z / T)) (section 5.3).

    ``target`` is p, the (smoothed, mixed) true distribution; r the frozen teacher's logits on the same
    input. T^2 keeps the soft term's gradients on the scale of the hard term's as T grows.
    """
    T = temperature
    soft_target = F.softmax(teacher_logits.float() / T, dim=1)
    hard = soft_cross_entropy(student_logits, target)
    soft = soft_cross_entropy(student_logits.float() / T, soft_target)
    return hard_weight * hard + soft_weight * T * T * soft


def make_loss(distill) -> Callable[..., torch.Tensor]:
    """The loss on (logits, soft targets[, teacher logits]) for ``loss.distill``: distillation when it names a
    teacher, else soft cross-entropy."""
    if distill.teacher:

        def loss(logits, targets, teacher_logits):
            return distillation_loss(
                logits, teacher_logits, targets, distill.temperature, distill.hard_weight, distill.soft_weight
            )

    else:

        def loss(logits, targets, teacher_logits=None):
            return soft_cross_entropy(logits, targets)

    return loss


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


def partners(
    images: torch.Tensor, targets: torch.Tensor, pairing: str, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's and target's pair j, for mixup and CutMix alike: ``flip`` reverses the batch where it is (a
    view, no index tensor); ``permute`` gathers by ``mix_pairs``'s permutation."""
    if pairing == "flip":
        return images.flip(0), targets.flip(0)
    j = mix_pairs(images.shape[0], pairing, rng, images.device)
    return images[j], targets[j]


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
    other_images, other_targets = partners(images, targets, pairing, rng)
    mixed = images.mul(lam).add_(other_images, alpha=1.0 - lam)
    return mixed, targets * lam + other_targets * (1.0 - lam), lam


def cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of CutMix's box for lambda: sides sqrt(1 - lambda) of the image's, centred at a uniform
    pixel, clipped to the image (timm's rand_bbox)."""
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def cutmix(
    images: torch.Tensor, targets: torch.Tensor, alpha: float, rng, pairing: str = "flip"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste a box of each image's pair into it; the targets mix by the box's share of the image (so lambda is
    the share kept). As ``mixup``: returns the images, the targets and lambda."""
    if alpha <= 0:
        return images, targets, 1.0
    rng = np.random.default_rng(rng)
    h, w = images.shape[-2:]
    y0, y1, x0, x1 = cut_box(h, w, float(rng.beta(alpha, alpha)), rng)
    other_images, other_targets = partners(images, targets, pairing, rng)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = other_images[..., y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, targets * lam + other_targets * (1.0 - lam), lam


def mix(
    images: torch.Tensor, targets: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, seed, pairing: str = "flip"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """loss.mixup_alpha and loss.cutmix_alpha on a micro-batch, drawn from its ``seed``: mixup alone draws exactly
    as before CutMix existed; with both, a coin picks one per micro-batch (timm's switch_prob 0.5)."""
    if cutmix_alpha <= 0:
        return mixup(images, targets, mixup_alpha, seed, pairing)
    rng = np.random.default_rng(seed)
    if mixup_alpha > 0 and rng.random() < 0.5:
        return mixup(images, targets, mixup_alpha, rng, pairing)
    return cutmix(images, targets, cutmix_alpha, rng, pairing)
