"""The submitit launcher without Slurm: sweeps, run names, checks before submitting, time limits, the requeue
decision after a stop, and a real run with `--cluster local`. (Against Slurm: tests/system/test_slurm.py.)"""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, run_cmd, run_statuses, runs_cmd

from dist_bot.config import load_config
from dist_bot.errors import UserError
from dist_bot.train import Preempted
from dist_bot.train.build import split_global_batch

sys.path.insert(0, str(REPO))
from launch.submit import TrainJob, _minutes, parse_sweeps, plan_runs


def test_sweeps_are_every_combination_in_order_and_keep_bracketed_lists():
    points = parse_sweeps(["optim.base_lr_per_256=0.1,0.2", "schedule.step_milestones=[30,60],[40,80]"])
    assert points == [
        {"optim.base_lr_per_256": "0.1", "schedule.step_milestones": "[30,60]"},
        {"optim.base_lr_per_256": "0.1", "schedule.step_milestones": "[40,80]"},
        {"optim.base_lr_per_256": "0.2", "schedule.step_milestones": "[30,60]"},
        {"optim.base_lr_per_256": "0.2", "schedule.step_milestones": "[40,80]"},
    ]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (["lr"], "not key=v1,v2"),
        (["a=1,,2"], "empty value"),
        (["a=[1,2"], "unbalanced"),
        (["a=1", "a=2"], "twice"),
    ],
)
def test_bad_sweeps_are_named(sweep, message):
    with pytest.raises(UserError, match=message):
        parse_sweeps(sweep)


def test_plan_names_each_point_checks_its_config_and_pins_paths(tmp_path):
    runs = plan_runs(
        "configs/demo.yaml",
        [f"run.out_dir={tmp_path}"],
        "ladder",
        ["config=configs/demo.yaml,configs/imagenette_cpu.yaml", "optim.base_lr_per_256=0.1"],
    )
    assert [r.name for r in runs] == ["ladder-demo,base_lr_per_256=0.1", "ladder-imagenette_cpu,base_lr_per_256=0.1"]
    for r in runs:
        cfg = load_config(r.config, r.overrides)  # exactly what the job will load
        assert cfg.run.name == r.name and cfg.run.out_dir == str(tmp_path)
        assert cfg.optim.base_lr_per_256 == 0.1 and cfg.wandb.group == "ladder"
        assert cfg.data.path.startswith("/")  # relative paths resolved where the user submitted
    assert load_config(runs[1].config, runs[1].overrides).model.name == "resnet50d"


def test_a_typo_fails_at_submission_not_in_the_queue(tmp_path):
    with pytest.raises(UserError, match=r"schedule\.epochs"):
        plan_runs("configs/demo.yaml", [], "x", ["schedule.epoch=1,2"])
    out = run_cmd([sys.executable, "-m", "launch.submit", "configs/demo.yaml", "optim.lr=1", "--dry-run"])
    assert out.returncode == 2 and "unknown config key 'optim.lr'" in out.stderr


def test_dry_run_prints_one_json_line_per_run():
    out = run_cmd(
        [sys.executable, "-m", "launch.submit", "configs/demo.yaml", "--sweep", "run.seed=1,2", "--name=s", "--dry-run"]
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["name"] for x in lines] == ["s-seed=1", "s-seed=2"]


@pytest.mark.parametrize(
    ("text", "minutes"), [("90", 90), ("1:30", 2), ("02:00:00", 120), ("2-00:00:00", 2880), ("1-12", 2160)]
)
def test_slurm_time_formats(text, minutes):
    assert _minutes(text) == minutes


def _stop(*signals):
    return Preempted(7, tuple(signals))


def test_requeue_goes_through_submitit_on_rank_0_only(monkeypatch):
    calls = []
    monkeypatch.setattr(signal, "getsignal", lambda s: lambda signum, frame: calls.append(signum))
    job = TrainJob(sigterm_wait_s=0)
    assert job._after_stop(_stop(signal.SIGTERM, signal.SIGUSR2), rank=1) == {"preempted_at_step": 7}
    assert calls == []
    job._after_stop(_stop(signal.SIGUSR2), rank=0)
    assert calls == [signal.SIGUSR2]


