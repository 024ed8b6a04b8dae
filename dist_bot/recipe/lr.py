"""Learning rate: linear scaling (3.1), per-iteration linear warmup (3.1), cosine decay (5.1), step decay, or the
polynomial decay that large-batch LARS training uses (You et al. 2017; the MLPerf ResNet-50 reference: power 2).

The schedule is a pure function of the optimizer step, so a resumed run continues exactly where it
stopped, and the lr is set before every step. ``schedule.stepping=epoch`` instead holds it for a whole epoch, as
timm's train.py steps its schedulers by default (CosineLRScheduler and friends with warmup_prefix=False): epoch e
warms up as warmup_lr + e (eta - warmup_lr) / W for e < W, then decays at t = e of T = the run's epochs, warmup
included (step decay stays at its milestones; timm's multistep decays an epoch earlier); for comparing with timm
runs (it is not the paper's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


def scaled_lr(base_lr_per_256: float, global_batch: int, ref_batch: int = 256) -> float:
    """Linear scaling rule: eta = base_lr x B / 256, B the GLOBAL batch (all processes, all accumulation)."""
    return base_lr_per_256 * global_batch / ref_batch


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float  # eta, reached at the end of warmup
    total_steps: int  # optimizer steps of the whole run
    warmup_steps: int = 0  # m: linear warmup over the first m steps
    decay: str = "cosine"  # cosine | step | poly | constant, over the steps after warmup
    milestones: tuple[int, ...] = ()  # step decay: optimizer steps at which lr is multiplied by gamma
    gamma: float = 0.1
    power: float = 2.0  # poly decay: the exponent ...
    end_lr: float = 0.0  # ... and the lr it decays to
    epoch_steps: int = 0  # stepping per epoch (timm's): optimizer steps per epoch; 0: per iteration (the paper's)
    warmup_lr: float = 0.0  # stepping per epoch: the lr of the first warmup epoch (timm's warmup_lr)

    def __call__(self, step: int) -> float:
        """lr of 0-based optimizer step ``step``.

        Warmup: the paper's i-th batch (1 <= i <= m) gets i x eta / m, so step s < m gets (s + 1) x eta / m
        and the last warmup step reaches eta. Cosine: eta_t = 1/2 (1 + cos(t pi / T)) eta with t = s - m
        the step after warmup and T = total - m. Poly: eta_t = (eta - end) (1 - t / T)^power + end.
        """
        if self.epoch_steps:
            return self.per_epoch(step // self.epoch_steps)
        if step < self.warmup_steps:
            return (step + 1) * self.peak_lr / self.warmup_steps
        if self.decay == "cosine":
            t, T = step - self.warmup_steps, max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(t, T) / T)) * self.peak_lr
        if self.decay == "poly":
            t, T = step - self.warmup_steps, max(1, self.total_steps - self.warmup_steps)
            return (self.peak_lr - self.end_lr) * (1 - min(t, T) / T) ** self.power + self.end_lr
        if self.decay == "step":
            return self.peak_lr * self.gamma ** sum(step >= m for m in self.milestones)
        if self.decay == "constant":
            return self.peak_lr
        raise ValueError(f"unknown lr decay {self.decay!r}: use cosine, step, poly or constant")

    def per_epoch(self, epoch: int) -> float:
        """timm's epoch-stepped schedule (warmup_prefix=False): the lr of every step of ``epoch``."""
        warmup, epochs = self.warmup_steps / self.epoch_steps, self.total_steps // self.epoch_steps
        if epoch < warmup:
            return self.warmup_lr + epoch * (self.peak_lr - self.warmup_lr) / warmup
        t = min(epoch, epochs) / max(1, epochs)
        if self.decay == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t)) * self.peak_lr
        if self.decay == "poly":
            return (self.peak_lr - self.end_lr) * (1 - t) ** self.power + self.end_lr
        return LRSchedule(self.peak_lr, self.total_steps, 0, self.decay, self.milestones, self.gamma)(
            epoch * self.epoch_steps
        )


def build_schedule(sched_cfg, base_lr_per_256: float, ref_batch: int, global_batch: int, steps_per_epoch: int):
    """The run's schedule from ``schedule.*`` and ``optim.*`` settings, in optimizer steps."""
    peak_lr = scaled_lr(base_lr_per_256, global_batch, ref_batch)
    if sched_cfg.decay == "poly" and sched_cfg.end_lr > peak_lr:
        raise ConfigError(
            f"schedule.end_lr={sched_cfg.end_lr:g} is above the peak lr {peak_lr:g} (optim.base_lr_per_256 x "
            f"global batch {global_batch} / {ref_batch}): poly decay would rise; lower schedule.end_lr"
        )
    return LRSchedule(
        peak_lr=peak_lr,
        total_steps=sched_cfg.epochs * steps_per_epoch,
        warmup_steps=round(sched_cfg.warmup_epochs * steps_per_epoch),
        decay=sched_cfg.decay,
        milestones=tuple(e * steps_per_epoch for e in sched_cfg.step_milestones),
        gamma=sched_cfg.step_gamma,
        power=sched_cfg.poly_power,
        end_lr=sched_cfg.end_lr,
        epoch_steps=steps_per_epoch if sched_cfg.stepping == "epoch" else 0,
        warmup_lr=sched_cfg.warmup_lr,
    )
