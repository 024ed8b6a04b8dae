"""Tracking on rank 0: metrics.jsonl (always), Weights & Biases (auto / online / offline / disabled), and a
progress line.

W&B mode ``auto`` goes online when an API key is configured (WANDB_API_KEY or `wandb login`) and W&B's
server answers within PROBE_TIMEOUT_S (3 s) at its base URL (WANDB_BASE_URL, the base_url of `wandb login
--host`, or W&B's default), and offline otherwise, with one warning when a key is configured but the server
does not answer. Offline runs are folders under ``<run dir>/wandb`` that `wandb sync` uploads later.

W&B never stops or hangs training. wandb.init may take INIT_TIMEOUT_S (30 s; WANDB_INIT_TIMEOUT overrides
it; W&B's own look-up of the key's user adds up to 10 s before it) and run.finish FINISH_TIMEOUT_S (120 s;
WANDB_FINISH_TIMEOUT overrides it; what is left stays on disk for `wandb sync`). If online init fails (auto
or online mode), the run goes on as an offline W&B run, or with metrics.jsonl alone if that fails too, after
one warning; if W&B fails mid-run (log, finish) the run goes on with metrics.jsonl. An offline run ends at
once: W&B's own telemetry, which it would send to its server at exit, stays off. Only after an online init
failed against a server that takes connections but never answers has that telemetry started, and wandb's
exit hook then spends about 20 s on it when the process ends.

The W&B run id is stored in every checkpoint, so a resumed or requeued run continues the same W&B run. Keys
are never logged or written: W&B reads them itself, and warnings that quote W&B's errors blank the key out.

The run summary (``updated_summary``): after every evaluation, best/top1 with best/top5, best/epoch and
best/step of the evaluation with the highest top-1, and final/top1, final/top5, final/epoch, final/step of the
latest; the same for every other ``*top1`` a validation record holds (ema_top1: best/ema_top1, best/ema_epoch
...). Epochs are counted from 0 as in metrics.jsonl. It is set in W&B's run summary (W&B would otherwise show
the last value of each key) and written to ``<run dir>/summary.json``; checkpoints keep it, so the best
survives a resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import os
import secrets
import ssl
import string
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .checkpoint import list_checkpoints
from .errors import UserError

log = logging.getLogger(__name__)


PROBE_TIMEOUT_S = 3.0  # auto mode: how long W&B's server has to answer before the run goes offline
INIT_TIMEOUT_S = 30.0  # wandb.init's bound (W&B's own default, 90 s, is long for ranks waiting on rank 0)
FINISH_TIMEOUT_S = 120.0  # run.finish's bound (W&B's default waits for every upload, however long)
DEFAULT_BASE_URL = "https://api.wandb.ai"  # used only if wandb cannot say which server it would use


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_base_url() -> str:
    """The server wandb.init would contact: WANDB_BASE_URL, the `wandb login --host` setting, or the default."""
    try:
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton().settings.base_url  # W&B's own reading; starts no service process
    except Exception:  # wandb missing, or settings it cannot read (then wandb.init fails, and the run goes on)
        return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def server_answers(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP server answers at `url` within `timeout_s` (any status below 500 counts).

    The request runs in a daemon thread so that no stage of it (name lookup included, which socket timeouts
    do not cover) keeps the caller waiting longer than `timeout_s`.
    """
    answered = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                answered.append(True)
        except urllib.error.HTTPError as e:
            answered.append(e.code < 500)
        except ssl.SSLCertVerificationError:
            answered.append(True)  # a server is there; wandb may trust its certificate where urllib does not
        except Exception:
            answered.append(False)

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered) and answered[0]


def resolve_wandb_mode(mode: str, base_url: str | None = None) -> str:
    """auto -> online when a key is configured and the server at `base_url` answers, else offline."""
    if mode != "auto":
        return mode
    if not wandb_key_configured():
        return "offline"
    url = base_url or wandb_base_url()
    if server_answers(url):
        return "online"
    log.warning(
        "W&B server %s did not answer within %g s: this run tracks offline (`wandb sync` its folder later)",
        url,
        PROBE_TIMEOUT_S,
    )
    return "offline"


