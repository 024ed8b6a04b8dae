"""W&B tracking: offline without a key, the run id kept in checkpoints, the same run continued on resume."""

import pytest

from dist_bot.checkpoint import list_checkpoints, load_checkpoint
from dist_bot.cli import main
from dist_bot.tracking import resolve_wandb_mode


def test_auto_mode_is_offline_without_a_key_and_online_with_one(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_offline_run_is_resumed_under_the_same_id(monkeypatch, capsys, tiny_digits, tmp_path):
    pytest.importorskip("wandb", reason="W&B tracking needs wandb (pip install -e '.[wandb]')")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [
        "train",
        "configs/demo.yaml",
        f"data.path={tiny_digits}",
        f"run.out_dir={tmp_path}",
        "data.workers=0",
        "model.name=resnet18d",
        "data.batch_size=8",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "run.log_every_steps=2",
        "wandb.mode=auto",
    ]
    assert main([*args, "run.stop_after_steps=3"]) == 75
    run_dir = tmp_path / "demo"
    first_id = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["wandb_id"]
    assert first_id
    assert main(args) == 0
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["wandb_id"] == first_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)
    logged = b"".join(f.read_bytes() for r in runs for f in r.glob("*.wandb"))
    assert b"train/loss" in logged and b"val/top1" in logged
    assert b"x" * 40 not in logged
