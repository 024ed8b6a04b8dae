"""Resolution: progressive resizing (data.progressive) on both loaders, exact on resume; validation at its own size
(data.val_image_size); `dist-bot eval --image-sizes` scores one checkpoint at several sizes."""

import json

import pytest
import torch

from dist_bot.checkpoint import list_checkpoints, read_weights
from dist_bot.cli import main
from dist_bot.config import load_config
from dist_bot.data import make_loaders
from dist_bot.data.loader import micro_batches
from dist_bot.data.plan import train_size
from dist_bot.distributed.env import DistEnv
from dist_bot.errors import ConfigError

# 16 px at epoch 0, 24 at epoch 1, 32 from epoch 2 (steps of 8)
RAMP = ["data.image_size=32", "data.progressive.min_size=16", "data.progressive.end_epoch=2"]
RAMP += ["data.progressive.step=8", "schedule.epochs=4", "schedule.warmup_epochs=0"]


def test_the_size_ramps_from_min_size_to_image_size_rounded_down_to_the_step():
    ffcv = [train_size(e, 192, 160, 2, 10, 32) for e in range(12)]  # FFCV's rn50 ramp: 160 -> 192, epochs 2-10
    assert ffcv == [160, 160, 160, 160, 160, 160, 160, 160, 160, 160, 192, 192]  # 188 rounds down to 160
    assert [train_size(e, 128, 96, 0, 4, 16) for e in range(6)] == [96, 96, 112, 112, 128, 128]
    assert [train_size(e, 128, None, 0, 4, 16) for e in range(3)] == [128, 128, 128]  # off
    assert [train_size(e, 100, 50, 1, 3, 32) for e in range(4)] == [50, 50, 64, 100]  # never below min_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.progressive.min_size=48"], r"min_size=48 is above data\.image_size=32"),
        (["data.progressive.end_epoch=4"], r"end_epoch=4 is past the last epoch \(3; epochs are counted from 0\)"),
        (["data.progressive.start_epoch=2"], r"start_epoch=2 is not before end_epoch=2"),
    ],
)
def test_a_schedule_that_does_not_fit_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*RAMP, *overrides])


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_both_loaders_serve_each_epochs_size_and_resume_inside_it_exactly(loader, tiny_digits):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    cfg = load_config(
        None,
        [f"data.path={tiny_digits}", f"data.loader={loader}", "data.batch_size=8", "data.workers=1", *RAMP],
    )
    train, val = make_loaders(cfg, DistEnv())
    try:
        epochs = {}
        for epoch in range(3):
            train.set_epoch(epoch)
            epochs[epoch] = [x.clone() for x, _ in micro_batches(train)]
            assert {tuple(x.shape[-2:]) for x in epochs[epoch]} == {(8 * (2 + epoch),) * 2}
        train.set_epoch(1, start_step=3)  # a resume inside epoch 1: the same images, the same size
        resumed = [x for x, _ in micro_batches(train)]
        assert len(resumed) == len(epochs[1]) - 3
        assert all(torch.equal(a, b) for a, b in zip(resumed, epochs[1][3:], strict=True))
        assert {tuple(x.shape[-2:]) for x, _ in val} == {(32, 32)}  # validation at data.image_size
    finally:
        train.close()
        val.close()
    cfg = load_config(None, [f"data.path={tiny_digits}", f"data.loader={loader}", "data.val_image_size=40", *RAMP])
    _, val = make_loaders(cfg, DistEnv())
    try:
        assert {tuple(x.shape[-2:]) for x, _ in val} == {(40, 40)}
    finally:
        val.close()


@pytest.mark.slow  # three short runs
def test_a_progressive_run_resumed_mid_ramp_ends_with_the_uninterrupted_runs_weights(tiny_digits, tmp_path, capsys):
    args = ["train", "configs/demo.yaml", f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", *RAMP]
    args += ["model.name=resnet10d", "precision=fp32", "data.loader=torch", "data.workers=0", "data.batch_size=8"]
    assert main([*args, "run.name=straight"]) == 0
    assert main([*args, "run.name=stopped", "run.stop_after_steps=7"]) == 75  # inside epoch 1 (5 steps an epoch)
    assert main([*args, "run.name=stopped"]) == 0
    a, b = (read_weights(list_checkpoints(tmp_path / n / "checkpoints")[-1]) for n in ("straight", "stopped"))
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()) <= 1e-6
    capsys.readouterr()
    checkpoint = str(tmp_path / "straight")
    config = str(tmp_path / "straight" / "config.yaml")
    assert main(["eval", config, "--checkpoint", checkpoint, "--image-sizes", "24,32,40"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image_size"] for r in rows] == [24, 32, 40] and {r["samples"] for r in rows} == {40}
    assert len({r["loss"] for r in rows}) == 3  # each size its own images
    assert main(["eval", config, "--checkpoint", checkpoint, "--image-sizes", "24,x"]) == 2
    assert "--image-sizes 24,x: give sizes in pixels separated by commas" in capsys.readouterr().err