def timeouts() -> dict[str, float]:
    """wandb.Settings bounds for init and finish; W&B's own variables (WANDB_INIT_TIMEOUT ...) win."""
    defaults = {"init_timeout": INIT_TIMEOUT_S, "finish_timeout": FINISH_TIMEOUT_S}
    return {k: v for k, v in defaults.items() if f"WANDB_{k.upper()}" not in os.environ}


def redact_key(text: str) -> str:
    """The message with the API key (if W&B's error quotes it) blanked out."""
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "<WANDB_API_KEY>") if key else text


def updated_summary(summary: dict, record: dict) -> dict:
    """The run summary after validation record ``record`` ({"epoch", "step", "top1", "top5", ...})."""
    out = dict(summary)
    for key in sorted(k for k in record if k.endswith("top1")):
        prefix = key.removesuffix("top1")  # "" or e.g. "ema_"
        at = {f"{prefix}top1": record[key], f"{prefix}epoch": record["epoch"], f"{prefix}step": record["step"]}
        if f"{prefix}top5" in record:
            at[f"{prefix}top5"] = record[f"{prefix}top5"]
        out |= {f"final/{k}": v for k, v in at.items()}
        if record[key] > summary.get(f"best/{key}", -math.inf):  # ties keep the earlier evaluation
            out |= {f"best/{k}": v for k, v in at.items()}
    return out


