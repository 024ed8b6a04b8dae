"""Exponential moving average of the weights (timm's ModelEmaV3), kept per shard, updated without a host sync.

After optimizer step t (t = 1, 2, ...):  ema = decay(t) * ema + (1 - decay(t)) * weights, with timm's warmup

    decay(t) = 0                                          for t <= 1 (the first update copies the weights)
    decay(t) = min(1 - (1 + (t - 1)) ** -2/3, ema_decay)  with model.ema_warmup, else ema_decay

so a short run is not dominated by its random initial weights (0.9998 unwarmed would keep 86 % of them after
740 steps; warmed, the decay is 0.988 there). The decay is a host float computed from the Python step counter:
nothing waits for the device.

Like timm's ModelEmaV3 (exclude_buffers=False), the floating buffers (BatchNorm running mean and variance) are
averaged too, and the integer ones (num_batches_tracked) copied. Unlike timm, a skipped step (fp16 overflow, a
non-finite gradient) leaves the EMA as it is: the weights did not change, so averaging toward them anyway would
move the EMA by (1 - decay) x (weights - ema), more with every skip. The strategy's step flag (a device bool)
multiplies the update's weight on the device. The decay still follows the global step (skipped steps count, as
in timm, whose update sees the step counter but not the loss scaler's skip). Integer buffers are copied always.

Per shard, no gather per step: each process averages only its share of the model, which the strategy names
(``Strategy.ema_owners``): under DDP its whole replica, under FSDP2 the local shard of every parameter (a
DTensor's local tensor), under DeepSpeed ZeRO the parameters assigned to it (``balanced_owners``). The buffers
follow rank 0's, the rule by which every strategy trains (rank 0's BN statistics are broadcast before each
training forward): only rank 0 averages them. The full EMA is assembled (a collective) only to evaluate it and to
save it: ``ema.pt``, a state dict with exactly model.pt's keys and format (fp32), which resuming reads back on
every process, each taking its share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# timm ModelEmaV3's defaults: warmup_gamma=1, warmup_power=2/3, min_decay=0, update_after_step=0
WARMUP_GAMMA, WARMUP_POWER, MIN_DECAY, UPDATE_AFTER_STEP = 1.0, 2 / 3, 0.0, 0


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """The decay of the update after optimizer step ``step`` (1-based): timm's ModelEmaV3.get_decay."""
    step = max(0, step - UPDATE_AFTER_STEP - 1)
    if step <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1 - (1 + step / WARMUP_GAMMA) ** -WARMUP_POWER, decay), MIN_DECAY)


def balanced_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Each key to one rank, largest first to the least loaded rank: every rank gets about 1/world_size of the
    elements (for ResNet-50 on 8 ranks, the largest share is within a few % of the mean)."""
    load, owners = [0] * world_size, {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[key], load[rank] = rank, load[rank] + sizes[key]
    return owners


class ModelEma:
    """This process's share of the EMA of ``module``'s state (``owners``: the rank that averages each parameter,
    None for every rank: a replica, or a DTensor's local shard; buffers are rank 0's). ``module`` is the one
    whose state_dict keys are model.pt's; its tensors are read live each step (the optimizer updates them in
    place)."""

    def __init__(self, module: nn.Module, owners: dict[str, int | None], decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        params = {name for name, _ in module.named_parameters()}
        # the live tensors, by model.pt key; Parameters and buffers stay the same objects through training
        # (DeepSpeed swaps a parameter's .data for a view of its flat buffer: keep_vars keeps the Parameter)
        self.live: dict[str, torch.Tensor] = dict(module.state_dict(keep_vars=True))
        self.owner = {k: owners.get(k) if k in params else 0 for k in self.live}
        self.ema = {k: self._copy(self._local(t)) for k, t in self.live.items() if self._mine(k)}

    def _mine(self, key: str) -> bool:
        return self.owner[key] is None or self.owner[key] == self.rank

    @staticmethod
    def _copy(t: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of a floating tensor (DeepSpeed's fp16 weights too: an fp16 EMA would round away the
        update), an exact one of an integer one."""
        return t.detach().clone().float() if t.is_floating_point() else t.detach().clone()

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    @torch.no_grad()
    def update(self, step: int, taken: torch.Tensor | bool) -> None:
        """Average toward the weights after optimizer step ``step``; ``taken`` (a device bool) False: no change."""
        weight = 1.0 - ema_decay(step, self.decay, self.warmup)
        taken = torch.as_tensor(taken)
        device = next(iter(self.ema.values())).device if self.ema else taken.device
        w = taken.to(device=device, dtype=torch.float32) * weight  # on the device: no host sync
        floats, sources = [], []
        for key, ema in self.ema.items():
            src = self._local(self.live[key]).detach()
            if ema.is_floating_point():
                floats.append(ema)
                sources.append(src if src.dtype == ema.dtype else src.float())  # DeepSpeed fp16 weights
            else:
                ema.copy_(src)  # num_batches_tracked, as timm
        if weight == 1.0:  # decay 0 (the first step): the weights exactly, as timm's lerp with weight 1 gives
            for ema, src in zip(floats, sources, strict=True):
                torch.where(taken.to(ema.device), src, ema, out=ema)
        elif floats:  # ema += w * (weights - ema): lerp's formula for w < 0.5; with w a device scalar, three
            # fused kernels (foreach lerp takes a device weight only as one tensor per tensor: a kernel each)
            delta = torch._foreach_sub(sources, floats)
            torch._foreach_mul_(delta, w)
            torch._foreach_add_(floats, delta)

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Collective: the whole EMA as a state dict with model.pt's keys, fp32, on every process (each
        DTensor shard all-gathered, each owned tensor broadcast from its owner). Replicated entries are this
        process's EMA tensors themselves, not copies: read them, do not change them."""
        out = {}
        for key, live in self.live.items():
            mine = self.ema.get(key)
            if isinstance(live, DTensor):
                shard = DTensor.from_local(
                    mine, live.device_mesh, live.placements, run_check=False, shape=live.shape, stride=live.stride()
                )
                out[key] = shard.full_tensor()
            elif self.owner[key] is None or not dist.is_initialized():
                out[key] = mine
            else:
                dtype = torch.float32 if live.is_floating_point() else live.dtype
                full = mine if mine is not None else torch.empty(live.shape, dtype=dtype, device=live.device)
                dist.broadcast(full, src=self.owner[key])
                out[key] = full
        return out

    def share_of(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's share of a full EMA state dict (as ``full_state`` gives; keys checked by the caller),
        as new tensors on the EMA's devices; nothing is applied (``load_share`` does)."""
        share = {}
        for key, ema in self.ema.items():
            live, value = self.live[key], full[key].to(device=ema.device, dtype=ema.dtype)
            if isinstance(live, DTensor):  # the same split FSDP2 made, computed locally (src_data_rank=None)
                value = distribute_tensor(value, live.device_mesh, live.placements, src_data_rank=None).to_local()
            share[key] = value.clone()
        return share

    @torch.no_grad()
    def load_share(self, share: dict[str, torch.Tensor]) -> None:
        for key, value in share.items():
            self.ema[key].copy_(value)
