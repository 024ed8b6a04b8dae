"""What the Trainer needs from DDP, FSDP2 or DeepSpeed (the Strategy protocol), and the optimizer step they share.

**The optimizer step under low precision** (the paper's 3.2): fp16 with fp32 master weights and dynamic loss
scaling, bf16, or fp32.

fp16: the model keeps fp32 weights, autocast runs matmuls/convs in fp16, and the loss is multiplied by a
scale S before backward so small gradients do not flush to zero. An overflow (inf/NaN gradient) skips the
step and halves S; ``growth_interval`` clean steps double it. torch.amp.GradScaler implements exactly this
(on CPU too), so it is used rather than rewritten; this module adds what it lacks: knowing, without waiting
for the GPU, whether a step was skipped, and a guard against a scale that collapses.
bf16 has fp32's exponent range: no scaling needed.

Every precision skips a step whose gradients are not finite (an inf/NaN from the data reaches the loss and
the gradients in fp32 and bf16 too): the weights and momentum stay as they were, and the engine's loss check
at the next log step stops the run with the last good weights. The decision is made on the device, never
read by the host: fused SGD takes the overflow flag as a device tensor (as GradScaler hands it over); the
multi-tensor form (FSDP2's DTensor shards) is undone on the device where the flag is set, in a few kernels.
GradScaler's own ``step`` would instead read the flag (``.item()``), so it is not called. The skip flag and the guard's
counters are device tensors, read once per log interval.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from ..config import Strategy as StrategyName
from ..errors import LossScaleCollapse, UserError
from .env import DistEnv


class Strategy(Protocol):
    """What the engine needs from DDP, FSDP2 or DeepSpeed; it knows nothing else about them."""

    model: nn.Module  # the wrapped model, for the training forward pass

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled under fp16)."""

    def step(self) -> torch.Tensor:
        """Unscale, clip, optimizer step, update the loss scale. Returns a 0-dim bool tensor, False when the step
        was skipped (an inf/NaN gradient, fp16 overflow or not: no weight changes, on any rank); on the device
        where the strategy can decide there, so nothing waits for it."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally for a micro-batch that is not the last of its step."""

    def set_lr(self, lr: float) -> None: ...

    @property
    def loss_scale(self) -> float:
        """Current fp16 loss scale (1.0 when not scaling); reading it waits for the device."""

    @property
    def loss_scale_async(self) -> torch.Tensor | float:
        """The same without waiting: a 0-dim device tensor (or a float where the strategy keeps it on the host)."""

    def eval_model(self, sync_buffers: bool = True) -> nn.Module:
        """The plain module with full weights and BN statistics averaged over processes (unless ``sync_buffers`` is
        False: they already are), for evaluation (no collectives in its forward). A collective: every process
        calls it."""

    def ema_source(self) -> tuple[nn.Module, dict[str, int]]:
        """For the weights' EMA (recipe/ema.py): the module whose state_dict is model.pt's (under FSDP2 its
        parameters are DTensor shards), and the rank that averages each parameter named here; a parameter not
        named is averaged on every rank (its replica, or its local shard)."""

    def save(self, folder: Path) -> None:
        """Collective: write model.pt (full weights, one file) and the training state into ``folder``."""

    def read(self, folder: Path) -> Any:
        """Collective: this process's part of a checkpoint (model, optimizer, loss scaler), read completely and
        checked, NOT applied; raises CheckpointError when a file is missing, damaged or does not fit."""

    def apply(self, state: Any) -> None:
        """Restore what ``read`` returned (on every process, after all of them read theirs)."""


