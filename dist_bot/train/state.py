"""The run's state in one home. ``RunState`` is where the run stands and what a checkpoint's meta.pt holds:
``state_dict()`` IS meta.pt and ``load_state_dict`` restores it (the Stateful protocol of torchtitan and
torch.distributed.checkpoint). ``RunCheckpoint`` saves it with the strategy's files and the EMA, and resumes all
three, in this module alone.

meta.pt holds the counters (epoch, step in the epoch, global step, whether the epoch's evaluation is pending), the
W&B run id and the summary (best and final top-1/top-5): RunState's own fields; the layout of the global batch,
the fp16 loss-scale guard's counters and every process's RNG states: its parts, each with its own
``state_dict``; and what the checkpoint is of (the config, the model's name, classes and class names, the version
that wrote it), which ``check`` compares before anything is applied. What may change on resume is the config's
``resumable`` fields and the split of a fixed global batch over processes (``check_run_dir``, ``Layout.check``).
The files of a checkpoint are named once, in checkpoint.py, which knows folders and files, not what is in them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..checkpoint import (
    CHECKPOINTS,
    EMA_FILE,
    FORMAT_VERSION,
    META_FILE,
    agree_on_checkpoint,
    check_state_dict,
    list_checkpoints,
    read_file,
    read_meta,
    remove_stale_temporaries,
    save_checkpoint,
    write_file,
)
from ..config import Config, resumable_keys, to_dict
from ..distributed.env import all_reduce_max
from ..distributed.strategy import LossScaleGuard
from ..distributed.watchdog import HEARTBEAT
from ..errors import CheckpointError, RunError
from ..provenance import source_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """How the global batch is made on this run's processes; a checkpoint records it, and resuming checks it."""

    world_size: int
    global_batch: int
    batch_size: int  # images per process per micro-batch
    grad_accum_steps: int
    steps_per_epoch: int

    def check(self, path: Path, saved: dict | None, is_main: bool) -> None:
        """The global batch (so the lr, the steps per epoch and the data plan) a checkpoint continues must be the
        one it was written with; the split over processes may change when data.global_batch_size fixes it."""
        now = dataclasses.asdict(self)
        if saved is None or saved == now:
            return
        if saved["global_batch"] != now["global_batch"]:
            raise RunError(
                f"checkpoint {path} was written by {saved['world_size']} process(es) x {saved['batch_size']} images x "
                f"{saved['grad_accum_steps']} accumulation = global batch {saved['global_batch']}; with "
                f"{now['world_size']} process(es) this run's global batch is {now['global_batch']}, which would change "
                f"the learning rate, the steps per epoch and the data plan. Resume with {saved['world_size']} "
                f"process(es), or set data.global_batch_size={saved['global_batch']} (in the recipe, from the start) "
                "to keep the recipe at any number of processes"
            )
        if saved["steps_per_epoch"] != now["steps_per_epoch"]:
            raise RunError(
                f"checkpoint {path} was written with {saved['steps_per_epoch']} steps per epoch by "
                f"{saved['world_size']} process(es), and the same global batch makes {now['steps_per_epoch']} with "
                f"{now['world_size']} process(es): the epoch's last, shorter step is folded into the one before "
                "when it cannot give every process at least 2 images. Resume with "
                f"{saved['world_size']} process(es), or with a number for which the last step splits the same way"
            )
        if is_main:
            log.info(
                "continuing a checkpoint of %d process(es) x %d x %d on %d x %d x %d: global batch %d, the same plan",
                *(saved[k] for k in ("world_size", "batch_size", "grad_accum_steps")),
                *(now[k] for k in ("world_size", "batch_size", "grad_accum_steps", "global_batch")),
            )