def write_json_atomically(obj, path: Path) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Tracker:
    """Writes metrics from the main process; every other process gets a tracker that does nothing."""

    def __init__(
        self, cfg, run_dir: Path, enabled: bool, wandb_id: str | None = None, config_dict=None, start_step: int = 0
    ):
        self.enabled = enabled
        self.wandb_run = None
        self.wandb_id = wandb_id
        self.run_dir = Path(run_dir)
        self._file = None
        self.tensorboard = None  # torch's SummaryWriter, with tensorboard.enabled
        self.log_models = False  # wandb.log_model
        if not enabled:
            return
        self.log_models = cfg.wandb.log_model
        # line-buffered, open for the run's life (closed in close()): every line is on disk when written
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.tensorboard.enabled:
            self.tensorboard = self._start_tensorboard(start_step)
        if cfg.wandb.mode == "disabled":
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
        mode = resolve_wandb_mode(cfg.wandb.mode)
        self.wandb_id = wandb_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        # W&B's service process ends on the SIGTERM that Slurm sends every process of a preempted job: then
        # the tracker carries on without it (_wandb_failed) and the requeued run resumes the same W&B run.
        self.wandb_run, mode = self._start_wandb(wandb, cfg, run_dir, mode, config_dict)
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.define_metric("step")
            for split in ("train", "val"):
                self.wandb_run.define_metric(f"{split}/*", step_metric="step")
        except Exception as e:
            self._wandb_failed(e)
            return
        log.info("W&B %s run %s (%s)", mode, self.wandb_id, run_dir / "wandb")

    def _start_wandb(self, wandb, cfg, run_dir: Path, mode: str, config_dict):
        """(run, mode): the run in `mode`, else offline, else (None, "disabled"); one warning when it falls back."""
        try:
            return self._init_wandb(wandb, cfg, run_dir, mode, config_dict), mode
        except Exception as e:  # no network, a wrong key, a server that does not answer: training goes on
            failure = e
        run, fallback = None, "disabled"
        if mode != "offline":
            with contextlib.suppress(Exception):
                wandb.teardown()  # W&B's service keeps the failed run's id in use; a new service frees it
                run, fallback = self._init_wandb(wandb, cfg, run_dir, "offline", config_dict), "offline"
        log.warning(
            "W&B %s run at %s did not start (%s: %s): this run tracks %s",
            mode,
            wandb_base_url(),
            type(failure).__name__,
            " ".join(redact_key(str(failure)).split()),
            "offline (`wandb sync` its folder later)" if run is not None else "to metrics.jsonl only",
        )
        return run, fallback

    def _init_wandb(self, wandb, cfg, run_dir: Path, mode: str, config_dict):
        if mode == "offline":  # W&B's process-wide settings too: else W&B still sends its own telemetry to the
            # server at exit (each request waiting up to 10 s where the server never answers)
            wandb.setup(settings=wandb.Settings(mode="offline"))
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
            settings=wandb.Settings(**timeouts()),
        )

    def _start_tensorboard(self, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tensorboard.enabled=true needs TensorBoard: pip install 'dist-bot[tensorboard]'") from None
        # A resumed run: TensorBoard drops what an earlier attempt logged after the checkpoint (a crash's lost
        # steps, logged again now) from the earlier event files.
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _wandb_failed(self, e: Exception) -> None:
        """W&B broke mid-run (its service died, the network went): keep training, keep metrics.jsonl."""
        log.warning(
            "W&B stopped working (%s: %s): this process goes on with metrics.jsonl only; a resumed run continues "
            "W&B run %s",
            type(e).__name__,
            redact_key(str(e)),
            self.wandb_id,
        )
        self.wandb_run = None

    def log(self, record: dict) -> None:
        """One metrics line: {"split": ..., "epoch": ..., "step": ..., ...}; also sent to W&B."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:  # the numbers, as W&B gets them: <split>/<key> at the optimizer step
            for k, v in record.items():
                if k not in ("split", "step") and isinstance(v, int | float) and not isinstance(v, bool):
                    self.tensorboard.add_scalar(f"{record['split']}/{k}", v, record["step"])
        if self.wandb_run is not None:
            split = record["split"]
            try:
                self.wandb_run.log(
                    {f"{split}/{k}": v for k, v in record.items() if k not in ("split", "step")}
                    | {"step": record["step"]}
                )
            except Exception as e:  # any W&B failure: training must go on
                self._wandb_failed(e)

    def summarize(self, summary: dict) -> None:
        """Set the run summary (see ``updated_summary``): W&B's, and <run dir>/summary.json."""
        if not self.enabled or not summary:
            return
        write_json_atomically(summary, self.run_dir / "summary.json")
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(summary)
            except Exception as e:  # any W&B failure: training must go on
                self._wandb_failed(e)

    def log_model(self, checkpoints: Path, export_model: Callable[[Path, Path], list[Path]], summary: dict) -> None:
        """W&B's model artifact of a finished run: the newest checkpoint in ``checkpoints``, exported by
        ``export_model(checkpoint, folder)`` into <run dir>/export/ (the main process, with W&B on and
        wandb.log_model). A failure is a warning: the run is done."""
        if not (self.enabled and self.log_models and self.wandb_run is not None):
            return
        checkpoint = list_checkpoints(checkpoints)[-1]
        try:
            files = export_model(checkpoint, self.run_dir / "export")
        except Exception as e:
            log.warning("no W&B model artifact: exporting %s failed (%s: %s)", checkpoint, type(e).__name__, e)
            return
        metadata = summary | {"checkpoint": checkpoint.name, "files": [f.name for f in files]}
        self.log_artifact(self.run_dir / "export", f"model-{self.wandb_run.id}", "model", metadata)

    def log_artifact(self, path: str | Path, name: str, type: str, metadata: dict | None = None):
        """Upload a file or folder as W&B artifact ``name`` of ``type`` (e.g. "model"), with ``metadata``; an
        offline run keeps it for `wandb sync`. Returns the artifact, or None where W&B is off or fails (one
        warning: a failed upload never fails the run)."""
        if not self.enabled:
            return None
        path = Path(path)
        if not path.exists():
            raise UserError(f"cannot log artifact {name!r}: {path} does not exist")
        if self.wandb_run is None:
            log.info("W&B is off for this run: %s is not logged as an artifact", path)
            return None
        try:
            import wandb

            artifact = wandb.Artifact(name, type=type, metadata=metadata)
            if path.is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            return self.wandb_run.log_artifact(artifact)
        except Exception as e:
            log.warning(
                "W&B did not take artifact %r (%s: %s): %s stays only on disk",
                name,
                e.__class__.__name__,  # `type` is the artifact's type here
                redact_key(str(e)),
                path,
            )
            return None

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()  # flushes the event file
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
