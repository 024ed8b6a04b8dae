"""DeepSpeed ZeRO stages 0-2: optimizer state (1), and gradients (2) partitioned over processes.

dist_bot's own optimizer (no-bias-decay groups, Nesterov SGD) and its per-iteration lr drive DeepSpeed
(the lr is written into the param groups before every step). fp16 uses DeepSpeed's dynamic loss scaling,
configured from ``loss_scale.*``; bf16 and fp32 keep fp32 weights and run under dist_bot's autocast, as the
other strategies do (DeepSpeed's plain ``bf16`` mode breaks BatchNorm). Started by torchrun or srun like
the others; the deepspeed launcher is not needed.

Accumulation: each micro-batch's backward goes through ``engine.backward`` (unscaled by the accumulation
count: dist_bot already weights micro-batches so their sum is the step's mean) with the accumulation
boundary set explicitly, so ranks whose last step holds fewer micro-batches still reduce together.

As under DDP and FSDP2, rank 0's BatchNorm statistics are broadcast before every training forward (a forward
pre-hook), so all strategies keep them by one rule. A step whose loss is not finite on any rank (an inf/NaN
from the data) is skipped on every rank: the flag is reduced over ranks on the device and handed to the fused
SGD kernel, which then changes nothing (DeepSpeed itself skips fp16 overflows, and ZeRO 1-2 a non-finite
gradient norm).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import MODEL_FILE, check_state_dict, read_model, verify_file, write_file
from ..errors import CheckpointError, UserError
from ..recipe.ema import balanced_owners
from ..recipe.lars import LARS, FlatPartition
from .env import DistEnv, average_buffers, broadcast_buffers
from .strategy import fused, set_lr, skip_flag, zero_momentum


def deepspeed_config(cfg, world_size: int) -> dict:
    """dist_bot's settings as a DeepSpeed config."""
    accum = cfg.optim.grad_accum_steps
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.data.batch_size * accum * world_size,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "zero_allow_untested_optimizer": True,  # dist_bot's torch SGD, which ZeRO 1-2 partition fine
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
        "steps_per_print": 2**31 - 1,
    }
    if cfg.precision == "fp16":
        ls = cfg.loss_scale
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": round(math.log2(ls.init_scale)),
            "loss_scale_window": ls.growth_interval,
            "hysteresis": 1,  # lower the scale at the first overflow, as GradScaler does
            "min_loss_scale": ls.min_scale,
        }
        ds["data_types"] = {"buffer_dtype": "fp16"}  # BatchNorm buffers must follow the fp16 weights
    return ds


def describe_zero_partitions(zero, lars: LARS) -> None:
    """Tell LARS which parameter each stretch of ZeRO 1-2's flat partitions belongs to, so that it takes each
    parameter's norm over the whole tensor (DeepSpeed 0.19's layout, stage_1_and_2.py: group i's parameters, in
    ``round_robin_bit16_groups[i]`` order, start at ``round_robin_bit16_offsets[i]`` in one flat buffer with
    alignment padding between them and at the end; rank r steps elements [r s, (r + 1) s) of it, s =
    ``partition_size[i]``, as the flat fp32 tensor ``single_partition_of_fp32_groups[i]``)."""
    needed = (
        "single_partition_of_fp32_groups",
        "round_robin_bit16_meta",
        "round_robin_bit16_offsets",
        "partition_size",
    )
    if not all(hasattr(zero, a) for a in needed):
        raise UserError(
            "optim.name=lars under ZeRO 1-2 reads DeepSpeed's partition layout, which this DeepSpeed version "
            f"({type(zero).__name__}) does not expose: use strategy=fsdp or ddp, or dist.zero_stage=0"
        )
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        group = zero.real_dp_process_group[i]
        size = int(zero.partition_size[i])
        start = size * dist.get_rank(group=group)
        end, pos = start + size, start
        lengths, keys = [], []
        metas, offsets = zero.round_robin_bit16_meta[i], zero.round_robin_bit16_offsets[i]
        for key, (meta, offset) in enumerate(zip(metas, offsets, strict=True)):
            lo, hi = max(offset, start), min(offset + meta.numel(), end)
            if lo >= hi:
                continue
            if lo > pos:  # alignment padding before this parameter
                lengths.append(lo - pos), keys.append(None)
            lengths.append(hi - lo), keys.append(key)
            pos = hi
        if end > pos:
            lengths.append(end - pos), keys.append(None)
        lars.set_flat_partition(flat, FlatPartition(tuple(lengths), tuple(keys), len(metas), group))


