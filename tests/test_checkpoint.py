"""Checkpoints: atomic writes, keep-last-K, damaged files reported and skipped, no code execution."""

import logging
import pickle

import pytest
import torch

from dist_bot.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_good,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "global_step": step, "config": {"run": {"name": "x"}}}


def test_keeps_the_last_k_in_step_order(tmp_path):
    for step in (5, 10, 100, 1000):
        save_checkpoint(state(step), tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000100.pt", "step_000001000.pt"]
    assert not list(tmp_path.glob(".tmp_*"))  # no temporary file left behind


def test_truncated_latest_is_reported_and_the_previous_used(tmp_path, caplog):
    save_checkpoint(state(1), tmp_path, 1, keep_last=3)
    latest = save_checkpoint(state(2), tmp_path, 2, keep_last=3)
    latest.write_bytes(latest.read_bytes()[:100])  # a crash mid-copy, a full disk...
    with caplog.at_level(logging.WARNING):
        path, got = load_latest_good(tmp_path)
    assert path.name == "step_000000001.pt" and got["global_step"] == 1
    assert "step_000000002.pt is unreadable" in caplog.text


def test_a_failed_write_leaves_the_good_checkpoint(tmp_path, monkeypatch):
    good = save_checkpoint(state(1), tmp_path, 1, keep_last=3)

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(state(2), tmp_path, 2, keep_last=3)
    assert list_checkpoints(tmp_path) == [good] and not list(tmp_path.glob(".tmp_*"))
    assert load_checkpoint(good)["global_step"] == 1


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "step_000000001.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "x": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "step_000000001.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a dist_bot checkpoint"):
        load_checkpoint(path)
    assert load_latest_good(tmp_path) is None


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    save_checkpoint({"rng": rng_state()}, tmp_path, 1, keep_last=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    set_rng_state(load_checkpoint(list_checkpoints(tmp_path)[0])["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
