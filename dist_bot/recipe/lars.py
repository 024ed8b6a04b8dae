"""LARS (You, Gitman & Ginsburg 2017, arXiv:1708.03888): SGD with momentum whose step for each layer is scaled by
a layer-wise trust ratio, so a large batch's large learning rate does not blow up layers whose gradients are
large next to their weights.

For each adapted parameter w (a whole tensor: one conv or linear weight) with gradient g and weight decay wd:

    trust = eta x ||w|| / (||g|| + wd x ||w|| + eps)    (1 where ||w|| or ||g|| is 0)
    g    <- trust x (g + wd x w)

then SGD with (Nesterov) momentum takes the step with the scheduled lr. This is the paper's eq. 6 with the MLPerf
reference's details, chosen because the published large-batch ResNet-50 hyperparameters (the recipes in configs/)
were tuned with them (mlcommons/training image_classification/tensorflow2/lars_optimizer.py): the weight decay
both in the trust ratio's denominator and added to the gradient, trust 1 for all-zero weights or gradients, and
BatchNorm gamma/beta and biases left out of both the adaptation and the weight decay (here: the "no_decay" group
of ``param_groups``, chosen by module type). The one difference: the lr multiplies the momentum's output here
(torch SGD, NVIDIA apex LARC, timm.optim.Lars), where MLPerf's TF reference folds lr x trust into the momentum
(v <- m v + lr trust g); the two agree while the lr is constant and differ only in how fast a changing lr
(warmup, decay) acts, by the momentum's time constant. Doing it as a gradient transform before torch's SGD keeps
fused SGD (one kernel per group, its on-device overflow skip) and its state_dict, so checkpoints, FSDP2's and
DeepSpeed's optimizer-state handling work unchanged.

Norms are over the WHOLE parameter, whatever the strategy holds: FSDP2's DTensor shards and DeepSpeed ZeRO 1-2's
flat partitions sum their local squared norms and reduce them over the ranks (one all_reduce per group per step);
DDP and ZeRO 0 hold full tensors. Nothing here waits for the device (no .item()): trust ratios stay tensors.
(MLPerf's eps: its runs log lars_epsilon 0, though its TF2 code turns an eps of 0 into Keras's 1e-7; either is
negligible next to ||g||.) Gradients arrive unscaled (fp16: GradScaler.unscale_ / DeepSpeed's unscale run before
``step``) and clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .sgd import fusable


@dataclass
class FlatPartition:
    """What one flat tensor (a DeepSpeed ZeRO 1-2 partition: this rank's slice of a group's concatenated
    parameters) holds: consecutive pieces of ``lengths``, each a slice of the group's parameter ``keys[i]``
    (its index in the whole group, the same on every rank) or padding (None). ``num_params``: parameters in the
    whole group; ``process_group``: the ranks whose partitions together hold the group."""

    lengths: tuple[int, ...]
    keys: tuple[int | None, ...]
    num_params: int
    process_group: object = None
    _index: dict = field(default_factory=dict, repr=False)  # device -> keys of the real pieces, as a tensor

    def index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor([k for k in self.keys if k is not None], device=device)
        return self._index[device]


def trust_ratio(w_norm: torch.Tensor, g_norm: torch.Tensor, weight_decay: float, eta: float, eps: float):
    """eta ||w|| / (||g|| + wd ||w|| + eps), elementwise over per-parameter norms; 1 where either norm is 0."""
    ratio = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class LARS(torch.optim.SGD):
    """torch SGD (momentum, Nesterov, fused where torch has the kernel) after the LARS gradient transform.

    Groups with ``lars=False`` (the no-bias-decay group) are plain SGD with their own weight decay; the others
    (``lars`` missing or True) are adapted, and their ``weight_decay`` is applied by the transform (SGD's own is
    bypassed for them). ``set_flat_partition`` tells it how a flat ZeRO partition maps onto the parameters.
    """

    def __init__(
        self, params, momentum: float = 0.9, nesterov: bool = True, eta: float = 0.001, eps: float = 0.0, fused=None
    ):
        super().__init__(params, lr=0.0, momentum=momentum, nesterov=nesterov, fused=fused)
        self.eta, self.eps = eta, eps
        self.flat_partitions: dict[int, FlatPartition] = {}  # id(flat tensor) -> its layout

    def set_flat_partition(self, flat: torch.Tensor, partition: FlatPartition) -> None:
        if sum(partition.lengths) != flat.numel():
            raise ValueError(f"LARS: a flat partition of {flat.numel()} elements described as {sum(partition.lengths)}")
        self.flat_partitions[id(flat)] = partition

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("LARS: step(closure) is not supported (the gradients must exist before the step)")
        adapted = [g for g in self.param_groups if g.get("lars", True)]
        for group in adapted:
            self._adapt(group)
        decays = [g["weight_decay"] for g in adapted]
        for g in adapted:  # already in the transformed gradient
            g["weight_decay"] = 0.0
        try:
            return super().step()
        finally:
            for g, wd in zip(adapted, decays, strict=True):
                g["weight_decay"] = wd

    def _adapt(self, group: dict) -> None:
        """g <- trust x (g + wd w) for every parameter of ``group``, in place, norms over whole parameters."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        wd = group["weight_decay"]
        flat = self.flat_partitions.get(id(params[0])) if len(params) == 1 else None
        if flat is not None:
            w_all, g_all = _split(params[0], flat)
            keep = [i for i, k in enumerate(flat.keys) if k is not None]
            w, g = [w_all[i] for i in keep], [g_all[i] for i in keep]
            index = flat.index(params[0].device)
            sq = torch.zeros(2, flat.num_params, device=params[0].device, dtype=torch.float32)
            if w:
                sq.index_add_(1, index, _squared_norms(w, g))
            _all_reduce(sq, flat.process_group)
            trust = trust_ratio(*sq.sqrt(), wd, self.eta, self.eps)[index]
        else:
            w, g = [_local(p.detach()) for p in params], [_local(p.grad) for p in params]
            sq = _squared_norms(w, g)
            if isinstance(params[0], DTensor) and any(pl.is_shard() for pl in params[0].placements):
                _all_reduce(sq, params[0].device_mesh.get_group())  # FSDP2: each rank holds a Shard(0) piece
            trust = trust_ratio(*sq.sqrt(), wd, self.eta, self.eps)
        if not w:
            return
        if wd:
            torch._foreach_add_(g, w, alpha=wd)
        torch._foreach_mul_(g, list(trust.to(g[0].dtype).unbind()))


def _split(flat: torch.Tensor, partition: FlatPartition) -> tuple[tuple, tuple]:
    return torch.split(flat.detach(), partition.lengths), torch.split(flat.grad, partition.lengths)


def _squared_norms(w: list[torch.Tensor], g: list[torch.Tensor]) -> torch.Tensor:
    """[[||w_i||^2], [||g_i||^2]] (2 x n, fp32): squares, so pieces of one parameter add up over ranks."""
    norms = torch.stack([*torch._foreach_norm(w), *torch._foreach_norm(g)]).float()
    return (norms**2).view(2, len(w))


def _all_reduce(t: torch.Tensor, group) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


def make_lars(groups: list[dict], momentum: float, nesterov: bool, eta: float, eps: float) -> LARS:
    """LARS over ``param_groups``' groups: "decay" (conv/linear weights) and "all" adapted, "no_decay" (BN,
    biases) plain SGD without weight decay, as in the MLPerf reference. Fused as ``make_sgd`` decides."""
    for g in groups:
        g["lars"] = g.get("name") != "no_decay"
    return LARS(groups, momentum=momentum, nesterov=nesterov, eta=eta, eps=eps, fused=fusable(groups))
