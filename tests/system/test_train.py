"""Training end to end: 2-process DDP runs under torchrun, exact evaluation, resume equality, preemption."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, link_subset, run_cmd, run_statuses, runs_cmd, torchrun_cmd

from dist_bot.checkpoint import list_checkpoints, load_checkpoint, read_file

TINY_MODEL = ["model.name=resnet10d", "data.workers=1", "wandb.mode=disabled"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]


def final_ema(run_dir: Path) -> dict:
    return read_file(list_checkpoints(run_dir / "checkpoints")[-1] / "ema.pt")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


# -- the full recipe on real ImageNet images, 2 processes -------------------------------------------


def every_trick_args(data: Path, out: Path, loader: str, *extra: str) -> list[str]:
    return [
        "train",
        "configs/demo.yaml",
        f"data.loader={loader}",
        f"data.path={data}",
        "data.image_size=64",
        "data.batch_size=16",
        "data.workers=1",
        f"run.out_dir={out}",
        "wandb.mode=disabled",
        # fp32: bf16/fp16 autocast is ~10x slower on a CPU, and the precision is not this test's subject
        # (test_sync_free.py runs every trick end to end in bf16 and in fp16)
        "precision=fp32",
        *extra,
    ]


@pytest.fixture(scope="module")
def every_trick(imagenette_subset, tmp_path_factory) -> Path:
    """A teacher (ResNet-10-C, 1 process, 1 epoch), then in one torchrun (2 processes, runs_probe.py) a ResNet-10-D
    student distilled from it with every trick, under each loader: FOLDER/student-<loader>."""
    out = tmp_path_factory.mktemp("every_trick")
    teacher = ["model.name=resnet10c", "run.name=teacher", "schedule.epochs=1", "schedule.warmup_epochs=0"]
    res = run_cmd(torchrun_cmd(1, *every_trick_args(imagenette_subset, out, "torch", *teacher)))
    assert res.returncode == 0, res.stderr[-3000:]
    student = [
        "model.name=resnet10d",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0.5",
        "optim.base_lr_per_256=0.4",
        "run.log_every_steps=1",
        "loss.label_smoothing=0.1",
        "loss.mixup_alpha=0.2",
        f"loss.distill.teacher={list_checkpoints(out / 'teacher' / 'checkpoints')[-1]}",
        "loss.distill.temperature=20",
        "data.hflip=true",
        "data.min_crop_area=0.08",
    ]
    loaders = [x for x in ("torch", "dali") if x != "dali" or importlib.util.find_spec("nvidia.dali")]
    runs = [every_trick_args(imagenette_subset, out, x, *student, f"run.name=student-{x}") for x in loaders]
    res = run_cmd(runs_cmd(2, *runs))
    assert run_statuses(res.stdout) == {i: [0, 0] for i in range(len(runs))}, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_two_processes_every_trick_on_imagenette_subset(every_trick, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    run_dir = every_trick / f"student-{loader}"
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if m["split"] == "train"]
    val = [m for m in metrics if m["split"] == "val"]
    assert {"epoch", "step", "lr", "loss", "img_per_s"} <= train[0].keys()
    assert {"epoch", "step", "top1", "top5", "loss", "samples"} <= val[0].keys()
    assert [v["samples"] for v in val] == [100, 100]  # 10 classes x 10 val images, once each, 2 ranks
    assert [t["step"] for t in train] == list(range(1, len(train) + 1))
    assert len(train) == 2 * 7  # 200 images / global batch 32: 6 full steps and one of 8, per epoch
    first, last = train[:3], train[-3:]
    assert sum(t["loss"] for t in last) < sum(t["loss"] for t in first), "the loss should fall"
    assert all(0 <= v["top1"] <= v["top5"] <= 100 for v in val)
    assert len(list_checkpoints(run_dir / "checkpoints")) == 2


# -- resume gives the same result as not stopping ---------------------------------------------------

LOADERS = ["torch", "dali"]


@pytest.fixture(scope="module", params=LOADERS)
def loader(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    return request.param


@pytest.fixture(scope="module")
def resume_digits(digits_dir, tmp_path_factory) -> Path:
    """61 train digits per class and all 360 val digits: 610 / global batch 64 = 9 full steps and one of 34 per
    epoch (a short last step, as most epochs have), and the exact evaluation over every val image."""
    return link_subset(digits_dir, tmp_path_factory.mktemp("resume") / "digits", {"train": 61, "val": 1000})


STEPS_PER_EPOCH = 10


@pytest.fixture(scope="module")
def first_launch(resume_digits, tmp_path_factory) -> Path:
    """One torchrun (2 processes, runs_probe.py) for each loader's straight run, FOLDER/<loader>/straight/r (2
    epochs, fp32, uninterrupted: the reference of the resume tests), and its run stopped at the end of epoch 1,
    FOLDER/<loader>/stopped/r: a start-up would cost more than each of these runs."""
    out = tmp_path_factory.mktemp("resume_runs")
    loaders = [x for x in LOADERS if x != "dali" or importlib.util.find_spec("nvidia.dali")]
    runs = []
    for x in loaders:
        runs.append(resume_args(resume_digits, x, out / x / "straight"))
        runs.append([*resume_args(resume_digits, x, out / x / "stopped"), f"run.stop_after_steps={STEPS_PER_EPOCH}"])
    res = run_cmd(runs_cmd(2, *runs))
    assert run_statuses(res.stdout) == {i: [75 * (i % 2)] * 2 for i in range(len(runs))}, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def straight_run(first_launch, loader) -> Path:
    return first_launch / loader / "straight" / "r"


# log (and agree on a stop) every 2 steps: a signal then stops the run mid-epoch, not at the end of one
RESUME_ARGS = [*TINY_MODEL, "precision=fp32", "schedule.epochs=2", "run.log_every_steps=2", "model.ema_decay=0.9998"]
# and every augmentation beyond the paper's on: each must resume exactly too
RESUME_ARGS += ["data.auto_augment=rand", "data.random_erasing=0.25", "data.interpolation=random"]
RESUME_ARGS += ["data.repeated_aug=2", "loss.mixup_alpha=0.2", "loss.cutmix_alpha=1.0"]


def resume_args(data: Path, loader: str, out_dir: Path) -> list[str]:
    """The straight run's command, into another run folder."""
    return [
        "train",
        "configs/demo.yaml",
        f"data.path={data}",
        *RESUME_ARGS,
        f"data.loader={loader}",
        f"run.out_dir={out_dir}",
        "run.name=r",
    ]