def build_strategy(
    name: str, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv, cfg
) -> Strategy:
    """Wrap ``model`` for ``name`` and build its optimizer (after sharding, for the strategies that shard)."""
    if name == "ddp":
        from .ddp import DDPStrategy

        return DDPStrategy(model, make_optimizer, env, cfg)
    if name == "fsdp":
        from .fsdp import FSDPStrategy

        return FSDPStrategy(model, make_optimizer, env, cfg)
    if name == "deepspeed":
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(model, make_optimizer, env, cfg)
    raise UserError(f"unknown strategy={name!r}: use {' or '.join(typing.get_args(StrategyName))}")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    """The forward-pass context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def make_grad_scaler(precision: str, device: torch.device, cfg) -> torch.amp.GradScaler:
    """A GradScaler configured from ``loss_scale.*``; disabled (a pass-through) unless precision is fp16."""
    return torch.amp.GradScaler(
        device.type,
        init_scale=cfg.init_scale,
        growth_factor=2.0,
        backoff_factor=cfg.backoff_factor,
        growth_interval=cfg.growth_interval,
        enabled=precision == "fp16",
    )


def set_lr(param_groups: list[dict], lr: float) -> None:
    """The step's lr into every group, times the group's "lr_scale" where it has one (optim.backbone_lr_scale).
    A group whose lr is a device tensor (``device_lr``) is written in place: one asynchronous fill, and a step
    captured in a CUDA graph reads the new value from the same memory."""
    for group in param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def device_lr(optimizer: torch.optim.Optimizer) -> None:
    """Keep a fused optimizer's lr as a 0-dim float32 tensor on its parameters' device (the form torch's fused
    SGD reads from memory), so no step bakes the lr into a kernel's arguments: a step is then capturable in a
    CUDA graph, the lr, the loss scale and the skip flag all on the device. Only fused groups: the multi-tensor
    form would read a tensor lr back to the host (``alpha=-lr``) every step. Idempotent; called again after a
    checkpoint's optimizer state (whose lr may be a float, or on another device) is loaded."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        lr, device = group["lr"], group["params"][0].device
        if not (isinstance(lr, torch.Tensor) and lr.device == device and lr.dtype == torch.float32):
            group["lr"] = torch.full((), float(lr), dtype=torch.float32, device=device)  # a fill, no host copy


def zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Create SGD's momentum buffers as zeros before the first step. The first step then computes
    0 * momentum + grad, exactly what torch's first step stores, but a first step skipped for a non-finite
    gradient leaves zeros: fused SGD allocates the buffers uninitialized and its skip never writes them."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p.detach()))