class ProcessRng:
    """Every process's random generators as one part of the run state: Python's, NumPy's, torch's CPU generator,
    and each rank's own GPU generator (saving gathers them: a collective; each process restores its own)."""

    def __init__(self, env):
        self.env = env

    def state_dict(self) -> dict:
        """This process's CPU, Python and NumPy generators, and the state of each rank's own GPU (a collective)."""
        env = self.env
        cuda_by_rank = [device_rng_state(env.device)]
        if env.distributed:
            cuda_by_rank = [None] * env.world_size
            dist.all_gather_object(cuda_by_rank, device_rng_state(env.device))
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda_by_rank": cuda_by_rank,
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state`` in this process: the CPU generators, and the state its own GPU had when saved, never
        the states of GPUs it does not see. A resume on another world size leaves the GPU generators of the new
        ranks as seeded. An older checkpoint holds rank 0's ``get_rng_state_all()`` under "cuda" (one state per
        GPU that rank 0 saw; restoring all of them failed on a host that sees fewer): its entry for this
        process's GPU, if there is one."""
        device, rank = self.env.device, self.env.rank
        torch.set_rng_state(state["torch"])
        if device.type == "cuda":
            own = state.get("cuda_by_rank") or []
            if rank < len(own) and own[rank] is not None:
                torch.cuda.set_rng_state(own[rank], device)
            elif not own and device.index is not None and device.index < len(state.get("cuda") or []):
                torch.cuda.set_rng_state(state["cuda"][device.index], device)
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def has_checkpoints(run_dir: Path, env) -> bool:
    """Whether any process sees a checkpoint in the run folder: the run resumes (model.init_from does not apply)."""
    return all_reduce_max([float(bool(list_checkpoints(run_dir / CHECKPOINTS)))], env)[0] > 0


def run_identity(cfg: Config, model) -> dict:
    """What a checkpoint is of: the config, the model's name and classes (``model``: train.build.Model)."""
    return {
        "config": to_dict(cfg),
        "model_name": cfg.model.name,
        "num_classes": model.num_classes,
        "class_names": model.class_names,  # label i's class folder: exports and predict name them
        "class_descriptions": model.class_descriptions,  # name -> description, where the data has them
    }


@dataclass
class RunState:
    """Where the run stands, and a checkpoint's meta.pt (see the module docstring)."""

    layout: Layout  # the global batch's split: saved, and checked on resume
    guard: LossScaleGuard  # the fp16 loss-scale guard, whose counters are saved
    rng: ProcessRng
    identity: dict  # run_identity: what a checkpoint of this run is of
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done in the whole run
    pending_eval: bool = False  # epoch `epoch` is trained but not yet evaluated (stopped at its last step)
    wandb_id: str | None = None  # the W&B run that a resumed run continues
    summary: dict = field(default_factory=dict)  # best and final top-1/top-5 so far (tracking.updated_summary)

    COUNTERS = ("epoch", "epoch_step", "global_step", "pending_eval", "wandb_id", "summary")

    def state_dict(self) -> dict:
        """meta.pt: a collective (the RNG states of every rank's GPU are gathered), on every process."""
        return (
            {k: getattr(self, k) for k in self.COUNTERS}
            | self.identity
            | {
                "format": FORMAT_VERSION,
                "layout": dataclasses.asdict(self.layout),
                "guard": self.guard.state_dict(),
                "rng": self.rng.state_dict(),
                "dist_bot": source_info(),  # the version and commit that wrote this checkpoint
            }
        )

    def check(self, path: Path, meta: dict, is_main: bool) -> None:
        """Refuse the meta.pt of another model, or of a global batch this run does not make."""
        if meta["model_name"] != self.identity["model_name"] or meta["num_classes"] != self.identity["num_classes"]:
            raise RunError(
                f"checkpoint {path} is of {meta['model_name']} with {meta['num_classes']} classes, but this run "
                f"builds {self.identity['model_name']} with {self.identity['num_classes']}: use another run.name"
            )
        self.layout.check(path, meta.get("layout"), is_main)

    def load_state_dict(self, meta: dict) -> None:
        for k in self.COUNTERS:
            if k in meta:
                setattr(self, k, meta[k])
        self.guard.load_state_dict(meta.get("guard") or {"steps_at_min": 0, "skipped_total": 0})
        self.rng.load_state_dict(meta["rng"])


