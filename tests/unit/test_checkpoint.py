"""Checkpoints: atomic folders, keep-last-K, damaged files reported and skipped, no code execution."""

import logging
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_bot.checkpoint import (
    FORMAT_VERSION,
    agree_on_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_good,
    read_meta,
    remove_stale_temporaries,
    save_checkpoint,
    write_file,
)
from dist_bot.errors import CheckpointError, CheckpointWriteError
from dist_bot.train.state import ProcessRng


def process(device: str = "cpu", rank: int = 0) -> ProcessRng:
    """The RNG part of the run state of process ``rank`` of a run without a process group."""
    return ProcessRng(SimpleNamespace(device=torch.device(device), rank=rank, world_size=1, distributed=False))


def writer(step):
    def write(folder):
        write_file({"format": FORMAT_VERSION, "global_step": step}, folder / "meta.pt")
        write_file({"w": torch.full((3,), float(step))}, folder / "model.pt")

    return write


def test_keeps_the_last_k_in_step_order(tmp_path):
    for step in (5, 10, 100, 1000):
        save_checkpoint(tmp_path, step, keep_last=2, write=writer(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000100", "step_000001000"]
    assert not list(tmp_path.glob(".tmp_*"))  # no temporary folder left behind
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["global_step"] == 1000 and torch.equal(state["model"]["w"], torch.full((3,), 1000.0))


def test_truncated_latest_is_reported_and_the_previous_used(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, keep_last=3, write=writer(1))
    latest = save_checkpoint(tmp_path, 2, keep_last=3, write=writer(2))
    meta = latest / "meta.pt"
    meta.write_bytes(meta.read_bytes()[:100])  # a crash mid-copy, a full disk...
    with caplog.at_level(logging.WARNING):
        path, got = load_latest_good(tmp_path, read_meta)
    assert path.name == "step_000000001" and got["global_step"] == 1
    assert "step_000000002/meta.pt is unreadable" in caplog.text


def test_a_failed_write_leaves_the_good_checkpoint(tmp_path):
    good = save_checkpoint(tmp_path, 1, keep_last=3, write=writer(1))

    def half_written(folder):
        write_file({"format": FORMAT_VERSION}, folder / "meta.pt")
        raise OSError("No space left on device")

    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(tmp_path, 2, keep_last=3, write=half_written)
    assert "writing checkpoint" in str(e.value) and "rank 0 (OSError: No space left on device)" in str(e.value)
    assert f"the newest checkpoint is {good}" in str(e.value)
    assert list_checkpoints(tmp_path) == [good] and not list(tmp_path.glob(".tmp_*"))
    assert read_meta(good)["global_step"] == 1


def test_a_failed_rewrite_of_the_same_step_keeps_the_earlier_save(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, 1, keep_last=3, write=writer(1))
    real_rename = type(good).rename

    def rename(self, target):
        if self.name.startswith(".tmp_step_"):  # the new folder cannot take the real name
            raise OSError("Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(type(good), "rename", rename)
    with pytest.raises(CheckpointWriteError, match=r"renaming into place checkpoint .* failed on rank 0"):
        save_checkpoint(tmp_path, 1, keep_last=3, write=writer(1))
    assert list_checkpoints(tmp_path) == [good] and read_meta(good)["global_step"] == 1


def test_stale_temporary_folders_are_removed(tmp_path):
    good = save_checkpoint(tmp_path, 1, keep_last=3, write=writer(1))
    (tmp_path / ".tmp_step_000000007").mkdir()
    (tmp_path / ".tmp_step_000000007" / "meta.pt").write_bytes(b"half")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".tmp_step_000000007"]
    assert list(tmp_path.iterdir()) == [good]


def test_a_flipped_bit_in_tensor_data_is_caught_by_the_crc(tmp_path):
    latest = save_checkpoint(tmp_path, 1, keep_last=3, write=writer(1))
    model = latest / "model.pt"
    data = bytearray(model.read_bytes())
    data[data.index(torch.full((3,), 1.0).numpy().tobytes())] ^= 0x01  # torch.load alone would not notice
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt is damaged"):
        load_checkpoint(latest)


def test_agreement_falls_back_past_a_damaged_checkpoint_and_never_starts_fresh(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, keep_last=3, write=writer(1))
    latest = save_checkpoint(tmp_path, 2, keep_last=3, write=writer(2))
    (latest / "model.pt").write_bytes((latest / "model.pt").read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        path, state = agree_on_checkpoint(tmp_path, load_checkpoint)
    assert path.name == "step_000000001" and state["global_step"] == 1
    assert "step_000000002 cannot be used (rank 0: checkpoint file" in caplog.text
    first = path / "meta.pt"
    first.write_bytes(first.read_bytes()[:50])  # now no checkpoint is readable: an error, not a fresh start
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* is readable by every process: rank 0: "):
        agree_on_checkpoint(tmp_path, load_checkpoint)
    assert agree_on_checkpoint(tmp_path / "none", load_checkpoint) is None


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "step_000000001").mkdir()
    with open(tmp_path / "step_000000001" / "meta.pt", "wb") as f:
        pickle.dump({"format": FORMAT_VERSION, "x": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="unreadable"):
        read_meta(tmp_path / "step_000000001")


def test_foreign_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_000000001").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "step_000000001" / "meta.pt")
    with pytest.raises(CheckpointError, match="not a dist_bot checkpoint"):
        read_meta(tmp_path / "step_000000001")
    assert load_latest_good(tmp_path, read_meta) is None
    with pytest.raises(CheckpointError, match="does not exist: checkpoints are folders"):
        load_checkpoint(tmp_path / "step_000000002")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    save_checkpoint(
        tmp_path,
        1,
        keep_last=1,
        write=lambda d: write_file({"format": FORMAT_VERSION, "rng": process().state_dict()}, d / "meta.pt"),
    )
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    process().load_state_dict(read_meta(list_checkpoints(tmp_path)[0])["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


@pytest.mark.parametrize("layout", ["cuda_by_rank", "rank 0's get_rng_state_all"])
def test_each_process_restores_its_own_gpus_rng_state_and_no_other(monkeypatch, layout):
    """A checkpoint of 8 ranks (or, the older layout, of rank 0 seeing 8 GPUs), resumed where each process sees
    one GPU (srun --gpus-per-task=1): each restores the state saved for it, on its one device; restoring all 8
    (set_rng_state_all) failed on every rank there. Faked on a CPU: the states are tensors, the calls recorded."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    saved = process().state_dict()  # a CPU process saves no GPU state: put the 8 ranks' in
    state = saved | ({"cuda_by_rank": states} if layout == "cuda_by_rank" else {"cuda_by_rank": [], "cuda": states})
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((int(s[0]), device)))
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda _: pytest.fail("restored the states of GPUs it does not see")
    )
    for rank in (0, 5):
        calls.clear()
        process("cuda:0", rank).load_state_dict(state)
        # the older layout knows only rank 0's view: device 0's state, whatever the rank
        assert calls == [(rank if layout == "cuda_by_rank" else 0, torch.device("cuda", 0))]
    calls.clear()
    process("cuda:0", 5).load_state_dict(saved | {"cuda_by_rank": states[:2]})  # a rank the checkpoint did not have
    assert calls == []