@pytest.mark.parametrize(("returncode", "ends"), [(-signal.SIGTERM, SystemExit), (1, subprocess.CalledProcessError)])
def test_a_requeue_whose_scontrol_the_requeue_itself_ended_exits_without_an_error(monkeypatch, returncode, ends):
    """Slurm's requeue SIGTERMs every process of the job, scontrol too, sometimes before it returns (seen in CI):
    that is a requeue that took, not the job's error; any other scontrol failure still is one."""

    def requeue(signum, frame):
        raise subprocess.CalledProcessError(returncode, ["scontrol", "requeue", "4"])

    monkeypatch.setattr(signal, "getsignal", lambda s: requeue)
    with pytest.raises(ends) as stopped:
        TrainJob(sigterm_wait_s=0)._after_stop(_stop(signal.SIGTERM, signal.SIGUSR2), rank=0)
    if ends is SystemExit:
        assert stopped.value.code == -1  # what submitit's own handler exits with after a requeue


@pytest.mark.parametrize("signals", [(), (signal.SIGTERM,), (signal.SIGUSR1,)])
def test_a_stop_without_submitits_signal_is_an_error_that_says_how_to_resume(signals):
    with pytest.raises(RuntimeError, match=r"step 7.*submit the same command again to resume"):
        TrainJob(sigterm_wait_s=0)._after_stop(_stop(*signals), rank=0)


@pytest.mark.parametrize(
    ("world", "cap", "accum", "expect"),
    [(8, 128, 1, (128, 1)), (32, 128, 1, (32, 1)), (4, 128, 1, (128, 2)), (2, 100, 1, (64, 8)), (8, None, 2, (64, 2))],
)
def test_global_batch_is_kept_on_any_world_size(world, cap, accum, expect):
    cfg = load_config(
        "configs/resnet50d_bs1024.yaml", [f"data.max_batch_size={cap or 'null'}", f"optim.grad_accum_steps={accum}"]
    )
    batch, steps = split_global_batch(cfg, world)
    assert (batch, steps) == expect and batch * world * steps == 1024


def test_a_global_batch_that_cannot_be_split_is_refused():
    cfg = load_config("configs/resnet50d_bs1024.yaml", [])
    with pytest.raises(UserError, match="multiple of 3"):
        split_global_batch(cfg, 3)


@pytest.mark.slow
def test_local_cluster_runs_the_job_without_slurm(tiny_digits, tmp_path):
    """`--cluster local`: the same TrainJob as 2 local processes (gloo), result back as JSON."""
    out = run_cmd(
        [
            sys.executable,
            "-m",
            "launch.submit",
            "configs/demo.yaml",
            f"data.path={tiny_digits}",
            f"run.out_dir={tmp_path}",
            "model.name=resnet10d",
            "data.batch_size=8",
            "data.loader=torch",
            "data.workers=0",
            "schedule.epochs=1",
            "--cluster",
            "local",
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--name",
            "local",
            "--wait",
        ]
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["state"] == "done" and result["result"]["samples"] == 40  # 4 val images x 10 classes
    assert result["result"]["run_dir"] == str(tmp_path / "local")
    assert (tmp_path / "local" / "metrics.jsonl").exists()


def test_sbatch_scripts_refuse_a_task_count_that_does_not_match_the_gpus():
    env = os.environ | {"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "7"}
    env |= {"SLURM_JOB_NAME": "x", "DIST_BOT_HOME": str(REPO)}
    cmd = "source slurm/lib/train_job.sh && dist_bot_train configs/demo.yaml"
    out = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--gpus-per-node=G --ntasks-per-node=G" in out.stderr


@pytest.mark.slow
def test_several_runs_one_after_another_in_one_torchrun_start_and_finish(tiny_digits, tmp_path):
    """cli.main(["train", ...]) three times in each process of one torchrun (2 processes, gloo): every run forms
    its process group, trains and ends; each group has key spaces of its own in torchrun's store, which outlives
    it (a second group reading the first one's rendezvous keys hung once in three tries)."""
    args = ["train", "configs/demo.yaml", f"data.path={tiny_digits}", "data.loader=torch", "data.workers=0"]
    args += ["model.name=resnet10d", "precision=fp32", "schedule.epochs=1", "wandb.mode=disabled"]
    args += [f"run.out_dir={tmp_path}"]
    res = run_cmd(runs_cmd(2, *([*args, f"run.name=s-{i}"] for i in range(3))), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert run_statuses(res.stdout) == {i: [0, 0] for i in range(3)}
    for i in range(3):
        assert [json.loads(x)["split"] for x in (tmp_path / f"s-{i}" / "metrics.jsonl").read_text().splitlines()][
            -1
        ] == "val"