class RunCheckpoint:
    """Saves a run's checkpoints into ``<run dir>/checkpoints`` and resumes from the newest that every process reads
    completely: meta.pt (the RunState), the strategy's files, and the EMA's ema.pt."""

    def __init__(self, run_dir: Path, cfg: Config, env, model):
        """``model``: the train.build.Model of the run (its strategy, EMA, classes)."""
        self.folder, self.cfg, self.env, self.model = run_dir / CHECKPOINTS, cfg, env, model

    def read(self, path: Path, state: RunState) -> tuple[dict, object, dict | None]:
        """A checkpoint's meta, this process's strategy state and EMA share, read and checked, nothing applied."""
        m = self.model
        meta = read_meta(path)
        state.check(path, meta, self.env.is_main)
        strategy_state = m.strategy.read(path)  # its collectives first: the EMA is read locally
        return meta, strategy_state, self.read_ema(path) if m.ema is not None else None

    def read_ema(self, path: Path) -> dict:
        """This process's share of the checkpoint's ema.pt, checked against the model."""
        file = path / EMA_FILE
        if not file.is_file():  # model.ema_* cannot change on resume: a checkpoint of this run has one
            raise CheckpointError(f"checkpoint {path} has no {EMA_FILE}, which a run with model.ema_decay writes")
        full = read_file(file)
        check_state_dict(full, self.model.ema_module.state_dict(), file)
        return self.model.ema.share_of(full)

    def resume(self, state: RunState) -> None:
        """Restore ``state``, the strategy and the EMA from the checkpoint rank 0 chose (the newest that every
        process reads completely), applied only after every process has read and checked its part; ``state`` is
        left as it is (a fresh run) when there is none."""
        if self.env.is_main:
            for stale in remove_stale_temporaries(self.folder):
                log.info("removed %s, left by a checkpoint write that did not finish", stale)
        found = agree_on_checkpoint(self.folder, lambda path: self.read(path, state))
        if found is None:
            return
        path, (meta, strategy_state, ema_share) = found
        self.model.strategy.apply(strategy_state)
        if self.model.ema is not None:
            self.model.ema.load_share(ema_share)
        state.load_state_dict(meta)
        if self.env.is_main:
            log.info("resumed from %s: epoch %d, step %d", path, state.epoch, state.epoch_step)

    def save(self, state: RunState) -> None:
        meta, m = state.state_dict(), self.model

        def write(folder: Path) -> None:
            ema = m.ema.full_state() if m.ema is not None else None  # a collective: before any local write
            m.strategy.save(folder)
            if self.env.is_main:
                write_file(meta, folder / META_FILE)
                if ema is not None:  # model.pt's keys and format: read like it (dist-bot eval, export, teachers)
                    write_file({k: v.cpu() for k, v in ema.items()}, folder / EMA_FILE)

        save_checkpoint(self.folder, state.global_step, self.cfg.run.keep_checkpoints, write)
        HEARTBEAT.beat(f"the checkpoint of step {state.global_step}")


def flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


# what may be in a run folder before its run: `dist-bot doctor`'s report, the hang watchdog's folder (made at start
# on GPUs, for NCCL's flight recorder)
BEFORE_A_RUN = {"doctor.json", "hang"}


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to reuse a folder that holds another run; allow continuing the same run (run.resume=auto)."""
    saved = run_dir / "config.yaml"
    if not run_dir.exists() or all(p.name in BEFORE_A_RUN for p in run_dir.iterdir()):
        return
    if not saved.exists():
        raise RunError(f"{run_dir} exists and is not a dist_bot run folder: choose another run.name or run.out_dir")
    if cfg.run.resume == "never":
        raise RunError(f"run folder {run_dir} already exists and run.resume=never: choose another run.name")
    old, new = flat_keys(yaml.safe_load(saved.read_text())), flat_keys(to_dict(cfg))
    old = flat_keys(to_dict(Config())) | old  # a setting added since the run started has its default there
    # with a global batch, the per-process batch follows the world size, which may change on resume
    may_change = set(resumable_keys())  # the fields marked param(resumable=True) in config.py
    if cfg.data.global_batch_size:
        may_change |= {"data.batch_size"} | ({"optim.grad_accum_steps"} if cfg.data.max_batch_size else set())
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in may_change)
    if differ:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:6])
        raise RunError(
            f"run folder {run_dir} holds a run with a different config ({changes}). It is not overwritten: "
            "choose another run.name, or restore those settings to resume it"
        )
