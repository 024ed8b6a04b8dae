"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded over
processes; each residual block is all-gathered just in time for its forward and backward.

Weights stay fp32 and autocast runs the low-precision math, so BatchNorm keeps fp32 parameters and buffers
(an FSDP bf16 ``MixedPrecisionPolicy`` breaks BatchNorm on CPU). BN buffers are not sharded; like DDP, rank
0's are broadcast before every training forward, so every rank normalizes with the same running statistics.
Checkpoints: the sharded model and optimizer through torch.distributed.checkpoint (``dcp/``, loadable at a
different world size) plus the full weights in one ``model.pt``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils._pytree import tree_map

from ..checkpoint import MODEL_FILE, TRAIN_STATE_FILE, check_state_dict, read_file, read_model, write_file
from ..errors import CheckpointError, UserError
from ..models.resnet import BasicBlock, Bottleneck
from .env import DistEnv, average_buffers, broadcast_buffers
from .strategy import ScaledOptimizer


class FSDPStrategy(ScaledOptimizer):
    def __init__(self, model: nn.Module, make_optimizer, env: DistEnv, cfg):
        if not env.distributed:
            raise UserError("strategy=fsdp shards over processes: start 2 or more with torchrun or srun, or use ddp")
        self.env = env
        # FSDP2's forward all-gathers parameters (a collective), but exact evaluation runs a different number
        # of batches on each rank: it uses this plain twin, loaded with the full weights.
        self.plain = copy.deepcopy(model)
        # FSDP2 shards flat, contiguous parameters: channels_last conv weights go back to NCHW (activations stay
        # channels_last, which is what picks the fast convolution kernels).
        model = model.to(memory_format=torch.contiguous_format)
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        reshard = cfg.dist.fsdp_reshard_after_forward
        for m in model.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                fully_shard(m, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        self.model = self.module = model
        model.register_forward_pre_hook(self._broadcast_buffers)
        self.init_steps(make_optimizer(model), env, cfg)  # after sharding: the optimizer holds the local shards

    def _broadcast_buffers(self, module: nn.Module, args=None) -> None:
        """Forward pre-hook: rank 0's BN statistics on every rank before a training forward (DDP's rule)."""
        if module.training:
            self._buffers_from_rank0()

    def _buffers_from_rank0(self) -> None:
        broadcast_buffers(self.model)

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _full_state(self, cpu_offload: bool) -> dict:
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))

    def eval_model(self, sync_buffers: bool = True) -> nn.Module:
        if sync_buffers:
            average_buffers(self.model, self.env)
        self.plain.load_state_dict(self._full_state(cpu_offload=False))
        return self.plain

    def ema_source(self) -> tuple[nn.Module, dict[str, int]]:
        return self.model, {}  # every rank averages its own shard of every parameter

    def save(self, folder: Path) -> None:
        # Rank 0's BN statistics everywhere (the next training forward would broadcast them anyway): the
        # checkpoint must not depend on which rank's copy torch.distributed.checkpoint keeps.
        self._buffers_from_rank0()
        full = self._full_state(cpu_offload=True)  # collective; only rank 0 receives the tensors
        dcp.save(self._sharded_state(), checkpoint_id=folder / "dcp")  # collective; fails on every rank together
        if self.env.is_main:  # the local writes last: a full disk here leaves no other rank inside a collective
            write_file(full, folder / MODEL_FILE)
            write_file({"scaler": self.scaler.state_dict()}, folder / TRAIN_STATE_FILE)

    def _sharded_state(self) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
        }

    def read(self, folder: Path) -> dict:
        """This rank's shards of the checkpoint (resharded to this world size by torch.distributed.checkpoint),
        read into copies: nothing is applied until ``apply``. Rank 0 also checks the full weights in model.pt."""
        live = self._sharded_state()
        state = tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v), live)
        try:
            dcp.load(state, checkpoint_id=folder / "dcp")  # collective: a rank's failure is raised on every rank
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            raise CheckpointError(f"checkpoint {folder / 'dcp'} is unreadable ({reason})") from None
        train_state = read_file(folder / TRAIN_STATE_FILE)
        if self.env.is_main:
            check_state_dict(read_model(folder), self.plain.state_dict(), folder / MODEL_FILE)
        return state | {"scaler": train_state["scaler"]}

    def apply(self, state: dict) -> None:
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