def nonfinite_grads(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """1.0 when any gradient holds an inf or NaN, else 0.0: a 0-dim float32 tensor computed on the device (by
    GradScaler's check kernel, with a scale of 1). On FSDP2's DTensor gradient shards torch reduces the flag
    with max over the ranks, so every rank gets the same answer, as GradScaler's does under fp16."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    found = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones_like(found))
    return found


def fused(optimizer: torch.optim.Optimizer) -> bool:
    """Every group steps with the fused kernel (make_sgd's, on CPU and CUDA), which takes a skip flag."""
    return all(group.get("fused") for group in optimizer.param_groups)


@contextlib.contextmanager
def skip_flag(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor):
    """Hands ``found_inf`` to a fused optimizer's kernel for the steps inside (no update where it is set), as
    GradScaler does: the attribute the fused SGD step reads."""
    optimizer.found_inf = found_inf
    try:
        yield
    finally:
        del optimizer.found_inf


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()``, except that no parameter or momentum buffer changes where ``found_inf`` (0-dim,
    on the device) is nonzero; the host never reads it. Fused SGD skips in its kernel. The multi-tensor form
    takes no flag: what it changes is copied before and put back after where the flag is set (on FSDP2 these
    are this rank's shards, so the copy is 1/world_size of the weights and momentum)."""
    if fused(optimizer):
        with skip_flag(optimizer, found_inf):
            optimizer.step()
        return
    with torch.no_grad():
        changed = [
            t.to_local() if isinstance(t, DTensor) else t
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
            for t in (p, optimizer.state[p].get("momentum_buffer"))
            if t is not None
        ]
        # A handful of kernels whatever the number of tensors (one where per tensor was ~640 launches a step for
        # ResNet-50): each dtype's tensors flattened into one buffer before and after the step, one where over it
        # (NaN-safe, unlike arithmetic with a 0/1 flag), and one multi-tensor copy back.
        by_dtype: dict[tuple, list[torch.Tensor]] = {}
        for t in changed:
            by_dtype.setdefault((t.dtype, t.device), []).append(t)
        before = {k: _flatten_dense_tensors(ts) for k, ts in by_dtype.items()}
        optimizer.step()
        skip = found_inf.bool()
        for k, ts in by_dtype.items():
            kept = torch.where(skip, before[k], _flatten_dense_tensors(ts))
            torch._foreach_copy_(ts, _unflatten_dense_tensors(kept, ts))


class ScaledOptimizer:
    """backward / step / set_lr / loss scale for strategies that drive a torch optimizer through a GradScaler
    (DDP, FSDP2). Subclasses set ``self.model`` and call ``init_steps`` with their optimizer."""

    model: nn.Module

    def init_steps(self, optimizer: torch.optim.Optimizer, env, cfg) -> None:
        self.optimizer = optimizer
        self.grad_clip_norm = cfg.optim.grad_clip_norm
        self.scaler = make_grad_scaler(cfg.precision, env.device, cfg.loss_scale)
        zero_momentum(optimizer)
        device_lr(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Unscale, check, clip, step (skipped when a gradient is inf/NaN), update the scale. Returns a 0-dim bool
        tensor on the device, True when the step was taken; reading it waits for the GPU, so the engine reads it
        only when it logs. Every rank decides the same: DDP's gradients are reduced before the check, and on
        FSDP2's shards the check itself reduces the flag over ranks."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # the true gradients, and GradScaler's overflow flag
            found_inf = torch.stack(list(self.scaler._found_inf_per_device(self.optimizer).values())).sum()
        else:
            found_inf = nonfinite_grads(self.optimizer)
        if self.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)  # over all ranks' shards
        step_unless(self.optimizer, found_inf)
        self.scaler.update()  # halves the scale on the flag GradScaler recorded, or grows it (fp16 only)
        self.optimizer.zero_grad(set_to_none=True)
        return found_inf == 0

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer.param_groups, lr)

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    @property
    def loss_scale_async(self) -> torch.Tensor | float:
        """The current scale without waiting for the device (a 0-dim tensor under fp16)."""
        return self.scaler._get_scale_async() if self.scaler.is_enabled() else 1.0


class LossScaleGuard:
    """Stops a run whose loss scale has sat at or below ``min_scale`` for ``max_steps_at_min`` steps in a row.

    ``update`` is called every step with the strategy's scale and step flag, as device tensors (or host values
    where the strategy keeps them there), and only does arithmetic on them; ``check``, called where the engine
    reads the device anyway (log steps), raises if the longest run at the minimum since the last check reached
    the limit, and refreshes the host counters ``steps_at_min`` and ``skipped_total``.
    """

    def __init__(self, min_scale: float, max_steps_at_min: int):
        self.min_scale, self.max_steps_at_min = min_scale, max_steps_at_min
        self.steps_at_min = 0  # host copies, as of the last check()
        self.skipped_total = 0
        self._at_min = self._longest = self._skipped = None  # device counters since the last check()

    def update(self, scale, taken) -> None:
        scale, taken = torch.as_tensor(scale), torch.as_tensor(taken)  # tensors stay on their device
        if self._at_min is None:
            zero = torch.zeros((), dtype=torch.int64, device=scale.device)
            self._at_min, self._longest, self._skipped = zero + self.steps_at_min, zero + self.steps_at_min, zero
        self._at_min = (self._at_min + 1) * (scale <= self.min_scale)
        self._longest = torch.maximum(self._longest, self._at_min)
        self._skipped = self._skipped + (~taken).long()

    def check(self) -> None:
        """Read the counters (waits for the device) and raise LossScaleCollapse if the scale collapsed."""
        if self._at_min is None:
            return
        at_min, longest, skipped = torch.stack([self._at_min, self._longest, self._skipped]).tolist()
        self.steps_at_min, self.skipped_total = at_min, self.skipped_total + skipped
        self._at_min = self._longest = self._skipped = None
        if longest >= self.max_steps_at_min:
            raise LossScaleCollapse(
                f"fp16 loss scale has been <= {self.min_scale:g} for {longest} steps ({self.skipped_total} steps "
                "skipped for overflow so far). The gradients overflow even unscaled: lower optim.base_lr_per_256, "
                "set optim.grad_clip_norm, or train with precision=bf16."
            )

    def state_dict(self) -> dict:
        self.check()
        return {"steps_at_min": self.steps_at_min, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.steps_at_min, self.skipped_total = state["steps_at_min"], state["skipped_total"]
        self._at_min = self._longest = self._skipped = None
