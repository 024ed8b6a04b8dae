"""The training loop: the paper's algorithm, one iteration at a time.

For each optimizer step: set the lr from the schedule; for each micro-batch of the loader's ``Step`` (images,
labels, loss weight, mixup seed): smooth the labels, mix the batch, forward under autocast (the frozen teacher
sees the same mixed images), loss, backward through the strategy (no gradient sync until the last
micro-batch); then step (skipped on fp16 overflow). Every ``run.log_every_steps`` steps: log, and agree over
all processes whether to stop. After each epoch: exact evaluation over the whole validation set, then a
checkpoint.

Between two log steps nothing waits for the device: the loss, the fp16 skip flag and the loss-scale guard stay
device tensors, mixup pairs on the device, the stop flag is agreed only at log steps (``run.stop_after_steps``
needs no agreement: every process counts the same steps). So the host queues work ahead of the GPU and the
next batch is fetched while the GPU still computes (tests/unit/train/test_sync_free.py counts the sync points).

    run = Trainer(cfg, env); run.fit()        # what `dist-bot train` does on every process
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config, profile_window, to_dict, to_yaml
from ..data import make_loaders
from ..data.plan import MicroBatch, Step
from ..distributed.env import DistEnv, all_reduce_max, any_rank, local_peak_memory_mb
from ..distributed.strategy import autocast
from ..distributed.watchdog import HEARTBEAT
from ..errors import RunError
from ..profiling import StepProfiler
from ..provenance import config_header, source_info
from ..recipe.losses import mix, smooth_targets
from ..signals import PREEMPTION
from ..tracking import Progress, Tracker, updated_summary
from .build import (
    create_config,
    create_layout,
    create_loss,
    create_model,
    create_schedule,
    create_state,
    create_teacher,
)
from .state import RunCheckpoint, check_run_dir, has_checkpoints

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
        self.cfg = cfg = create_config(cfg, env.world_size)  # the batch this world size makes; a copy
        self.env, self.run_dir = env, Path(cfg.run.out_dir) / cfg.run.name
        check_run_dir(cfg, self.run_dir)
        self.train_loader, self.val_loader = make_loaders(cfg, env)
        classes = self.train_loader.class_names, self.train_loader.class_descriptions
        fresh = not has_checkpoints(self.run_dir, env)  # else the checkpoint's weights, not model.init_from's
        self.model = create_model(cfg, env, *classes, fresh=fresh)  # strategy, optimizer, EMA
        self.num_classes = self.model.num_classes
        self.loss_fn, self.teacher = create_loss(cfg), create_teacher(cfg, env, self.num_classes)
        self.layout = create_layout(cfg, env, len(self.train_loader))
        self.schedule = create_schedule(cfg, self.layout)
        self.state = create_state(cfg, env, self.layout, self.model)  # the counters, layout, guard, RNG: the meta
        self.checkpoint = RunCheckpoint(self.run_dir, cfg, env, self.model)
        self.checkpoint.resume(self.state)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_header() + to_yaml(cfg))
        wandb_config = to_dict(cfg) | {"dist_bot": source_info()}
        self.tracker = Tracker(
            cfg, self.run_dir, env.is_main, self.state.wandb_id, wandb_config, start_step=self.state.global_step
        )
        self.tracker.summarize(self.state.summary)  # a resumed run: its new W&B segment starts with the best so far
        self.state.wandb_id = self.tracker.wandb_id
        self.profiler = StepProfiler(profile_window(cfg.run.profile_steps), self.run_dir, env.rank, env.device)
        self.interval = Interval(torch.zeros((), device=env.device))  # what the steps since the last log added up to
        self.start_global_step, self.progress = self.state.global_step, Progress(False, 0)  # fit() sets both
        self.compile_logged = not cfg.model.compile

    strategy = property(lambda self: self.model.strategy)
    guard = property(lambda self: self.state.guard)  # the fp16 loss-scale guard
    ema = property(lambda self: self.model.ema)
    # read-only views of the run state, for hooks and tests
    epoch = property(lambda self: self.state.epoch)
    epoch_step = property(lambda self: self.state.epoch_step)
    global_step = property(lambda self: self.state.global_step)

    def ema_eval_model(self) -> torch.nn.Module:
        """Collective: the full EMA, assembled from every process's share, in the plain model."""
        self.model.ema_module.load_state_dict(self.ema.full_state())
        return self.model.ema_module

    def save(self) -> None:
        self.checkpoint.save(self.state)

    # -- one step ---------------------------------------------------------------------------------
    def micro_loss(self, micro: MicroBatch) -> torch.Tensor:
        """Mean loss of one micro-batch: smoothed and mixed targets, forward under autocast, (distilled) loss."""
        c = self.cfg
        targets = smooth_targets(micro.labels, self.num_classes, c.loss.label_smoothing, c.loss.smoothing_form)
        images, targets, _ = mix(
            micro.images, targets, c.loss.mixup_alpha, c.loss.cutmix_alpha, micro.mix_seed, c.loss.mixup_pairing
        )
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

    # -- the loop ---------------------------------------------------------------------------------
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
                self.interval = interval = Interval(torch.zeros_like(interval.loss_sum))
                if stop:
                    return True
        if loader.bad_images:
            log.warning("rank %d skipped %d unreadable images this epoch", self.env.rank, loader.bad_images)
        return False

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

    def fit(self, export_model: Callable[[Path, Path], list[Path]] | None = None) -> dict:
        """Train to the end (or to a stop: Preempted). ``export_model(checkpoint, folder)``: how the final weights
        are exported for W&B's model artifact (the CLI passes dist_bot.export's; the trainer does not import it)."""
        env, st, epochs = self.env, self.state, self.cfg.schedule.epochs
        self.start_global_step = st.global_step
        self.progress = Progress(env.is_main, epochs * len(self.train_loader) - st.global_step)
        # `dist-bot train` installed the handlers at process start (signals during start-up count); a Trainer used
        # from Python catches them from here, and puts the previous handlers back at the end of fit
        owns_signal_handlers = PREEMPTION.install()
        log_start(self)
        result = {}
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
                self.tracker.log_model(self.checkpoint.folder, export_model, st.summary)
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

    # -- agreeing to stop, logging ----------------------------------------------------------------
    def stop_after_reached(self) -> bool:
        after = self.cfg.run.stop_after_steps
        return after is not None and self.state.global_step - self.start_global_step >= after

    def should_stop(self) -> bool:
        """A preemption signal on any rank, or run.stop_after_steps reached (agreed by all ranks; a collective)."""
        return any_rank(bool(PREEMPTION.received) or self.stop_after_reached(), self.env)

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
            check_finite(loss_total / n, st.epoch + 1, st.epoch_step)
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
        steps_done = st.global_step - self.start_global_step
        self.progress(st.epoch, self.cfg.schedule.epochs, st.epoch_step, len(self.train_loader), steps_done, rec)
        return stops > 0

    def log_compile_time(self, first_step_s: float) -> None:
        if not self.compile_logged:
            self.compile_logged = True
            if self.env.is_main:
                log.info(
                    "torch.compile (mode %s): the first step took %.1f s, most of it tracing and code generation",
                    self.cfg.model.compile_mode,
                    first_step_s,
                )


