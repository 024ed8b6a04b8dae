"""Fine-tuning: model.init_from loads every weight but the classifier exactly (from a dist_bot run, its EMA, timm's
safetensors, torchvision's state dict), re-initialises the classifier for another class count, refuses another
architecture in one line, and yields to the run's own checkpoint on resume; model.freeze keeps parts fixed (their
BN statistics too); optim.backbone_lr_scale scales every lr but the classifier's."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from dist_bot.checkpoint import list_checkpoints, read_file, read_weights
from dist_bot.cli import main
from dist_bot.config import load_config
from dist_bot.distributed.env import DistEnv
from dist_bot.errors import ConfigError
from dist_bot.models.interop import from_timm
from dist_bot.train import Preempted, Trainer

TINY = ["data.loader=torch", "data.workers=0", "data.image_size=16", "data.batch_size=8", "precision=fp32"]
TINY += ["schedule.warmup_epochs=0", "run.log_every_steps=1"]


def classes_of(src: Path, out: Path, names: str, per_class: int = 8) -> Path:
    """The first ``per_class`` images of the classes ``names`` of each split, as symlinks."""
    for split in ("train", "val"):
        for name in names:
            (out / split / name).mkdir(parents=True)
            for f in sorted((src / split / name).iterdir())[:per_class]:
                (out / split / name / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="module")
def digits_5_to_9(digits_dir, tmp_path_factory) -> Path:
    return classes_of(digits_dir, tmp_path_factory.mktemp("five") / "data", "56789")


@pytest.fixture(scope="module")
def pretrained(tiny_digits, tmp_path_factory) -> Path:
    """A resnet10d run on the ten digits, with an EMA: the weights the fine-tuning runs start from."""
    out = tmp_path_factory.mktemp("pretrained")
    args = [f"data.path={tiny_digits}", f"run.out_dir={out}", "run.name=src", "model.name=resnet10d", *TINY]
    assert main(["train", "configs/demo.yaml", *args, "schedule.epochs=1", "model.ema_decay=0.9"]) == 0
    return out / "src"


def trainer(data: Path, out: Path, *extra: str) -> Trainer:
    cfg = load_config("configs/demo.yaml", [f"data.path={data}", f"run.out_dir={out}", *TINY, *extra])
    return Trainer(cfg, DistEnv())


def weights(t: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in t.strategy.module.state_dict().items()}


def equal(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_another_runs_weights_and_a_new_classifier_for_another_class_count(pretrained, digits_5_to_9, tmp_path, caplog):
    source = read_weights(list_checkpoints(pretrained / "checkpoints")[-1])
    with caplog.at_level(logging.INFO):
        got = weights(trainer(digits_5_to_9, tmp_path, "model.name=resnet10d", f"model.init_from={pretrained}"))
    assert equal(got, source, [k for k in source if not k.startswith("fc.")]) and got["fc.weight"].shape == (5, 512)
    scratch = weights(trainer(digits_5_to_9, tmp_path / "scratch", "model.name=resnet10d"))
    assert equal(got, scratch, ["fc.weight", "fc.bias"])  # the classifier a fresh run of this seed starts with
    assert "every weight but the classifier, re-initialised for 5 classes (10 there)" in caplog.text


def test_as_many_classes_load_the_classifier_too_and_init_from_ema_loads_the_ema(pretrained, tiny_digits, tmp_path):
    ema = read_file(list_checkpoints(pretrained / "checkpoints")[-1] / "ema.pt")
    extra = ["model.name=resnet10d", f"model.init_from={pretrained}", "model.init_from_ema=true"]
    got = weights(trainer(tiny_digits, tmp_path, *extra))
    assert equal(got, ema, ema) and got.keys() == ema.keys()


def test_timms_safetensors_and_torchvisions_state_dict_load_exactly(digits_5_to_9, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is the test-only reference (pip install -e '.[dev]')")
    from safetensors.torch import save_file

    torch.manual_seed(3)
    theirs = timm.create_model("resnet18d", num_classes=1000).state_dict()
    save_file(theirs, str(tmp_path / "resnet18d.safetensors"))
    init = f"model.init_from={tmp_path / 'resnet18d.safetensors'}"
    got, want = weights(trainer(digits_5_to_9, tmp_path, "model.name=resnet18d", init)), from_timm(theirs, "resnet18d")
    assert equal(got, want, [k for k in want if not k.startswith("fc.")])
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18(num_classes=5).state_dict()
    torch.save(tv, tmp_path / "resnet18.pth")
    got = weights(
        trainer(digits_5_to_9, tmp_path / "tv", "model.name=resnet18b", f"model.init_from={tmp_path}/resnet18.pth")
    )
    assert equal(got, from_timm(tv, "resnet18b"), got)  # five classes in both: the classifier too


def test_weights_of_another_architecture_are_refused_in_one_line(pretrained, digits_5_to_9, tmp_path):
    with pytest.raises(ConfigError) as e:
        trainer(digits_5_to_9, tmp_path, "model.name=resnet18d", f"model.init_from={pretrained}")
    message = str(e.value)
    assert "\n" not in message and "does not fit resnet18d" in message and "(resnet10d, 10 classes)" in message
    assert "missing layer1.1.conv1.weight" in message and "set model.name to the architecture" in message
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match=r"init_from_ema=true reads a dist_bot run's ema\.pt, but .* is a file"):
        trainer(digits_5_to_9, tmp_path, f"model.init_from={tmp_path}/w.pth", "model.init_from_ema=true")
    with pytest.raises(ConfigError, match=r"init_from_ema=true needs model\.init_from"):
        load_config(None, ["model.init_from_ema=true"])


@pytest.mark.slow  # a run stopped and resumed
def test_a_resumed_run_takes_its_checkpoints_weights_not_init_froms(pretrained, digits_5_to_9, tmp_path, caplog):
    source = shutil.copytree(pretrained, tmp_path / "source")
    args = ["train", "configs/demo.yaml", f"data.path={digits_5_to_9}", f"run.out_dir={tmp_path}", *TINY]
    args += ["model.name=resnet10d", f"model.init_from={source}", "schedule.epochs=2"]
    assert main([*args, "run.stop_after_steps=3"]) == 75
    shutil.rmtree(source)  # gone: a resume must not need it
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "model.init_from is not applied: the run resumes from its checkpoint" in caplog.text


@pytest.mark.parametrize("part", ["stem", "backbone"])
def test_frozen_parts_keep_their_weights_and_bn_statistics_and_the_backbone_lr_is_scaled(digits_5_to_9, tmp_path, part):
    t = trainer(digits_5_to_9, tmp_path, "model.name=resnet10d", f"model.freeze={part}", "optim.backbone_lr_scale=0.25")
    t.cfg.run.stop_after_steps = 2
    before = weights(t)
    with pytest.raises(Preempted):
        t.fit()
    after = weights(t)
    frozen = [k for k in before if k.startswith("stem.") or (part == "backbone" and not k.startswith("fc."))]
    assert equal(before, after, frozen)  # weights and BN running statistics alike
    trained = [k for k in before if k not in frozen and not k.endswith("num_batches_tracked")]
    # every trainable conv and linear weight moved (a BN gamma's first updates can lie below fp32's resolution at 1.0)
    assert [k for k in trained if before[k].dim() > 1 and torch.equal(before[k], after[k])] == []
    groups = t.strategy.optimizer.param_groups
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["decay_backbone" if part == "stem" else "decay_classifier"] > 0
    if part == "stem":
        assert lrs["decay_backbone"] == pytest.approx(0.25 * lrs["decay_classifier"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in t.strategy.module.parameters() if p.requires_grad
    )  # frozen parameters are in no group
