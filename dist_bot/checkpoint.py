"""Checkpoints: written atomically, the last K kept, the latest readable one found on resume.

A checkpoint is a folder ``checkpoints/step_<global step>/`` holding

    meta.pt     the run's state (train/state.py's RunState.state_dict()): epoch, step inside the epoch, global
                step, RNG states, loss-scale guard, resolved config, W&B run id, model name, classes
    model.pt    the full model state_dict in one file (for `dist-bot eval`, distillation, export)
    ema.pt      with model.ema_decay: the EMA of the weights, model.pt's keys and format (recipe/ema.py;
                ``read_weights(ema=True)``)
    ...         the strategy's training state (DDP: train_state.pt; FSDP: dcp/, torch.distributed.checkpoint
                shards that load at any world size)

Every process writes its part into ``.tmp_step_<N>/``; when all are done, rank 0 fsyncs the files, renames the
folder into place and fsyncs its parent, so a crash mid-write never leaves a half checkpoint under a real name. A
write that fails on any process (a full disk) is an error on every process, agreed by one collective, and the
previous checkpoint stays the newest. Temporary folders left by a crash are removed when a run starts.

Resuming, rank 0 chooses the checkpoint and every process reads its part of it completely (each file's CRC
checked) before any of it is applied; a checkpoint that some process cannot read is reported and the previous
one tried, all processes together (``agree_on_checkpoint``). Loading uses ``torch.load(weights_only=True)``: a
checkpoint cannot execute code.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError, CheckpointWriteError, UserError

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
# A checkpoint's files, named here once (the docstring above says what each holds)
META_FILE, MODEL_FILE, EMA_FILE, TRAIN_STATE_FILE = "meta.pt", "model.pt", "ema.pt", "train_state.pt"
CHECKPOINTS = "checkpoints"  # a run folder's checkpoints: <run dir>/checkpoints/step_<N>/
_NAME = re.compile(r"step_(\d+)$")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _gather(item: Any) -> list[Any]:
    """``item`` of every process, in rank order (a collective; just ``[item]`` without a process group)."""
    if not dist.is_initialized():
        return [item]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def _broadcast(item: Any) -> Any:
    """Rank 0's ``item`` on every process."""
    if not dist.is_initialized():
        return item
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _failure(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())  # one line