@pytest.mark.slow
def test_stop_after_one_epoch_and_resume_equals_straight_run(first_launch, straight_run, resume_digits, loader):
    folder = first_launch / loader / "stopped"  # stopped after the last step of epoch 1 (exit 75)
    args = resume_args(resume_digits, loader, folder)
    stopped = load_checkpoint(list_checkpoints(folder / "r" / "checkpoints")[-1])
    # a stop at the last step of an epoch checkpoints BEFORE the evaluation (Slurm's KillWait is short): the
    # epoch is done, its evaluation pending, and nothing was evaluated yet
    assert (stopped["epoch"], stopped["epoch_step"], stopped["global_step"], stopped["pending_eval"]) == (
        1,
        0,
        STEPS_PER_EPOCH,
        True,
    )
    assert not [m for m in read_metrics(folder / "r") if m["split"] == "val"]

    second = run_cmd(torchrun_cmd(2, *args))
    assert second.returncode == 0, second.stderr[-3000:]
    assert max_diff(final_weights(folder / "r"), final_weights(straight_run)) <= 1e-6
    assert max_diff(final_ema(folder / "r"), final_ema(straight_run)) <= 1e-6
    # the requeued run evaluated epoch 1 first, with the BN statistics the straight run evaluated with
    val = [m for m in read_metrics(folder / "r") if m["split"] == "val"]
    ref = [m for m in read_metrics(straight_run) if m["split"] == "val"]
    assert [(m["epoch"], m["step"], m["samples"]) for m in val] == [(m["epoch"], m["step"], 360) for m in ref]
    for got, want in zip(val, ref, strict=True):
        assert (got["top1"], got["top5"]) == pytest.approx((want["top1"], want["top5"]))
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert (got["ema_top1"], got["ema_top5"]) == pytest.approx((want["ema_top1"], want["ema_top5"]))
        assert got["ema_loss"] == pytest.approx(want["ema_loss"], rel=1e-5)