def log_start(trainer: Trainer) -> None:
    """The run's first log lines: data, model, batch, lr; processes, strategy, backend, device, precision."""
    cfg, env, st = trainer.cfg, trainer.env, trainer.state
    HEARTBEAT.beat("the run's start (data, model and strategy built)")
    if not env.is_main:
        return
    log.info(
        "%s: %d classes, %d train / %d val images, global batch %d, peak lr %.4g, %d steps/epoch",
        cfg.model.name,
        trainer.num_classes,
        trainer.train_loader.num_samples,
        trainer.val_loader.num_samples,
        trainer.layout.global_batch,
        trainer.schedule.peak_lr,
        len(trainer.train_loader),
    )
    backend = dist.get_backend() if dist.is_initialized() else "no process group"
    loader = type(trainer.train_loader).__name__.removesuffix("Loader").lower()
    log.info(
        "%d process(es), %s over %s on %s, %s, data.loader=%s",
        *(env.world_size, cfg.strategy, backend, env.device, cfg.precision, loader),
    )
    if st.epoch >= cfg.schedule.epochs and not st.pending_eval:
        log.info("run %s is complete (%d epochs): nothing to do", trainer.run_dir, cfg.schedule.epochs)


def check_finite(loss: float, epoch: int, step: int) -> None:
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise RunError(
            f"training loss is {loss} at epoch {epoch} step {step}: stopping; the last good checkpoint is kept. "
            "Lower optim.base_lr_per_256, set optim.grad_clip_norm, or check the data"
        )
