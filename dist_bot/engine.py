"""The training loop: the paper's algorithm, one iteration at a time.

For each optimizer step: set the lr from the schedule; for each micro-batch: smooth the labels, mix the
batch, forward under autocast (the frozen teacher sees the same mixed images), loss, backward through the
strategy (no gradient sync until the last micro-batch); then step (skipped on fp16 overflow) and log.
After each epoch: exact evaluation over the whole validation set, then a checkpoint.

    run = Trainer(cfg, env); run.fit()        # what `dist-bot train` does on every process
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_latest_good,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_file,
)
from .config import Config, UserError, from_dict, to_dict, to_yaml
from .data import DataError, make_loaders
from .distributed import build_strategy
from .distributed.env import DistEnv, all_reduce_sum, any_rank, peak_memory_mb
from .models import build_model
from .recipe.losses import distillation_loss, smooth_targets, soft_cross_entropy
from .recipe.lr import build_schedule
from .recipe.mixup import mixup
from .recipe.param_groups import param_groups
from .recipe.precision import LossScaleGuard, autocast
from .signals import PREEMPT_SIGNALS
from .tracking import Progress, Tracker

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the sbatch script and launchers requeue on it
# Settings that may change when a run is resumed; anything else must match the run folder's config.yaml.
RESUMABLE_CHANGES = {
    "data.path",
    "data.workers",
    "data.dali_py_workers",
    "run.resume",
    "run.log_every_steps",
    "run.stop_after_steps",
    "wandb.mode",
    "wandb.tags",
    "dist.timeout_min",
    "model.compile",
    "model.compile_mode",
    "model.cudnn_benchmark",
}


class RunError(UserError, RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class Preempted(Exception):
    """The run checkpointed after a preemption signal (or run.stop_after_steps) and should be requeued.

    `signals` are those this process received (a launcher requeues on its own warning signal, but leaves a
    plain SIGTERM to Slurm); empty when the stop came from run.stop_after_steps or from another rank.
    """

    def __init__(self, step: int, signals: tuple[int, ...] = ()):
        names = ", ".join(signal.Signals(s).name for s in signals) or "no signal here"
        super().__init__(f"checkpointed at step {step} ({names})")
        self.step, self.signals = step, signals


def flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to reuse a folder that holds another run; allow continuing the same run (run.resume=auto)."""
    saved = run_dir / "config.yaml"
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not saved.exists():
        raise RunError(f"{run_dir} exists and is not a dist_bot run folder: choose another run.name or run.out_dir")
    if cfg.run.resume == "never":
        raise RunError(f"run folder {run_dir} already exists and run.resume=never: choose another run.name")
    old, new = flat_keys(yaml.safe_load(saved.read_text())), flat_keys(to_dict(cfg))
    # with a global batch, the per-process batch follows the world size, which may change on resume
    may_change = set(RESUMABLE_CHANGES)
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
    """top-1/top-5 (%) and mean loss over the WHOLE validation set: each image counted once over all ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, samples
    with torch.no_grad():
        for images, labels in loader:
            with autocast(precision, env.device):
                logits = model(images)
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels.unsqueeze(1)
            sums += torch.tensor(
                [
                    hit[:, 0].sum().item(),
                    hit.any(1).sum().item(),
                    F.cross_entropy(logits, labels, reduction="sum").item(),
                    labels.numel(),
                ],
                dtype=torch.float64,
            )
    c1, c5, loss, n = all_reduce_sum(sums.tolist(), env)
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "samples": int(n)}


def load_teacher(path: str, num_classes: int, env: DistEnv, channels_last: bool) -> torch.nn.Module:
    """A frozen teacher from a dist_bot checkpoint folder, or from a run folder (its latest good checkpoint);
    the architecture is read from the config saved inside."""
    if (Path(path) / "checkpoints").is_dir():
        found = load_latest_good(Path(path) / "checkpoints", load_checkpoint)
        if found is None:
            raise RunError(f"teacher run {path} has no readable checkpoint: train it first, or name a checkpoint")
        path, state = found
    else:
        state = load_checkpoint(Path(path))
    tcfg = from_dict(state["config"])
    if state["num_classes"] != num_classes:
        raise RunError(f"teacher {path} predicts {state['num_classes']} classes, the data has {num_classes}")
    teacher = build_model(tcfg.model.name, num_classes=num_classes)
    teacher.load_state_dict(state["model"])
    teacher.requires_grad_(False).eval().to(env.device)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        cfg.data.batch_size, cfg.optim.grad_accum_steps = split_global_batch(cfg, env.world_size)
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        check_run_dir(cfg, self.run_dir)
        self.train_loader, self.val_loader = make_loaders(cfg, env)
        self.num_classes = self.train_loader.num_classes
        if cfg.model.num_classes not in (None, self.num_classes):
            raise DataError(
                f"model.num_classes={cfg.model.num_classes} but {cfg.data.path}/train has {self.num_classes} "
                "class folders: fix the data or drop model.num_classes (it defaults to the data's)"
            )
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every process
        model = build_model(cfg.model.name, self.num_classes, zero_init_last=cfg.model.zero_gamma).to(env.device)
        if cfg.model.sync_bn and env.device.type == "cuda" and env.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.model.compile:
            model.compile()  # in place: state_dict keys stay those of the plain model
        o = cfg.optim

        def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:  # the lr is set before every step
            groups = param_groups(m, o.weight_decay, o.no_bias_decay)
            return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=o.nesterov)

        self.strategy = build_strategy(cfg.strategy, model, make_optimizer, env, cfg)
        self.global_batch = cfg.data.batch_size * env.world_size * o.grad_accum_steps
        self.schedule = build_schedule(
            cfg.schedule, o.base_lr_per_256, o.ref_batch, self.global_batch, len(self.train_loader)
        )
        d = cfg.loss.distill
        self.teacher = load_teacher(d.teacher, self.num_classes, env, cfg.model.channels_last) if d.teacher else None
        self.guard = LossScaleGuard(cfg.loss_scale.min_scale, cfg.loss_scale.max_steps_at_min)
        self.epoch, self.epoch_step, self.global_step = 0, 0, 0
        wandb_id = self.resume()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.tracker = Tracker(cfg, self.run_dir, env.is_main, wandb_id, to_dict(cfg))
        self.stop_requested = False
        self.signals_received: tuple[int, ...] = ()
        self.on_step = None  # called after every optimizer step (dist-bot bench train times steps with it)
        self.start_global_step, self.progress = self.global_step, Progress(False, 0)  # fit() sets both

    # -- checkpoints ------------------------------------------------------------------------------
    def _load(self, path: Path) -> dict:
        state = read_meta(path)
        if state["model_name"] != self.cfg.model.name or state["num_classes"] != self.num_classes:
            raise RunError(
                f"checkpoint {path} is of {state['model_name']} with {state['num_classes']} classes, but this run "
                f"builds {self.cfg.model.name} with {self.num_classes}: use another run.name"
            )
        self.strategy.load(path)
        return state

    def resume(self) -> str | None:
        found = load_latest_good(self.run_dir / "checkpoints", self._load)
        if found is None:
            return None
        path, state = found
        self.guard.load_state_dict(state["guard"])
        self.epoch, self.epoch_step, self.global_step = (
            state["epoch"],
            state["epoch_step"],
            state["global_step"],
        )
        set_rng_state(state["rng"])
        if self.env.is_main:
            log.info("resumed from %s: epoch %d, step %d", path, self.epoch, self.epoch_step)
        return state["wandb_id"]

    def save(self) -> None:
        meta = {
            "format": FORMAT_VERSION,
            "guard": self.guard.state_dict(),
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "global_step": self.global_step,
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "model_name": self.cfg.model.name,
            "num_classes": self.num_classes,
            "wandb_id": self.tracker.wandb_id,
        }

        def write(folder: Path) -> None:
            self.strategy.save(folder)
            if self.env.is_main:
                write_file(meta, folder / "meta.pt")

        save_checkpoint(self.run_dir / "checkpoints", self.global_step, self.cfg.run.keep_checkpoints, write)

    # -- the loop ---------------------------------------------------------------------------------
    def loss(self, logits, targets, images) -> torch.Tensor:
        if self.teacher is None:
            return soft_cross_entropy(logits, targets)
        with torch.no_grad(), autocast(self.cfg.precision, self.env.device):
            teacher_logits = self.teacher(images)  # exactly the student's (mixed) input
        d = self.cfg.loss.distill
        return distillation_loss(logits, teacher_logits, targets, d.temperature, d.hard_weight, d.soft_weight)

    def train_step(self, step, batches) -> torch.Tensor:
        """One optimizer step over this process's micro-batches; returns the summed (unweighted) loss."""
        cfg, env, s = self.cfg, self.env, self.strategy
        loss_sum = torch.zeros((), device=env.device)
        for k, micro in enumerate(step.micro_batches):
            images, labels = next(batches)
            targets = smooth_targets(labels, self.num_classes, cfg.loss.label_smoothing, cfg.loss.smoothing_form)
            # lambda and the pairing are a pure function of the position, so a resumed run mixes identically;
            # keyed like the sharding (k x world + rank), so accumulation mixes like more processes would
            micro_id = k * env.world_size + env.rank
            rng = np.random.default_rng([cfg.run.seed, self.epoch, self.epoch_step, micro_id])
            images, targets, _ = mixup(images, targets, cfg.loss.mixup_alpha, rng, cfg.loss.mixup_pairing)
            last = k == len(step.micro_batches) - 1
            with contextlib.nullcontext() if last else s.no_sync():
                with autocast(cfg.precision, env.device):
                    logits = s.model(images)
                loss = self.loss(logits, targets, images)
                # mean over this micro-batch, weighted so the all-reduced gradient is the step's mean
                s.backward(loss * (len(micro) * env.world_size / step.step_size))
            loss_sum += loss.detach() * len(micro)
        return loss_sum

    def check_finite(self, loss_sum: torch.Tensor) -> None:
        if not torch.isfinite(loss_sum):
            raise RunError(
                f"training loss is {loss_sum.item()} at epoch {self.epoch + 1} step {self.epoch_step}: stopping; "
                "the last good checkpoint is kept. Lower optim.base_lr_per_256, set optim.grad_clip_norm, "
                "or check the data"
            )

    def log_train(self, loss_sum, samples: int, steps: int, seconds: float) -> None:
        loss_total, n = all_reduce_sum([loss_sum.item(), samples], self.env)
        if self.cfg.precision != "fp16":
            self.check_finite(torch.tensor(loss_total))
        rec = {
            "split": "train",
            "epoch": self.epoch,
            "step": self.global_step,
            "lr": self.schedule(self.global_step - 1),
            "loss": loss_total / n,
            "img_per_s": n / seconds,
            "step_s": seconds / steps,
        } | peak_memory_mb(self.env)
        if self.cfg.precision == "fp16":
            rec |= {"loss_scale": self.strategy.loss_scale, "skipped_steps": self.guard.skipped_total}
        self.tracker.log(rec)
        self.progress(
            self.epoch,
            self.cfg.schedule.epochs,
            self.epoch_step,
            len(self.train_loader),
            self.global_step - self.start_global_step,
            rec,
        )

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True  # finish the current step, then checkpoint (see train_epoch)
        self.signals_received += (signum,)

    def should_stop(self) -> bool:
        """A preemption signal on any rank, or run.stop_after_steps reached (agreed by all ranks)."""
        after = self.cfg.run.stop_after_steps
        reached = after is not None and self.global_step - self.start_global_step >= after
        return any_rank(self.stop_requested or reached, self.env)

    def train_epoch(self) -> bool:
        """Train the rest of the epoch; True when stopped early (the caller checkpoints and exits)."""
        cfg, loader = self.cfg, self.train_loader
        loader.set_epoch(self.epoch, self.epoch_step)
        self.strategy.model.train()
        batches = iter(loader)
        loss_sum, samples, steps, t0 = torch.zeros((), device=self.env.device), 0, 0, time.perf_counter()
        for step in loader.steps[self.epoch_step :]:
            self.strategy.set_lr(self.schedule(self.global_step))
            loss_sum += self.train_step(step, batches)
            samples += sum(len(m) for m in step.micro_batches)
            steps += 1
            ok = self.strategy.step()
            if cfg.precision == "fp16":
                self.guard.update(self.strategy.loss_scale, skipped=not ok)
            self.epoch_step += 1
            self.global_step += 1
            if self.on_step is not None:
                self.on_step()
            done = self.epoch_step == len(loader)
            if self.epoch_step % cfg.run.log_every_steps == 0 or done:
                self.log_train(loss_sum, samples, steps, time.perf_counter() - t0)
                loss_sum, samples, steps, t0 = torch.zeros_like(loss_sum), 0, 0, time.perf_counter()
            # at the epoch's last step the stop waits for the epoch end (BN sync, evaluation, checkpoint)
            if not done and self.should_stop():
                if samples:  # the partial interval's loss must be finite before it is saved
                    self.log_train(loss_sum, samples, steps, time.perf_counter() - t0)
                return True
        if loader.bad_images:
            log.warning("rank %d skipped %d unreadable images this epoch", self.env.rank, loader.bad_images)
        return False

    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        epochs = cfg.schedule.epochs
        self.start_global_step = self.global_step
        self.progress = Progress(env.is_main, epochs * len(self.train_loader) - self.global_step)
        old = {s: signal.signal(s, self._on_signal) for s in PREEMPT_SIGNALS}
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
        result = {}
        if self.epoch >= epochs and env.is_main:
            log.info("run %s is complete (%d epochs): nothing to do", self.run_dir, epochs)
        try:
            while self.epoch < epochs:
                if self.train_epoch():
                    self.save()
                    raise Preempted(self.global_step, self.signals_received)
                self.epoch, self.epoch_step = self.epoch + 1, 0
                last = self.epoch == epochs
                # BN statistics averaged over ranks at every epoch end, so evaluation and checkpoint agree.
                # (A preemption checkpoint keeps rank 0's: DDP broadcasts those at the next forward anyway.)
                eval_model = self.strategy.eval_model()
                if self.epoch % cfg.run.eval_every_epochs == 0 or last:
                    result = evaluate(eval_model, self.val_loader, env, cfg.precision)
                    result = {"split": "val", "epoch": self.epoch - 1, "step": self.global_step} | result
                    self.tracker.log(result)
                    if env.is_main:
                        print(
                            f"epoch {self.epoch}/{epochs} val top1 {result['top1']:.2f} top5 {result['top5']:.2f} "
                            f"loss {result['loss']:.4f} ({result['samples']} images)",
                            flush=True,
                        )
                stop = not last and self.should_stop()
                if self.epoch % cfg.run.checkpoint_every_epochs == 0 or last or stop:
                    self.save()
                if stop:
                    raise Preempted(self.global_step, self.signals_received)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.tracker.close()
        return result
