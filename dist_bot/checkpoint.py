"""Checkpoints: written atomically, the last K kept, the latest readable one found on resume.

A checkpoint is a folder ``checkpoints/step_<global step>/`` holding

    meta.pt     dist_bot's own state: epoch, step inside the epoch, global step, RNG states, loss-scale
                guard, resolved config, W&B run id, model name and number of classes
    model.pt    the full model state_dict in one file (for `dist-bot eval`, distillation, export)
    ...         the strategy's training state (DDP: train_state.pt; FSDP: dcp/, torch.distributed.checkpoint
                shards that load at any world size)

Every process writes its part into ``.tmp_step_<N>/``; when all are done, rank 0 renames it into place, so
a crash mid-write never leaves a half checkpoint under a real name. Loading uses
``torch.load(weights_only=True)``: a checkpoint cannot execute code.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import UserError

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
_NAME = re.compile(r"step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or is not dist_bot's."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders in ``folder``, oldest first (by global step)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, step: int, keep_last: int, write: Callable[[Path], None]) -> Path:
    """Collective: every process calls ``write(tmp_dir)`` to add its files, then rank 0 renames the folder
    into place as ``folder/step_<step>`` and deletes all but the newest ``keep_last`` checkpoints."""
    final = folder / f"step_{step:09d}"
    tmp = folder / f".tmp_step_{step:09d}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
        tmp.mkdir(parents=True)
    _barrier()
    try:
        write(tmp)
    except BaseException:
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if _is_main():
        if final.exists():  # the same step saved before (a resumed run stopping again at once)
            shutil.rmtree(final)
        tmp.rename(final)  # atomic: the folder appears whole or not at all
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def write_file(obj, path: Path) -> None:
    """torch.save, flushed to disk before the folder is renamed into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read_file(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, missing file: all mean "unusable"
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(e).__name__}: {e})") from None


def read_meta(path: Path) -> dict:
    meta = read_file(Path(path) / "meta.pt")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a dist_bot checkpoint (format {FORMAT_VERSION})")
    return meta


def read_model(path: Path, map_location="cpu") -> dict:
    """The full model state_dict of a checkpoint folder."""
    return read_file(Path(path) / "model.pt", map_location)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint's metadata plus its full model weights under ``"model"``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist: checkpoints are folders runs/NAME/checkpoints/step_N")
    return read_meta(path) | {"model": read_model(path, map_location)}


def load_latest_good(folder: Path, load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    """``load`` the newest checkpoint that loads; unreadable ones are reported and skipped, never used."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path)
        except CheckpointError as e:
            log.warning("%s; trying the previous checkpoint", e)
    return None
