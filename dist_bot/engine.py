"""The training loop: the paper's algorithm, one iteration at a time.

For each optimizer step: set the lr from the schedule; for each micro-batch the data plan hands over (images,
labels, loss weight, mixup seed): smooth the labels, mix the batch, forward under autocast (the frozen teacher
sees the same mixed images), loss, backward through the strategy (no gradient sync until the last
micro-batch); then step (skipped on fp16 overflow). Every ``run.log_every_steps`` steps: log, and agree over
all processes whether to stop. After each epoch: exact evaluation over the whole validation set, then a
checkpoint.

Between two log steps nothing waits for the device: the loss, the fp16 skip flag and the loss-scale guard stay
device tensors, mixup pairs on the device, the stop flag is agreed only at log steps (``run.stop_after_steps``
needs no agreement: every process counts the same steps). So the host queues work ahead of the GPU and the
next batch is fetched while the GPU still computes (tests/test_sync_free.py counts the sync points).

    run = Trainer(cfg, env); run.fit()        # what `dist-bot train` does on every process
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from .checkpoint import (
    EMA_FILE,
    FORMAT_VERSION,
    META_FILE,
    CheckpointError,
    agree_on_checkpoint,
    check_state_dict,
    device_rng_state,
    list_checkpoints,
    load_checkpoint,
    read_file,
    read_meta,
    remove_stale_temporaries,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_file,
)
from .config import Config, from_dict, profile_window, resumable_keys, to_dict, to_yaml
from .data import make_loaders
from .data.plan import MicroBatch, Step
from .distributed import build_strategy
from .distributed.env import DistEnv, all_reduce_max, any_rank, local_peak_memory_mb
from .distributed.strategy import LossScaleGuard, autocast
from .distributed.watchdog import HEARTBEAT
from .errors import DataError, RunError, UserError
from .models import build_model
from .profiling import StepProfiler
from .provenance import config_header, source_info
from .recipe.ema import ModelEma
from .recipe.lars import make_lars
from .recipe.losses import distillation_loss, smooth_targets, soft_cross_entropy
from .recipe.lr import build_schedule
from .recipe.mixup import mixup
from .recipe.param_groups import param_groups
from .recipe.sgd import make_sgd
from .signals import PREEMPTION
from .tracking import Progress, Tracker, updated_summary

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the sbatch script and launchers requeue on it


class Preempted(Exception):
    """The run checkpointed after a preemption signal (or run.stop_after_steps) and should be requeued.

    `signals` are those this process received (a launcher requeues on its own warning signal, but leaves a
    plain SIGTERM to Slurm); empty when the stop came from run.stop_after_steps or from another rank.
    """

    def __init__(self, step: int, signals: tuple[int, ...] = (), saved: bool = True):
        names = ", ".join(signal.Signals(s).name for s in signals) or "no signal here"
        what = f"checkpointed at step {step}" if saved else f"stopped during start-up at step {step}, nothing written"
        super().__init__(f"{what} ({names})")
        self.step, self.signals = step, signals


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


def split_global_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(images per process per micro-batch, accumulation steps) for this world size.

    With data.global_batch_size the global batch stays fixed whatever the number of processes: it is split
    exactly over processes x optim.grad_accum_steps, and when data.max_batch_size is set the accumulation
    grows to the smallest count whose micro-batch fits (1024 on 4 GPUs with max 128: 2 steps of 128).
    """
    g, accum, cap = cfg.data.global_batch_size, cfg.optim.grad_accum_steps, cfg.data.max_batch_size
    if g is None:
        return cfg.data.batch_size, accum
    if cap is not None:
        n = world_size
        fits = [a for a in range(accum, g // n + 1) if g % (n * a) == 0 and g // (n * a) <= cap]
        if not fits:
            raise UserError(
                f"data.global_batch_size={g} cannot be split over {world_size} processes into micro-batches of at "
                f"most data.max_batch_size={cap}: choose a global batch that is a multiple of {world_size}"
            )
        accum = fits[0]
    if g % (world_size * accum):
        raise UserError(
            f"data.global_batch_size={g} does not split evenly over {world_size} processes x {accum} "
            f"accumulation steps: choose a multiple of {world_size * accum}, or set optim.grad_accum_steps"
        )
    return g // (world_size * accum), accum


def evaluate(model: torch.nn.Module, loader, env: DistEnv, precision: str) -> dict:
    """top-1/top-5 (%) and mean loss over the WHOLE validation set: each image counted once over all ranks.
    The counts stay on the device until one all-reduce at the end (ranks may run different numbers of
    batches, so there is no collective per batch)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # correct@1, correct@5, loss sum, samples
    with torch.no_grad():
        for images, labels in loader:
            with autocast(precision, env.device):
                logits = model(images)
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels.unsqueeze(1)
            loss = F.cross_entropy(logits, labels, reduction="sum")
            sums[:3] += torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(), loss.double()])
            sums[3] += labels.numel()
            HEARTBEAT.beat("an evaluation batch")
    if env.distributed:
        dist.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "samples": int(n)}


def load_teacher(
    path: str, num_classes: int, env: DistEnv, channels_last: bool, weights: str = "raw"
) -> torch.nn.Module:
    """A frozen teacher from a dist_bot checkpoint folder, or from a run folder (its latest good checkpoint);
    the architecture is read from the config saved inside. ``weights``: "raw" (model.pt) or "ema" (ema.pt)."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    tcfg = from_dict(state["config"])
    if state["num_classes"] != num_classes:
        raise RunError(f"teacher {path} predicts {state['num_classes']} classes, the data has {num_classes}")
    if weights == "ema":
        if not (Path(path) / EMA_FILE).is_file():
            raise RunError(
                f"teacher {path} has no ema.pt (its run trained without model.ema_decay): "
                "set loss.distill.teacher_weights=raw, or name a teacher trained with an EMA"
            )
        state["model"] = read_file(Path(path) / EMA_FILE)
    teacher = build_model(tcfg.model.name, num_classes=num_classes)
    teacher.load_state_dict(state["model"])
    teacher.requires_grad_(False).eval().to(env.device)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher


@dataclass
class RunState:
    """Where the run stands: the counters a checkpoint's meta.pt holds (with the config and RNG states)."""

    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done in the whole run
    wandb_id: str | None = None  # the W&B run that a resumed run continues
    guard: dict = field(default_factory=dict)  # the fp16 loss-scale guard's counters
    pending_eval: bool = False  # epoch `epoch` is trained but not yet evaluated (stopped at its last step)
    summary: dict = field(default_factory=dict)  # best and final top-1/top-5 so far (tracking.updated_summary)


@dataclass
class Interval:
    """What the steps since the last log line added up to on this process."""

    loss_sum: torch.Tensor  # summed (unweighted) loss over the samples, on the device
    samples: int = 0
    steps: int = 0
    data_s: float = 0.0  # time spent waiting for the loader
    t0: float = field(default_factory=time.perf_counter)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        cfg.data.batch_size, cfg.optim.grad_accum_steps = split_global_batch(cfg, env.world_size)
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        check_run_dir(cfg, self.run_dir)
        self.train_loader, self.val_loader = make_loaders(cfg, env)
        self.num_classes = self.check_num_classes(self.train_loader.num_classes)
        self.interval = Interval(torch.zeros((), device=env.device))  # what the steps since the last log added up to
        self.strategy = self.create_strategy()  # model (zero gamma, channels_last, compiled), optimizer, wrapper
        self.ema, self.ema_module = self.create_ema()  # this process's share of the weights' EMA, or None
        self.loss_fn = self.create_loss()
        self.global_batch = cfg.data.batch_size * env.world_size * cfg.optim.grad_accum_steps
        self.schedule = build_schedule(
            cfg.schedule, cfg.optim.base_lr_per_256, cfg.optim.ref_batch, self.global_batch, len(self.train_loader)
        )
        self.teacher = self.create_teacher()
        self.guard = LossScaleGuard(cfg.loss_scale.min_scale, cfg.loss_scale.max_steps_at_min)
        self.state = self.resume()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_header() + to_yaml(cfg))
        wandb_config = to_dict(cfg) | {"dist_bot": source_info()}
        self.tracker = Tracker(cfg, self.run_dir, env.is_main, self.state.wandb_id, wandb_config)
        self.tracker.summarize(self.state.summary)  # a resumed run: its new W&B segment starts with the best so far
        self.state.wandb_id = self.tracker.wandb_id
        self.profiler = StepProfiler(profile_window(cfg.run.profile_steps), self.run_dir, env.rank, env.device)
        self.start_global_step, self.progress = self.state.global_step, Progress(False, 0)  # fit() sets both
        self.compile_logged = not cfg.model.compile

    # read-only views of the run state, for hooks and tests
    epoch = property(lambda self: self.state.epoch)
    epoch_step = property(lambda self: self.state.epoch_step)
    global_step = property(lambda self: self.state.global_step)

    # -- the parts ---------------------------------------------------------------------------------
    def check_num_classes(self, found: int) -> int:
        if self.cfg.model.num_classes not in (None, found):
            raise DataError(
                f"model.num_classes={self.cfg.model.num_classes} but {self.cfg.data.path}/train has {found} "
                "class folders: fix the data or drop model.num_classes (it defaults to the data's)"
            )
        return found

    def create_strategy(self):
        cfg, env, m = self.cfg, self.env, self.cfg.model
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = m.cudnn_benchmark  # time conv algorithms once, keep the fastest
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every process
        model = build_model(m.name, self.num_classes, zero_init_last=m.zero_gamma).to(env.device)
        if m.sync_bn and env.device.type == "cuda" and env.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if m.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if m.compile:
            model.compile(mode=m.compile_mode)  # in place: state_dict keys stay those of the plain model
        o = cfg.optim

        def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:  # the lr is set before every step
            groups = param_groups(module, o.weight_decay, o.no_bias_decay)
            if o.name == "lars":
                return make_lars(groups, o.momentum, o.nesterov, o.lars_eta, o.lars_eps)
            return make_sgd(groups, o.momentum, o.nesterov)

        return build_strategy(cfg.strategy, model, make_optimizer, self.env, cfg)

    def create_ema(self) -> tuple[ModelEma | None, torch.nn.Module | None]:
        """The EMA's share on this process, and a plain model (no wrapper, not compiled) to evaluate it in."""
        m = self.cfg.model
        if not m.ema_decay:
            return None, None
        module, owners = self.strategy.ema_source()
        with torch.random.fork_rng(devices=[]):  # its random init must not move the run's RNG stream
            plain = build_model(m.name, self.num_classes).to(self.env.device)
        plain = plain.to(memory_format=torch.channels_last) if m.channels_last else plain
        return ModelEma(module, owners, m.ema_decay, m.ema_warmup), plain.requires_grad_(False)

    def ema_eval_model(self) -> torch.nn.Module:
        """Collective: the full EMA, assembled from every process's share, in the plain model."""
        self.ema_module.load_state_dict(self.ema.full_state())
        return self.ema_module

    def create_loss(self):
        """The loss on (logits, soft targets[, teacher logits]): compiled with the model when model.compile is on."""
        d = self.cfg.loss.distill
        if d.teacher:

            def loss(logits, targets, teacher_logits):
                return distillation_loss(logits, teacher_logits, targets, d.temperature, d.hard_weight, d.soft_weight)

        else:

            def loss(logits, targets, teacher_logits=None):
                return soft_cross_entropy(logits, targets)

        return torch.compile(loss, mode=self.cfg.model.compile_mode) if self.cfg.model.compile else loss

    def create_teacher(self) -> torch.nn.Module | None:
        d, m = self.cfg.loss.distill, self.cfg.model
        if not d.teacher:
            return None
        teacher = load_teacher(d.teacher, self.num_classes, self.env, m.channels_last, d.teacher_weights)
        if m.compile:
            teacher.compile(mode=m.compile_mode)
        return teacher

    # -- checkpoints ------------------------------------------------------------------------------
    def layout(self) -> dict:
        """How the global batch is made here; meta.pt records it, and resuming checks it."""
        c = self.cfg
        return {
            "world_size": self.env.world_size,
            "global_batch": self.global_batch,
            "batch_size": c.data.batch_size,
            "grad_accum_steps": c.optim.grad_accum_steps,
            "steps_per_epoch": len(self.train_loader),
        }

    def _read(self, path: Path) -> tuple[dict, object, dict | None]:
        """A checkpoint's meta, this process's strategy state and EMA share, read and checked, nothing applied."""
        meta = read_meta(path)
        if meta["model_name"] != self.cfg.model.name or meta["num_classes"] != self.num_classes:
            raise RunError(
                f"checkpoint {path} is of {meta['model_name']} with {meta['num_classes']} classes, but this run "
                f"builds {self.cfg.model.name} with {self.num_classes}: use another run.name"
            )
        self.check_layout(path, meta.get("layout"))
        strategy_state = self.strategy.read(path)  # its collectives first: the EMA is read locally
        return meta, strategy_state, self.read_ema(path) if self.ema is not None else None

    def read_ema(self, path: Path) -> dict:
        """This process's share of the checkpoint's ema.pt, checked against the model."""
        file = path / EMA_FILE
        if not file.is_file():  # model.ema_* cannot change on resume: a checkpoint of this run has one
            raise CheckpointError(f"checkpoint {path} has no ema.pt, which a run with model.ema_decay writes")
        full = read_file(file)
        check_state_dict(full, self.ema_module.state_dict(), file)
        return self.ema.share_of(full)

    def check_layout(self, path: Path, saved: dict | None) -> None:
        """The global batch (so the lr, the steps per epoch and the data plan) a checkpoint continues must be the
        one it was written with; the split over processes may change when data.global_batch_size fixes it."""
        now = self.layout()
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
        if self.env.is_main:
            log.info(
                "continuing a checkpoint of %d process(es) x %d x %d on %d x %d x %d: global batch %d, the same plan",
                saved["world_size"],
                saved["batch_size"],
                saved["grad_accum_steps"],
                now["world_size"],
                now["batch_size"],
                now["grad_accum_steps"],
                now["global_batch"],
            )

    def resume(self) -> RunState:
        """The state of the checkpoint rank 0 chose (the newest that every process reads completely), applied only
        after every process has read and checked its part; a fresh state when there is none."""
        folder = self.run_dir / "checkpoints"
        if self.env.is_main:
            for stale in remove_stale_temporaries(folder):
                log.info("removed %s, left by a checkpoint write that did not finish", stale)
        found = agree_on_checkpoint(folder, self._read)
        if found is None:
            return RunState()
        path, (meta, strategy_state, ema_share) = found
        self.strategy.apply(strategy_state)
        if self.ema is not None:
            self.ema.load_share(ema_share)
        state = RunState(**{f.name: meta[f.name] for f in dataclasses.fields(RunState) if f.name in meta})
        self.guard.load_state_dict(state.guard)
        set_rng_state(meta["rng"], self.env.device, self.env.rank)
        if self.env.is_main:
            log.info("resumed from %s: epoch %d, step %d", path, state.epoch, state.epoch_step)
        return state

    def save(self) -> None:
        self.state.guard = self.guard.state_dict()
        cuda_by_rank = [device_rng_state(self.env.device)]  # each rank's own GPU (a collective, on every rank)
        if self.env.distributed:
            cuda_by_rank = [None] * self.env.world_size
            dist.all_gather_object(cuda_by_rank, device_rng_state(self.env.device))
        meta = dataclasses.asdict(self.state) | {
            "format": FORMAT_VERSION,
            "layout": self.layout(),
            "rng": rng_state(cuda_by_rank),
            "config": to_dict(self.cfg),
            "model_name": self.cfg.model.name,
            "num_classes": self.num_classes,
            "dist_bot": source_info(),  # the version and commit that wrote this checkpoint
            "class_names": self.train_loader.class_names,  # label i's class folder: exports and predict name them
        }

        def write(folder: Path) -> None:
            ema = self.ema.full_state() if self.ema is not None else None  # a collective: before any local write
            self.strategy.save(folder)
            if self.env.is_main:
                write_file(meta, folder / META_FILE)
                if ema is not None:  # model.pt's keys and format: read like it (dist-bot eval, export, teachers)
                    write_file({k: v.cpu() for k, v in ema.items()}, folder / EMA_FILE)

        save_checkpoint(self.run_dir / "checkpoints", self.state.global_step, self.cfg.run.keep_checkpoints, write)
        HEARTBEAT.beat(f"the checkpoint of step {self.state.global_step}")

    # -- one step ---------------------------------------------------------------------------------
    def micro_loss(self, micro: MicroBatch) -> torch.Tensor:
        """Mean loss of one micro-batch: smoothed and mixed targets, forward under autocast, (distilled) loss."""
        c = self.cfg
        targets = smooth_targets(micro.labels, self.num_classes, c.loss.label_smoothing, c.loss.smoothing_form)
        images, targets, _ = mixup(micro.images, targets, c.loss.mixup_alpha, micro.mix_seed, c.loss.mixup_pairing)
        with autocast(c.precision, self.env.device):
            logits = self.strategy.model(images)
            if self.teacher is None:
                return self.loss_fn(logits, targets)
            with torch.no_grad():
                teacher_logits = self.teacher(images)  # exactly the student's (mixed) input
        return self.loss_fn(logits, targets, teacher_logits)

    def train_step(self, step: Step) -> torch.Tensor:
        """One optimizer step over this process's micro-batches of ``step``; returns their summed loss (a device
        tensor) and advances the run state. Nothing here waits for the device."""
        s = self.strategy
        s.set_lr(self.schedule(self.state.global_step))
        loss_sum = torch.zeros((), device=self.env.device)
        for micro in self.waited(step):
            with contextlib.nullcontext() if micro.last else s.no_sync(), self.profiler.mark("forward_backward"):
                loss = self.micro_loss(micro)
                s.backward(loss * micro.loss_weight)  # weighted: the reduced gradient is the step's mean
            loss_sum += loss.detach() * len(micro)
        with self.profiler.mark("optimizer_step"):
            taken = s.step()
        if self.cfg.precision == "fp16":
            self.guard.update(s.loss_scale_async, taken)
        self.state.epoch_step += 1
        self.state.global_step += 1
        if self.ema is not None:
            self.ema.update(self.state.global_step, taken)  # not moved by a skipped step; no host sync
        return loss_sum

    # -- the loop ---------------------------------------------------------------------------------
    def check_finite(self, loss: float) -> None:
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise RunError(
                f"training loss is {loss} at epoch {self.state.epoch + 1} step {self.state.epoch_step}: stopping; "
                "the last good checkpoint is kept. Lower optim.base_lr_per_256, set optim.grad_clip_norm, "
                "or check the data"
            )

    def log_train(self, interval: Interval) -> bool:
        """Reduce the interval's metrics over processes, check them, log them; returns whether any process was
        asked to stop (a preemption signal): the one place the loop agrees on that, so all stop at one step."""
        env, st = self.env, self.state
        seconds = time.perf_counter() - interval.t0
        host = torch.tensor(
            [interval.samples, float(bool(PREEMPTION.received))], dtype=torch.float64, device=env.device
        )
        sums = torch.cat([interval.loss_sum.double().view(1), host])
        if env.distributed:
            dist.all_reduce(sums)
        loss_total, n, stops = sums.tolist()
        rss, gpu, data_s = all_reduce_max([*local_peak_memory_mb(env), interval.data_s / interval.steps], env)
        if self.cfg.precision == "fp16":
            self.guard.check()
        else:
            self.check_finite(loss_total / n)
        rec = {
            "split": "train",
            "epoch": st.epoch,
            "step": st.global_step,
            "lr": self.schedule(st.global_step - 1),
            "loss": loss_total / n,
            "img_per_s": n / seconds,
            "step_s": seconds / interval.steps,
            "data_s": data_s,  # the slowest process's mean wait for a batch per step
            "max_rss_mb": round(rss, 1),
        }
        if env.device.type == "cuda":
            rec["max_gpu_mem_mb"] = round(gpu, 1)
        if self.cfg.precision == "fp16":
            rec |= {"loss_scale": self.strategy.loss_scale, "skipped_steps": self.guard.skipped_total}
        self.tracker.log(rec)
        self.progress(
            st.epoch,
            self.cfg.schedule.epochs,
            st.epoch_step,
            len(self.train_loader),
            st.global_step - self.start_global_step,
            rec,
        )
        return stops > 0

    def stop_after_reached(self) -> bool:
        after = self.cfg.run.stop_after_steps
        return after is not None and self.state.global_step - self.start_global_step >= after

    def should_stop(self) -> bool:
        """A preemption signal on any rank, or run.stop_after_steps reached (agreed by all ranks; a collective)."""
        return any_rank(bool(PREEMPTION.received) or self.stop_after_reached(), self.env)

    def waited(self, batches: Iterable) -> Iterator:
        """``batches`` (a step's micro-batches), adding the time spent waiting for each to the interval's
        ``data_s``."""
        batches, interval = iter(batches), self.interval
        while True:
            t = time.perf_counter()
            try:
                with self.profiler.mark("data_wait"):
                    batch = next(batches)
            except StopIteration:
                return
            interval.data_s += time.perf_counter() - t
            yield batch

    def train_epoch(self) -> bool:
        """Train the rest of the epoch; True when a stop was agreed (the caller checkpoints and exits), which may be
        at the epoch's last step: then the checkpoint is written before the evaluation."""
        cfg, st, loader = self.cfg, self.state, self.train_loader
        loader.set_epoch(st.epoch, st.epoch_step)
        self.strategy.model.train()
        self.interval = interval = Interval(torch.zeros((), device=self.env.device))
        for step in loader:
            t0 = time.perf_counter()
            with self.profiler.step(st.global_step + 1):  # traced when run.profile_steps holds it
                interval.loss_sum += self.train_step(step)
            HEARTBEAT.beat("optimizer step", st.global_step)
            self.log_compile_time(time.perf_counter() - t0)
            interval.samples += step.samples
            interval.steps += 1
            done, reached = st.epoch_step == len(loader), self.stop_after_reached()
            reached = reached and not (done and st.epoch + 1 == cfg.schedule.epochs)  # at the run's end: finish it
            if st.epoch_step % cfg.run.log_every_steps == 0 or done or reached:
                stop = self.log_train(interval) or reached
                interval.loss_sum, interval.samples, interval.steps = torch.zeros_like(interval.loss_sum), 0, 0
                interval.data_s, interval.t0 = 0.0, time.perf_counter()
                if stop:
                    return True
        if loader.bad_images:
            log.warning("rank %d skipped %d unreadable images this epoch", self.env.rank, loader.bad_images)
        return False

    def log_compile_time(self, first_step_s: float) -> None:
        if not self.compile_logged:
            self.compile_logged = True
            if self.env.is_main:
                log.info(
                    "torch.compile (mode %s): the first step took %.1f s, most of it tracing and code generation",
                    self.cfg.model.compile_mode,
                    first_step_s,
                )

    def end_epoch(self, sync_buffers: bool) -> dict:
        """After an epoch's training: exact evaluation (when due), then the checkpoint (when due, or to stop).
        BN statistics are averaged over ranks first (``sync_buffers``), so evaluation and checkpoint agree."""
        cfg, st, epochs = self.cfg, self.state, self.cfg.schedule.epochs
        last, result = st.epoch == epochs, {}
        eval_model = self.strategy.eval_model(sync_buffers=sync_buffers)
        st.pending_eval = False
        if st.epoch % cfg.run.eval_every_epochs == 0 or last:
            result = evaluate(eval_model, self.val_loader, self.env, cfg.precision)
            result = {"split": "val", "epoch": st.epoch - 1, "step": st.global_step} | result
            line = f"top1 {result['top1']:.2f} top5 {result['top5']:.2f} loss {result['loss']:.4f}"
            if self.ema is not None:  # the same exact evaluation of the EMA weights
                ema = evaluate(self.ema_eval_model(), self.val_loader, self.env, cfg.precision)
                result |= {f"ema_{k}": ema[k] for k in ("top1", "top5", "loss")}
                line += f" | ema top1 {ema['top1']:.2f} top5 {ema['top5']:.2f} loss {ema['loss']:.4f}"
            self.tracker.log(result)
            st.summary = updated_summary(st.summary, result)
            self.tracker.summarize(st.summary)
            if self.env.is_main:
                print(f"epoch {st.epoch}/{epochs} val {line} ({result['samples']} images)", flush=True)
        stop = not last and self.should_stop()
        if st.epoch % cfg.run.checkpoint_every_epochs == 0 or last or stop:
            self.save()
        if stop:
            raise Preempted(st.global_step, PREEMPTION.received)
        return result

    def log_model(self, export_model: Callable[[Path, Path], list[Path]]) -> None:
        """W&B's model artifact of the finished run: its final checkpoint exported by ``export_model`` into
        <run dir>/export/ (rank 0, with W&B on and wandb.log_model). A failure is a warning: the run is done."""
        if not (self.env.is_main and self.cfg.wandb.log_model and self.tracker.wandb_run is not None):
            return
        checkpoint = list_checkpoints(self.run_dir / "checkpoints")[-1]
        try:
            files = export_model(checkpoint, self.run_dir / "export")
        except Exception as e:
            log.warning("no W&B model artifact: exporting %s failed (%s: %s)", checkpoint, type(e).__name__, e)
            return
        metadata = self.state.summary | {"checkpoint": checkpoint.name, "files": [f.name for f in files]}
        self.tracker.log_artifact(self.run_dir / "export", f"model-{self.tracker.wandb_run.id}", "model", metadata)

    def fit(self, export_model: Callable[[Path, Path], list[Path]] | None = None) -> dict:
        """Train to the end (or to a stop: Preempted). ``export_model(checkpoint, folder)``: how the final weights
        are exported for W&B's model artifact (the CLI passes dist_bot.export's; the engine does not import it)."""
        cfg, env, st = self.cfg, self.env, self.state
        epochs = cfg.schedule.epochs
        self.start_global_step = st.global_step
        self.progress = Progress(env.is_main, epochs * len(self.train_loader) - st.global_step)
        # `dist-bot train` installed the handlers at process start (signals during start-up count); a Trainer used
        # from Python catches them from here, and puts the previous handlers back at the end of fit
        owns_signal_handlers = PREEMPTION.install()
        if env.is_main:
            log.info(
                "%s: %d classes, %d train / %d val images, global batch %d, peak lr %.4g, %d steps/epoch",
                cfg.model.name,
                self.num_classes,
                self.train_loader.num_samples,
                self.val_loader.num_samples,
                self.global_batch,
                self.schedule.peak_lr,
                len(self.train_loader),
            )
            log.info(
                "%d process(es), %s over %s on %s, %s, data.loader=%s",
                env.world_size,
                cfg.strategy,
                dist.get_backend() if dist.is_initialized() else "no process group",
                env.device,
                cfg.precision,
                type(self.train_loader).__name__.removesuffix("Loader").lower(),
            )
        result = {}
        HEARTBEAT.beat("the run's start (data, model and strategy built)")
        if st.epoch >= epochs and not st.pending_eval and env.is_main:
            log.info("run %s is complete (%d epochs): nothing to do", self.run_dir, epochs)
        try:
            if self.should_stop():  # a preemption signal during start-up: requeue now, nothing written
                raise Preempted(st.global_step, PREEMPTION.received, saved=False)
            if st.pending_eval:  # resumed after a stop at an epoch's last step: BN was averaged before that checkpoint
                result = self.end_epoch(sync_buffers=False)
            while st.epoch < epochs:
                stopped = self.train_epoch()
                if st.epoch_step == len(self.train_loader):
                    st.epoch, st.epoch_step = st.epoch + 1, 0
                    if not stopped:
                        result = self.end_epoch(sync_buffers=True)
                        continue
                    # stopped at the epoch's last step: checkpoint before the evaluation (the requeued run
                    # evaluates), with BN averaged as the uninterrupted run averages it before evaluating
                    st.pending_eval = True
                    self.strategy.eval_model()
                self.save()
                raise Preempted(st.global_step, PREEMPTION.received)
            if result and export_model is not None:  # finished here (not "nothing to do")
                self.log_model(export_model)
        finally:
            self.profiler.close()  # a run ending inside the profiled window writes the steps it traced
            self.tracker.close()
            # The loaders' workers end here, whatever ended the run, not when the trainer is collected: after an
            # error a reference cycle can keep it until the interpreter's exit.
            self.train_loader.close()
            self.val_loader.close()
            if owns_signal_handlers:  # restored last (the CLI restores those it installed itself)
                PREEMPTION.restore()
        if dist.is_initialized():
            # The ranks end together: rank 0's end-of-run work (the W&B model export and upload, up to minutes)
            # ends before any rank exits, so srun's --wait does not end rank 0 while it finishes, nor the job FAILED.
            HEARTBEAT.beat("the end of the run")
            dist.barrier()
        return result
