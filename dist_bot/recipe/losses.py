"""Label smoothing (5.2) and knowledge distillation (5.3), on probability targets so mixup (5.4) composes."""

from __future__ import annotations

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
