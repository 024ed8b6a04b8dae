"""A training step never waits for the device: no host-device synchronisation between two log steps.

On a GPU every such wait empties the queue of work the host has put ahead, so data loading is no longer hidden
behind compute. On CPU the waits cannot be timed, but the calls that make them can be counted
(tests/probes/sync_probe.py patches them); tests/system/test_gpu.py runs the same recipe under CUDA's sync debug mode.
"""

import json
import sys

import pytest
from conftest import REPO, run_cmd, torchrun_cmd
from sync_probe import Recorder, install

from dist_bot.checkpoint import list_checkpoints

STEPS, LOG_EVERY = 8, 3
SIZE = 16  # px: the syncs do not depend on it, and bf16/fp16 autocast is ~10x slower than fp32 on a CPU


@pytest.fixture(scope="module")
def teacher(tiny_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    res = run_cmd(
        torchrun_cmd(
            1,
            "train",
            "configs/demo.yaml",
            f"data.path={tiny_digits}",
            "model.name=resnet18a",
            "precision=fp32",  # the teacher's own training is not the subject (the students' precision is)
            f"data.image_size={SIZE}",
            "data.workers=1",
            "data.batch_size=8",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            f"run.out_dir={out}",
            "run.name=teacher",
        )
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return list_checkpoints(out / "teacher" / "checkpoints")[-1]


def loader_for(precision: str) -> str:
    """fp16 runs with DALI (it emits fp16 batches) where it is installed; bf16 with the DataLoader."""
    if precision == "fp16":
        try:
            import nvidia.dali  # noqa: F401

            return "dali"
        except ImportError:
            pass
    return "torch"


@pytest.mark.parametrize(
    ("precision", "extra"),
    [
        ("bf16", ["optim.grad_clip_norm=1.0", "loss.mixup_pairing=permute", "loss.cutmix_alpha=1.0"]),
        ("fp16", ["data.random_erasing=0.5", "data.auto_augment=trivial"]),
    ],
    ids=["bf16-clip-permute-cutmix", "fp16-erasing-trivialaugment"],
)
@pytest.mark.slow
def test_two_processes_train_with_every_trick_and_never_wait_between_log_steps(
    tiny_digits, teacher, tmp_path, precision, extra
):
    overrides = [
        f"data.path={tiny_digits}",
        f"data.loader={loader_for(precision)}",
        "model.name=resnet18d",
        f"data.image_size={SIZE}",
        "data.batch_size=4",
        "data.workers=1",
        f"precision={precision}",
        "data.pca_lighting=0.1",
        "loss.mixup_alpha=0.2",
        "loss.label_smoothing=0.1",
        f"loss.distill.teacher={teacher}",
        "schedule.epochs=1",
        f"run.log_every_steps={LOG_EVERY}",
        f"run.stop_after_steps={STEPS}",
        f"run.out_dir={tmp_path}",
        "run.name=probe",
        "model.ema_decay=0.9998",  # the EMA's update every step must not wait either
        *extra,
    ]
    probe = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = run_cmd([*probe, str(REPO / "tests" / "probes" / "sync_probe.py"), str(tmp_path), *overrides])
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["steps"] == STEPS
        assert got["in_step"] == [], f"rank {rank} waited for the device inside a step:\n" + "\n".join(got["in_step"])
        assert got["in_log"] > 0, "the log steps read the device: the probe must see that"
    lines = [json.loads(x) for x in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == [3, 6, 8]  # two log steps and the stop
    assert all(x["data_s"] >= 0 for x in train)
    if precision == "fp16":
        assert all(x["loss_scale"] > 0 and x["skipped_steps"] >= 0 for x in train)


def test_the_probe_sees_a_step_that_waits(tmp_path, monkeypatch):
    """The counting itself can fail: a step that reads the loss (as a naive progress print would) is caught."""
    from dist_bot.config import load_config
    from dist_bot.distributed.env import DistEnv
    from dist_bot.train import Preempted, Trainer

    overrides = ["data.loader=synthetic", "model.num_classes=10", "model.name=resnet18a"]
    overrides += ["data.batch_size=8", "run.stop_after_steps=2", f"run.out_dir={tmp_path}"]
    trainer = Trainer(load_config("configs/demo.yaml", overrides), DistEnv())
    real = Trainer.micro_loss

    def reads_the_loss(self, micro):
        loss = real(self, micro)
        print(f"loss {loss.item():.3f}")
        return loss

    monkeypatch.setattr(Trainer, "micro_loss", reads_the_loss)
    rec = Recorder(monkeypatch.setattr)
    install(rec)
    with pytest.raises(Preempted):
        trainer.fit()
    assert len(rec.in_step) == 2 and all(x.startswith("Tensor.item") for x in rec.in_step)