@pytest.mark.slow
def test_signal_to_one_rank_mid_epoch_checkpoints_all_and_resumes_exactly(
    straight_run, resume_digits, tmp_path, loader
):
    args = resume_args(resume_digits, loader, tmp_path)
    proc = subprocess.Popen(torchrun_cmd(2, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGUSR1)  # like a preemption notice that reached one task only
    out, err = proc.communicate(timeout=120)
    assert "exiting with status 75" in out, err[-3000:]
    stopped = load_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert stopped["epoch"] == 0 and 0 < stopped["epoch_step"] < STEPS_PER_EPOCH, "expected a mid-epoch checkpoint"

    resumed = run_cmd(torchrun_cmd(2, *args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_diff(final_weights(tmp_path / "r"), final_weights(straight_run)) <= 1e-6
    assert max_diff(final_ema(tmp_path / "r"), final_ema(straight_run)) <= 1e-6


@pytest.mark.slow
def test_sigterm_to_every_process_exits_75_with_a_resumable_checkpoint(tiny_digits, tmp_path):
    """As Slurm does at preemption: SIGTERM to the training process AND its helpers (DataLoader worker and
    forkserver); the helpers must not die of it before the last step and the checkpoint."""
    cmd = [
        sys.executable,
        "-m",
        "dist_bot",
        "train",
        "configs/demo.yaml",
        f"data.path={tiny_digits}",
        *TINY_MODEL,
        "precision=fp32",
        "data.loader=torch",
        "data.batch_size=4",
        "schedule.epochs=50",
        "run.log_every_steps=1",
        f"run.out_dir={tmp_path}",
        "run.name=r",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for line in proc.stdout:
        if line.startswith("epoch 1/50 step 3/"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    state = load_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert state["epoch"] == 0 and state["epoch_step"] >= 3
    resumed = run_cmd([*cmd, "run.stop_after_steps=2"])
    assert resumed.returncode == 75 and "resumed from" in resumed.stderr
    again = load_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert again["global_step"] == state["global_step"] + 2


@pytest.mark.slow
def test_eval_command_counts_every_validation_image(straight_run):
    cfg = straight_run / "config.yaml"
    res = run_cmd(torchrun_cmd(2, "eval", str(cfg), "--checkpoint", str(straight_run)))  # its newest checkpoint
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == str(list_checkpoints(straight_run / "checkpoints")[-1])
    ref = [m for m in read_metrics(straight_run) if m["split"] == "val"][-1]
    assert result["samples"] == 360
    assert result["top1"] == pytest.approx(ref["top1"]) and result["top5"] == pytest.approx(ref["top5"])


@pytest.mark.slow
def test_checkpoint_holds_everything_resume_needs(straight_run):
    path = list_checkpoints(straight_run / "checkpoints")[-1]
    assert sorted(p.name for p in path.iterdir()) == ["ema.pt", "meta.pt", "model.pt", "train_state.pt"]
    state = load_checkpoint(path)
    ema = read_file(path / "ema.pt")  # read like model.pt: the same keys, shapes and dtypes
    assert [(k, v.shape, v.dtype) for k, v in ema.items()] == [(k, v.shape, v.dtype) for k, v in state["model"].items()]
    assert {"epoch", "epoch_step", "global_step", "rng", "config", "wandb_id", "model_name", "guard"} <= state.keys()
    assert state["config"]["model"]["name"] == "resnet10d" and state["num_classes"] == 10
    assert state["class_names"] == [str(d) for d in range(10)]  # the class folders, in label order
    train_state = torch.load(path / "train_state.pt", weights_only=True)
    assert {"optimizer", "scaler"} <= train_state.keys()
    momentum = train_state["optimizer"]["state"]
    assert momentum and all(torch.isfinite(v["momentum_buffer"]).all() for v in momentum.values())


@pytest.mark.slow
def test_gradient_accumulation_trains_like_more_processes(tiny_digits, tmp_path):
    """1 process x 2 accumulated micro-batches of 8 == 2 processes x 8 (same images, same BN batches)."""
    common = [
        "train",
        "configs/demo.yaml",
        f"data.path={tiny_digits}",
        *TINY_MODEL,
        "precision=fp32",
        "data.image_size=16",
        "data.batch_size=8",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        f"run.out_dir={tmp_path}",
    ]
    ddp = run_cmd(torchrun_cmd(2, *common, "run.name=ddp"))
    accum = run_cmd(torchrun_cmd(1, *common, "run.name=accum", "optim.grad_accum_steps=2"))
    assert ddp.returncode == 0 and accum.returncode == 0, (ddp.stderr + accum.stderr)[-3000:]
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "accum")
    params = {k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert max_diff({k: a[k] for k in params}, {k: b[k] for k in params}) <= 1e-5


@pytest.mark.slow
def test_teacher_sees_exactly_the_students_mixed_input(tiny_digits, tmp_path):
    from dist_bot.config import load_config
    from dist_bot.distributed.env import DistEnv
    from dist_bot.errors import RunError
    from dist_bot.train import Preempted, Trainer
    from dist_bot.train.build import load_teacher

    common = [
        f"data.path={tiny_digits}",
        *TINY_MODEL,
        "precision=fp32",
        "data.image_size=16",
        "data.workers=0",
        "data.batch_size=8",
        f"run.out_dir={tmp_path}",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
    ]
    Trainer(load_config("configs/demo.yaml", [*common, "run.name=teacher", "model.name=resnet10c"]), DistEnv()).fit()
    teacher_ckpt = list_checkpoints(tmp_path / "teacher" / "checkpoints")[-1]
    # the teacher trained without an EMA (model.ema_decay=0, the default): no ema.pt, no ema_ metrics
    assert not (teacher_ckpt / "ema.pt").exists()
    assert not [k for m in read_metrics(tmp_path / "teacher") for k in m if k.startswith("ema")]
    with pytest.raises(RunError, match=r"has no ema\.pt .*teacher_weights=raw"):
        load_teacher(str(teacher_ckpt), 10, DistEnv(), channels_last=False, weights="ema")
    cfg = load_config(
        "configs/demo.yaml",
        [
            *common,
            "run.name=student",
            f"loss.distill.teacher={teacher_ckpt}",
            "loss.mixup_alpha=0.4",
            "run.stop_after_steps=2",
        ],
    )
    trainer = Trainer(cfg, DistEnv())
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    seen = {"student": [], "teacher": []}
    trainer.strategy.model.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0].clone()))
    trainer.teacher.register_forward_pre_hook(lambda m, args: seen["teacher"].append(args[0].clone()))
    with pytest.raises(Preempted):
        trainer.fit()
    assert len(seen["student"]) == len(seen["teacher"]) == 2
    for s, t in zip(seen["student"], seen["teacher"], strict=True):
        assert torch.equal(s, t)
    teacher_weights = load_checkpoint(teacher_ckpt)["model"]
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_weights.items())  # frozen


@pytest.mark.slow
def test_report_of_a_real_run_plots_it_and_tabulates_its_final_metrics(straight_run):
    out = run_cmd([sys.executable, "-m", "dist_bot", "report", str(straight_run)])
    assert out.returncode == 0, out.stderr[-3000:]
    final = [m for m in read_metrics(straight_run) if m["split"] == "val"][-1]
    row = next(x for x in out.stdout.splitlines() if x.startswith("| r |")).split("|")
    assert float(row[4]) == pytest.approx(final["top1"], abs=0.005)
    assert (straight_run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_teacher_can_be_named_by_its_run_folder(straight_run):
    from dist_bot.distributed.env import DistEnv
    from dist_bot.train.build import load_teacher

    teacher = load_teacher(str(straight_run), 10, DistEnv(), channels_last=False)
    assert max_diff(teacher.state_dict(), final_weights(straight_run)) == 0
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    ema_teacher = load_teacher(str(straight_run), 10, DistEnv(), channels_last=False, weights="ema")
    assert max_diff(ema_teacher.state_dict(), final_ema(straight_run)) == 0
    assert max_diff(ema_teacher.state_dict(), final_weights(straight_run)) > 0
