"""The run's state in one home: ``RunState`` is a checkpoint's meta.pt, and ``RunCheckpoint`` saves and resumes it
with the strategy's files and the EMA.

meta.pt holds the counters (epoch, step in the epoch, global step, whether the epoch's evaluation is pending), the
layout of the global batch, every process's RNG states, the fp16 loss-scale guard, the W&B run id, the summary
(best and final top-1/top-5), and the config with the model's name, classes and the version that wrote it. What
may change on resume is the config's ``resumable`` fields, and the split of a fixed global batch over processes
(``check_run_dir``, ``Layout.check``). The files of a checkpoint are named once, in checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
import yaml

from ..checkpoint import (
    EMA_FILE,
    FORMAT_VERSION,
    META_FILE,
    agree_on_checkpoint,
    check_state_dict,
    device_rng_state,
    read_file,
    read_meta,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_file,
)
from ..config import Config, resumable_keys, to_dict
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


@dataclass
class RunState:
    """Where the run stands: the counters and records a checkpoint's meta.pt holds (``meta`` adds the layout, the
    RNG states and the config), restored by ``RunCheckpoint.resume``."""

    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done in the whole run
    wandb_id: str | None = None  # the W&B run that a resumed run continues
    guard: dict = field(default_factory=dict)  # the fp16 loss-scale guard's counters
    pending_eval: bool = False  # epoch `epoch` is trained but not yet evaluated (stopped at its last step)
    summary: dict = field(default_factory=dict)  # best and final top-1/top-5 so far (tracking.updated_summary)

    @classmethod
    def from_meta(cls, meta: dict) -> RunState:
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})


class RunCheckpoint:
    """Saves a run's checkpoints into ``<run dir>/checkpoints`` and resumes from the newest that every process reads
    completely: meta.pt (the RunState), the strategy's files, and the EMA's ema.pt."""

    def __init__(self, run_dir: Path, cfg: Config, env, layout: Layout, model, guard):
        """``model``: the train.build.Model of the run (its strategy, EMA, classes); ``guard``: the fp16 loss-scale
        guard, whose counters the state carries."""
        self.folder, self.cfg, self.env, self.layout, self.model, self.guard = (
            run_dir / "checkpoints",
            cfg,
            env,
            layout,
            model,
            guard,
        )

    def read(self, path: Path) -> tuple[dict, object, dict | None]:
        """A checkpoint's meta, this process's strategy state and EMA share, read and checked, nothing applied."""
        cfg, m = self.cfg, self.model
        meta = read_meta(path)
        if meta["model_name"] != cfg.model.name or meta["num_classes"] != m.num_classes:
            raise RunError(
                f"checkpoint {path} is of {meta['model_name']} with {meta['num_classes']} classes, but this run "
                f"builds {cfg.model.name} with {m.num_classes}: use another run.name"
            )
        self.layout.check(path, meta.get("layout"), self.env.is_main)
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

    def resume(self) -> RunState:
        """The state of the checkpoint rank 0 chose (the newest that every process reads completely), applied only
        after every process has read and checked its part; a fresh state when there is none."""
        if self.env.is_main:
            for stale in remove_stale_temporaries(self.folder):
                log.info("removed %s, left by a checkpoint write that did not finish", stale)
        found = agree_on_checkpoint(self.folder, self.read)
        if found is None:
            return RunState()
        path, (meta, strategy_state, ema_share) = found
        self.model.strategy.apply(strategy_state)
        if self.model.ema is not None:
            self.model.ema.load_share(ema_share)
        state = RunState.from_meta(meta)
        self.guard.load_state_dict(state.guard)
        set_rng_state(meta["rng"], self.env.device, self.env.rank)
        if self.env.is_main:
            log.info("resumed from %s: epoch %d, step %d", path, state.epoch, state.epoch_step)
        return state

    def meta(self, state: RunState) -> dict:
        """meta.pt of ``state`` (a collective: every rank's GPU RNG state is gathered)."""
        env, m = self.env, self.model
        state.guard = self.guard.state_dict()
        cuda_by_rank = [device_rng_state(env.device)]  # each rank's own GPU (a collective, on every rank)
        if env.distributed:
            cuda_by_rank = [None] * env.world_size
            dist.all_gather_object(cuda_by_rank, device_rng_state(env.device))
        return dataclasses.asdict(state) | {
            "format": FORMAT_VERSION,
            "layout": dataclasses.asdict(self.layout),
            "rng": rng_state(cuda_by_rank),
            "config": to_dict(self.cfg),
            "model_name": self.cfg.model.name,
            "num_classes": m.num_classes,
            "dist_bot": source_info(),  # the version and commit that wrote this checkpoint
            "class_names": m.class_names,  # label i's class folder: exports and predict name them
        }

    def save(self, state: RunState) -> None:
        meta, m = self.meta(state), self.model

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