class DeepSpeedStrategy:
    def __init__(self, model: nn.Module, make_optimizer, env: DistEnv, cfg):
        import deepspeed

        if cfg.precision == "fp16" and cfg.dist.zero_stage == 0:
            # DeepSpeed 0.19: ZeRO-0 + fp16 + a torch optimizer unscales updates it never scaled (65536x too small)
            raise UserError("strategy=deepspeed with precision=fp16 needs dist.zero_stage=1 or 2 (stage 0 is broken)")
        if cfg.precision == "fp16" and not deepspeed.get_accelerator().is_fp16_supported():
            raise UserError(
                "strategy=deepspeed with precision=fp16 needs a GPU, or a CPU with AVX512-FP16/AMX-FP16; "
                "use precision=bf16 here"
            )
        if cfg.dist.zero_stage > 2:
            raise UserError("strategy=deepspeed supports dist.zero_stage 0, 1 and 2; for sharded parameters use fsdp")
        self.env = env
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        if env.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at its first start in each new
            # environment (35-300 s of CPU) that serves only its tensor-parallel inference (inference_all_reduce);
            # ZeRO's collectives go through torch.distributed. Marked incompatible, it is never built.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend)  # wraps the process group dist_bot already made
        model = model.to(memory_format=torch.contiguous_format)  # ZeRO flattens parameters
        self.optimizer = make_optimizer(model)  # ZeRO 1-2 keep this object, with their flat partitions as params
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=deepspeed_config(cfg, env.world_size)
        )
        zero_momentum(self.optimizer)
        if isinstance(self.optimizer, LARS) and cfg.dist.zero_stage in (1, 2):
            describe_zero_partitions(self.engine.optimizer, self.optimizer)
        if env.distributed:
            self.engine.module.register_forward_pre_hook(self._broadcast_buffers)
        self.model = self.engine
        self.fp16 = cfg.precision == "fp16"
        self._boundary = True
        self._loss_nonfinite = torch.zeros((), device=env.device)  # 1.0 once a micro-batch's loss is inf/NaN

    def _broadcast_buffers(self, module: nn.Module, args=None) -> None:
        """Forward pre-hook: rank 0's BN statistics on every rank before a training forward (DDP's rule)."""
        if module.training:
            broadcast_buffers(module)

    def backward(self, loss: torch.Tensor) -> None:
        self._loss_nonfinite = torch.maximum(self._loss_nonfinite, (~loss.detach().isfinite()).float())
        self.engine.set_gradient_accumulation_boundary(self._boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self._boundary:
            self.engine.step()  # off the boundary DeepSpeed only counts the micro-batch

    def step(self) -> torch.Tensor:
        """As ScaledOptimizer.step. DeepSpeed checks fp16 overflow on the host (it waits for the GPU there)."""
        found_inf, self._loss_nonfinite = self._loss_nonfinite, torch.zeros_like(self._loss_nonfinite)
        if self.env.distributed:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)  # every rank skips together
        skipped = self.engine.skipped_steps
        self.engine.set_gradient_accumulation_boundary(True)
        with skip_flag(self.optimizer, found_inf) if fused(self.optimizer) else contextlib.nullcontext():
            self.engine.step()
        return (found_inf == 0) & (self.engine.skipped_steps == skipped)

    @contextlib.contextmanager
    def no_sync(self):
        self._boundary = False
        try:
            yield
        finally:
            self._boundary = True

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine.optimizer.param_groups, lr)

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "cur_scale", 1.0)) if self.fp16 else 1.0

    loss_scale_async = loss_scale  # DeepSpeed keeps its scale on the host

    def eval_model(self, sync_buffers: bool = True) -> nn.Module:
        module = self.engine.module  # ZeRO 0-2 keep every parameter on every rank
        if sync_buffers:
            average_buffers(module, self.env)
        return module

    def ema_source(self) -> tuple[nn.Module, dict[str, int]]:
        """Every rank holds every parameter (ZeRO 0-2 partition only the optimizer state and gradients), so the
        EMA is split by whole parameters: each rank averages those ``balanced_owners`` assigns it, about
        1/world_size of the weights, read from the module (fp32; fp16 under DeepSpeed's fp16 mode, averaged in
        fp32). Not ZeRO's own partitions: they are flat slices inside DeepSpeed's optimizer, an internal layout
        that would tie ema.pt's assembly to DeepSpeed's version."""
        module = self.engine.module
        sizes = {name: p.numel() for name, p in module.named_parameters()}
        return module, balanced_owners(sizes, self.env.world_size)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)  # collective first
        if self.env.is_main:
            full = {k: v.float() if v.is_floating_point() else v for k, v in self.engine.module.state_dict().items()}
            write_file(full, folder / MODEL_FILE)

    def read(self, folder: Path) -> Path:
        """Check the checkpoint without applying it: every DeepSpeed file read back against its CRCs (DeepSpeed
        itself loads them with full pickle, and applies as it reads), and rank 0 checks model.pt."""
        state = folder / "deepspeed" / "state"
        if not (state / "mp_rank_00_model_states.pt").is_file():
            raise CheckpointError(f"checkpoint {folder / 'deepspeed'} has no DeepSpeed state")
        for f in sorted(state.glob("*.pt")):
            verify_file(f)
        if self.env.is_main:
            check_state_dict(read_model(folder), self.engine.module.state_dict(), folder / MODEL_FILE)
        return folder

    def apply(self, folder: Path) -> None:
        try:
            path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        except Exception as e:  # after read() checked every file: the state may be half applied, so stop
            raise RuntimeError(f"DeepSpeed could not load {folder / 'deepspeed'}: {type(e).__name__}: {e}") from e
        if path is None:
            raise RuntimeError(f"DeepSpeed found no state in {folder / 'deepspeed'}")
