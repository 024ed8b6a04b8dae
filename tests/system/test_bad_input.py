"""Bad input gets a clear error that names the problem and the fix, and nothing is lost."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from dist_bot.checkpoint import list_checkpoints, load_checkpoint
from dist_bot.cli import main
from dist_bot.config import load_config
from dist_bot.distributed.env import DistEnv
from dist_bot.errors import RunError
from dist_bot.train import Trainer

TINY = ["model.name=resnet10d", "data.workers=0", "data.batch_size=8", "wandb.mode=disabled", "schedule.epochs=2"]
# fp32 unless a test's subject is the precision (it overrides it: bf16/fp16 autocast is ~10x slower on a CPU),
# and 16 px: no check here depends on the image size
TINY += ["precision=fp32", "data.image_size=16"]


def train(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", "configs/demo.yaml", *TINY, *args])
    return code, capsys.readouterr().err


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


def test_unknown_config_key(capsys, tiny_digits, tmp_path):
    code, err = train(capsys, f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", "optim.lrr=0.1")
    assert code == 2 and "unknown config key 'optim.lrr'" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # nothing created


def test_unknown_model_name(capsys, tiny_digits, tmp_path):
    code, err = train(capsys, f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", "model.name=resnet51d")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "unknown model 'resnet51d'. Did you mean resnet50d" in err
    assert not (tmp_path / "demo").exists()  # refused before anything is made


def test_yaml_syntax_errors_name_the_file_and_the_place(capsys, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  name: resnet10d\ndata:\n  batch_size: [8\n  workers: 1\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"recipe {recipe} is not valid YAML: line 5, column 10: expected ','" in err
    assert main(["config", "configs/demo.yaml", "data.mean=[0.5,0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "override 'data.mean=[0.5,0.5': cannot read '[0.5,0.5' as a list" in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "data.path=.* does not exist"),
        (lambda d: (d / "val").mkdir(parents=True), "has no 'train/' folder"),
        (lambda d: (d / "train" / "cat").mkdir(parents=True), "has no 'val/' folder"),
    ],
)
def test_missing_data_folders(capsys, tmp_path, make, message):
    data = tmp_path / "data"
    make(data)
    code, err = train(capsys, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}")
    assert code == 2 and err.count("\n") == 1
    assert re.search(message, err), err


def test_data_path_not_set(capsys, tmp_path):
    code, err = train(capsys, "data.path=null", f"run.out_dir={tmp_path}")
    assert code == 2 and "data.path is not set: pass data.path=" in err


def test_class_folder_without_images(capsys, tiny_digits, tmp_path):
    data = copy_tree(tiny_digits, tmp_path / "data")
    (data / "train" / "empty").mkdir()
    (data / "train" / "empty" / "notes.txt").write_text("no images here")
    code, err = train(capsys, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}")
    assert code == 2 and f"class folder {data / 'train' / 'empty'} has no images" in err


def test_val_class_unknown_to_train(capsys, tiny_digits, tmp_path):
    data = copy_tree(tiny_digits, tmp_path / "data")
    shutil.copytree(data / "val" / "3", data / "val" / "33")
    code, err = train(capsys, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}")
    assert code == 2 and "has classes that train/ lacks: 33" in err


def test_num_classes_checked_against_the_data(capsys, tiny_digits, tmp_path):
    code, err = train(capsys, f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", "model.num_classes=1000")
    assert code == 2 and "model.num_classes=1000 but" in err and "has 10 class folders" in err


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_corrupt_image_is_named_or_skipped_and_counted(capsys, caplog, tiny_digits, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    data = copy_tree(tiny_digits, tmp_path / "data")
    bad = data / "train" / "4" / "0000_truncated.jpg"
    bad.write_bytes((data / "train" / "4").iterdir().__next__().read_bytes()[:40])  # a truncated JPEG
    (data / "train" / "5" / "0001_not_an_image.jpg").write_text("<html>404</html>")
    code, err = train(
        capsys, f"data.path={data}", f"run.out_dir={tmp_path / 'a'}", "schedule.epochs=1", f"data.loader={loader}"
    )
    assert code == 2 and "cannot read image" in err and "data.skip_bad_images=true" in err
    assert "0000_truncated.jpg" in err or "0001_not_an_image.jpg" in err

    with caplog.at_level(logging.WARNING):
        code, err = train(
            capsys,
            f"data.path={data}",
            f"run.out_dir={tmp_path / 'b'}",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            "data.skip_bad_images=true",
            f"data.loader={loader}",
        )
    assert code == 0, err
    assert "skipped 2 unreadable images this epoch" in caplog.text
    assert "0000_truncated.jpg" in caplog.text and "0001_not_an_image.jpg" in caplog.text


def test_global_batch_that_does_not_split_over_processes(capsys, tiny_digits, tmp_path):
    code, err = train(
        capsys,
        f"data.path={tiny_digits}",
        f"run.out_dir={tmp_path}",
        "data.global_batch_size=15",
        "optim.grad_accum_steps=2",
    )
    assert code == 2 and "data.global_batch_size=15 does not split evenly over 1 processes x 2" in err


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_in_the_data_is_never_applied_and_the_last_good_checkpoint_is_kept(
    tiny_digits, tmp_path, monkeypatch, precision
):
    """One NaN pixel in the first batch of epoch 2 reaches the loss and the gradients; the step is skipped on the
    device, the log step stops the run, and the weights at the stop are those before the poisoned step: the
    epoch-1 checkpoint, which is the one kept."""
    cfg = load_config(
        "configs/demo.yaml",
        [
            *TINY,
            f"data.path={tiny_digits}",
            f"run.out_dir={tmp_path}",
            f"precision={precision}",
            "run.log_every_steps=1",
        ],
    )
    trainer = Trainer(cfg, DistEnv())
    params = trainer.strategy.module.named_parameters
    before = {}
    real = Trainer.micro_loss

    def poisoned(self, micro):
        if self.epoch == 1 and self.epoch_step == 0:
            before.update({k: v.detach().clone() for k, v in params()})
            micro.images[0, 0, 0, 0] = float("nan")
        return real(self, micro)

    monkeypatch.setattr(Trainer, "micro_loss", poisoned)
    with pytest.raises(RunError, match=r"training loss is nan at epoch 2 step 1: stopping; the last good checkpoint"):
        trainer.fit()
    after = dict(params())
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    (good,) = list_checkpoints(tmp_path / "demo" / "checkpoints")
    state = load_checkpoint(good)
    assert state["epoch"] == 1 and state["global_step"] == trainer.global_step - 1
    assert all(torch.equal(state["model"][k], before[k]) for k in before)


@pytest.mark.slow
def test_run_folder_of_another_run_is_never_overwritten(capsys, tiny_digits, tmp_path):
    common = [f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", "schedule.epochs=1", "schedule.warmup_epochs=0"]
    assert train(capsys, *common)[0] == 0
    before = (tmp_path / "demo" / "metrics.jsonl").read_text()
    code, err = train(capsys, *common, "model.name=resnet10c")
    assert code == 2 and "holds a run with a different config (model.name: 'resnet10d' -> 'resnet10c')" in err
    code, err = train(capsys, *common, "run.resume=never")
    assert code == 2 and "already exists and run.resume=never" in err
    assert (tmp_path / "demo" / "metrics.jsonl").read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("precious")
    code, err = train(capsys, *common, "run.name=other")
    assert code == 2 and "is not a dist_bot run folder" in err


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(capsys, tiny_digits, tmp_path):
    common = [f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", "schedule.epochs=1", "schedule.warmup_epochs=0"]
    assert train(capsys, *common, "run.name=a")[0] == 0
    assert train(capsys, *common, "run.name=b", "model.name=resnet10c", "run.stop_after_steps=1")[0] == 75
    foreign = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    shutil.copytree(foreign, tmp_path / "b" / "checkpoints" / "step_001000000")  # planted as b's newest
    code, err = train(capsys, *common, "run.name=b", "model.name=resnet10c")
    assert code == 2 and "is of resnet10d with 10 classes, but this run builds resnet10c" in err


@pytest.mark.slow
def test_fp16_overflow_backs_off_the_logged_loss_scale_then_it_grows(capsys, tiny_digits, tmp_path, monkeypatch):
    """An inf in one gradient at step 2: the logged scale goes from S to S * loss_scale.backoff_factor there and
    skipped_steps counts exactly that step; after loss_scale.growth_interval clean steps the scale doubles."""
    from dist_bot.distributed.ddp import DDPStrategy

    real_backward, calls = DDPStrategy.backward, []

    def backward(self, loss):
        real_backward(self, loss)
        calls.append(1)
        if len(calls) == 2:
            grad = next(self.module.parameters()).grad
            grad[(0,) * grad.dim()] = float("inf")

    monkeypatch.setattr(DDPStrategy, "backward", backward)
    args = [
        f"data.path={tiny_digits}",
        f"run.out_dir={tmp_path}",
        "precision=fp16",
        "loss_scale.init_scale=256",
        "loss_scale.backoff_factor=0.25",
        "loss_scale.growth_interval=3",
        "schedule.warmup_epochs=0",
        "run.log_every_steps=1",
        "run.stop_after_steps=8",
    ]
    code = main(["train", "configs/demo.yaml", *TINY, *args])
    out = capsys.readouterr().out
    assert code == 75  # run.stop_after_steps
    lines = [json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train_lines] == list(range(1, 9))
    # step 1 clean; 2 overflows: 256 * 0.25; 3-5 clean: x2 after the third; 6-8 clean: x2 again
    assert [x["loss_scale"] for x in train_lines] == [256, 64, 64, 64, 128, 128, 128, 256]
    assert [x["skipped_steps"] for x in train_lines] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert " scale " in out and " skipped " in out  # the progress line shows them