def _failures(e: BaseException) -> list[tuple[int | None, str]]:
    """(rank, error) pairs for an exception; rank None: this process. torch.distributed.checkpoint raises the
    same CheckpointException on every rank, naming the ranks that actually failed."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        return [(r, _failure(f[0] if isinstance(f, tuple) else f)) for r, f in sorted(failures.items())]
    return [(None, _failure(e))]


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: files created, renamed) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders in ``folder``, oldest first (by global step)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.tmp_*`` folders an interrupted save left behind (call before any process saves)."""
    stale = sorted(folder.glob(".tmp_*")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(folder: Path, step: int, keep_last: int, write: Callable[[Path], None]) -> Path:
    """Collective: every process calls ``write(tmp_dir)`` to add its files, then rank 0 renames the folder
    into place as ``folder/step_<step>`` and deletes all but the newest ``keep_last`` checkpoints.

    A failure on any process (the folder, a file, the rename) raises CheckpointWriteError on every process, with
    the failing ranks and their errors; nothing under a real name changes then. ``write`` should do its
    collectives before its local writes, so that a failing process does not leave the others inside one."""
    final = folder / f"step_{step:09d}"
    tmp = folder / f".tmp_step_{step:09d}"

    def agree(what: str, error: list[tuple[int | None, str]] | None) -> None:
        errors = _gather(error)
        failed = sorted({(r if at is None else at, e) for r, got in enumerate(errors) for at, e in got or ()})
        if not failed:
            return
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(folder)
        raise CheckpointWriteError(
            f"{what} checkpoint {final} failed on "
            + "; ".join(f"rank {r} ({e})" for r, e in failed)
            + f". Nothing was replaced: the newest checkpoint is {kept[-1] if kept else 'none (no checkpoint yet)'}."
            " Free space or fix the folder, then start the run again (it resumes from there)"
        )

    error = None
    if _is_main():
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _failures(e)
    agree("creating the folder of", error)
    error = None
    try:
        write(tmp)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # agreed below, so every process raises; DCP's CheckpointException is a BaseException
        error = _failures(e)
    agree("writing", error)
    error, old = None, folder / f".tmp_old_step_{step:09d}"
    if _is_main():
        try:
            fsync_tree(tmp)  # every file on disk before the folder gets its real name
            if final.exists():  # the same step saved before (a resumed run stopping again at once)
                final.rename(old)
            tmp.rename(final)  # atomic: the folder appears whole or not at all
            fsync_path(folder)  # ... and the rename itself is on disk
            shutil.rmtree(old, ignore_errors=True)
            for stale in list_checkpoints(folder)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            error = _failures(e)
            if old.exists() and not final.exists():
                old.rename(final)  # put the earlier save of this step back
    agree("renaming into place", error)
    return final


def write_file(obj, path: Path) -> None:
    """torch.save, flushed to disk before the folder is renamed into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def verify_file(path: Path) -> None:
    """Check a file torch.save wrote without unpickling it: every entry read back against its CRC (torch.load
    itself does not notice flipped bits in tensor data). Raises CheckpointError."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # missing, truncated (no central directory), not a zip
        raise CheckpointError(f"checkpoint file {path} is unreadable ({_failure(e)})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint file {path} is damaged (entry {bad} fails its CRC check)")


def read_file(path: Path, map_location="cpu"):
    verify_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # bad pickle, foreign objects: all mean "unusable"
        raise CheckpointError(f"checkpoint file {path} is unreadable ({_failure(e)})") from None


def read_meta(path: Path) -> dict:
    meta = read_file(Path(path) / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a dist_bot checkpoint (format {FORMAT_VERSION})")
    return meta


def read_model(path: Path, map_location="cpu") -> dict:
    """The full model state_dict of a checkpoint folder."""
    return read_file(Path(path) / MODEL_FILE, map_location)


def read_weights(path: Path, ema: bool = False, map_location="cpu") -> dict:
    """The raw weights (model.pt) of a checkpoint folder, or its EMA weights (ema.pt, the same keys)."""
    if not ema:
        return read_model(path, map_location)
    if not (Path(path) / EMA_FILE).exists():
        raise CheckpointError(
            f"checkpoint {path} has no EMA weights (no ema.pt): train with model.ema_decay=0.9998 (for example) to "
            "keep them, or leave out --ema to use the raw weights"
        )
    return read_file(Path(path) / EMA_FILE, map_location)


def load_checkpoint(path: Path, map_location="cpu", ema: bool = False) -> dict:
    """A checkpoint's metadata plus its full model weights (raw, or EMA with ``ema``) under ``"model"``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist: checkpoints are folders runs/NAME/checkpoints/step_N")
    return read_meta(path) | {"model": read_weights(path, ema, map_location)}


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder a user means by ``path``: a run folder (one holding checkpoints/) gives its newest
    checkpoint whose meta.pt and model.pt read back whole (older ones are tried past damaged ones, as a resume
    does), a checkpoint folder (one holding meta.pt) is itself. Anything else is a CheckpointError naming both."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if (path / CHECKPOINTS).is_dir():

        def check(step: Path) -> dict:
            verify_file(step / MODEL_FILE)
            return read_meta(step)

        found = load_latest_good(path / CHECKPOINTS, check)
        if found is None:
            raise CheckpointError(
                f"run folder {path} has no readable checkpoint in {path / 'checkpoints'}: train it (checkpoints are "
                "written after each run.checkpoint_every_epochs epochs), or name a checkpoint folder"
            )
        return found[0]
    what = "is neither a run folder (holding checkpoints/) nor a checkpoint folder (holding meta.pt)"
    raise CheckpointError(
        f"{path} {what if path.exists() else 'does not exist'}: name a run folder (runs/NAME) or a checkpoint "
        "folder (runs/NAME/checkpoints/step_N)"
    )


def class_names(meta: dict) -> list[str]:
    """The class names a checkpoint predicts, in label order (the class folders of its training data). Checkpoints
    written before meta.pt held them get class_0, class_1, ... with a warning."""
    names = meta.get("class_names")
    if names is not None:
        return list(names)
    log.warning("this checkpoint predates class names in meta.pt: its classes are called class_0, class_1, ...")
    return [f"class_{i}" for i in range(meta["num_classes"])]


def agree_on_checkpoint(folder: Path, read: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """Collective: the newest checkpoint in ``folder`` that EVERY process can ``read`` (rank 0 lists them; each
    process reads its part completely and nothing is applied here), with this process's result; None when there
    is no checkpoint. One that some process cannot read is reported and the previous one tried. If checkpoints
    exist but none is readable everywhere, or ``read`` raises any other UserError on some process, every process
    raises the same error: a run never silently starts again from scratch beside damaged checkpoints."""
    candidates = _broadcast([p.name for p in reversed(list_checkpoints(folder))] if _is_main() else None)
    damaged = []
    for name in candidates:
        path = folder / name
        try:
            result, error = read(path), None
        except CheckpointError as e:
            result, error = None, ("damaged", str(e))
        except UserError as e:
            result, error = None, ("fatal", str(e))
        errors = [(r, e) for r, e in enumerate(_gather(error)) if e is not None]
        if not errors:
            return path, result
        del result
        fatal = [msg for _, (kind, msg) in errors if kind == "fatal"]
        if fatal:
            raise CheckpointError(fatal[0])
        report = "; ".join(f"rank {r}: {msg}" for r, (_, msg) in errors)
        damaged.append(report)
        if _is_main():
            log.warning("checkpoint %s cannot be used (%s); trying the previous checkpoint", path, report)
    if damaged:
        raise CheckpointError(
            f"no checkpoint in {folder} is readable by every process: {' | '.join(damaged)}. Restore the damaged "
            f"files, or move {folder} aside to start the run again from scratch"
        )
    return None


def load_latest_good(folder: Path, load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    """``load`` the newest checkpoint that loads; unreadable ones are reported and skipped, never used."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path)
        except CheckpointError as e:
            log.warning("%s; trying the previous checkpoint", e)
    return None


def check_state_dict(state: Any, reference: dict, path: Path) -> None:
    """``state`` has exactly the keys, shapes and dtypes of ``reference`` (a module's state_dict); else
    CheckpointError. Checked before loading: ``load_state_dict`` copies the tensors that fit before it complains."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict ({type(state).__name__})")
    missing, extra = sorted(reference.keys() - state.keys()), sorted(state.keys() - reference.keys())
    if missing or extra:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, ref in reference.items():
        got = state[k]
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
            raise CheckpointError(f"{path}: {k} has shape {getattr(got, 'shape', None)}, the model's is {ref.shape}")


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """``state`` is an optimizer state_dict for ``optimizer``'s parameter groups (same groups, same sizes)."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != sizes:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model's parameter groups {sizes}")
