"""Tracking on rank 0: metrics.jsonl (always), Weights & Biases (auto / online / offline / disabled), and a
progress line.

W&B mode ``auto`` goes online when an API key is configured (WANDB_API_KEY or `wandb login`) and offline
otherwise; offline runs are folders under ``<run dir>/wandb`` that `wandb sync` uploads later. The W&B run
id is stored in every checkpoint, so a resumed or requeued run continues the same W&B run. Keys are never
logged or written: W&B reads them itself.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
import sys
import time
from pathlib import Path

from .config import UserError

log = logging.getLogger(__name__)


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if wandb_key_configured() else "offline"
    return mode


class Tracker:
    """Writes metrics from the main process; every other process gets a tracker that does nothing."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, wandb_id: str | None = None, config_dict=None):
        self.enabled = enabled
        self.wandb_run = None
        self.wandb_id = wandb_id
        self._file = None
        if not enabled:
            return
        # line-buffered, open for the run's life (closed in close()): every line is on disk when written
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        mode = resolve_wandb_mode(cfg.wandb.mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            if cfg.wandb.mode == "auto":
                log.warning("wandb is not installed: tracking to metrics.jsonl only (pip install 'dist-bot[wandb]')")
                return
            raise UserError(
                f"wandb.mode={cfg.wandb.mode} but wandb is not installed: pip install 'dist-bot[wandb]'"
            ) from None
        self.wandb_id = wandb_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        # W&B's service process ends on the SIGTERM that Slurm sends every process of a preempted job: then
        # the tracker carries on without it (_wandb_failed) and the requeued run resumes the same W&B run.
        self.wandb_run = self._init_wandb(wandb, cfg, run_dir, mode, config_dict)
        self.wandb_run.define_metric("step")
        for split in ("train", "val"):
            self.wandb_run.define_metric(f"{split}/*", step_metric="step")
        log.info("W&B %s run %s (%s)", mode, self.wandb_id, run_dir / "wandb")

    def _init_wandb(self, wandb, cfg, run_dir: Path, mode: str, config_dict):
        return wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=cfg.wandb.group or os.environ.get("SLURM_JOB_ID"),
            name=cfg.run.name,
            tags=list(cfg.wandb.tags),
            config=config_dict,
            id=self.wandb_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
        )

    def _wandb_failed(self, e: Exception) -> None:
        """W&B broke mid-run (its service died, the network went): keep training, keep metrics.jsonl."""
        log.warning(
            "W&B stopped working (%s: %s): this process goes on with metrics.jsonl only; a resumed run continues "
            "W&B run %s",
            type(e).__name__,
            e,
            self.wandb_id,
        )
        self.wandb_run = None

    def log(self, record: dict) -> None:
        """One metrics line: {"split": ..., "epoch": ..., "step": ..., ...}; also sent to W&B."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            split = record["split"]
            try:
                self.wandb_run.log(
                    {f"{split}/{k}": v for k, v in record.items() if k not in ("split", "step")}
                    | {"step": record["step"]}
                )
            except Exception as e:  # any W&B failure: training must go on
                self._wandb_failed(e)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:  # a failed upload must not fail a finished run
                self._wandb_failed(e)


class Progress:
    """A line per log interval on the main process: epoch, step, eta, img/s, lr, loss (and the fp16 scale)."""

    def __init__(self, enabled: bool, total_steps: int, stream=None):
        self.enabled, self.total_steps, self.stream = enabled, total_steps, stream
        self.t0 = time.perf_counter()

    def __call__(self, epoch: int, epochs: int, step: int, steps: int, done: int, metrics: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = (self.total_steps - done) / rate if rate else math.nan
        eta_s = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        line = (
            f"epoch {epoch + 1}/{epochs} step {step}/{steps} eta {eta_s} "
            f"img/s {metrics['img_per_s']:.1f} lr {metrics['lr']:.4g} loss {metrics['loss']:.4f}"
        )
        if "loss_scale" in metrics:
            line += f" scale {metrics['loss_scale']:g} skipped {metrics['skipped_steps']}"
        print(line, file=self.stream or sys.stdout, flush=True)
