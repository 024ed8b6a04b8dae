"""DDP and FSDP2 behind one interface: the same training, the same fp16 loss scaling, resumable checkpoints."""

import json
import sys

import pytest
from conftest import REPO, run_cmd, torchrun_cmd

from dist_bot.checkpoint import list_checkpoints, load_checkpoint, read_meta

STRATEGIES = ["ddp", "fsdp"]
# channels_last off: FSDP2 keeps conv weights contiguous (it shards flat parameters), DDP would keep them
# channels_last, and the two convolution algorithms round differently (1e-7), which 10 steps of small-batch
# training amplify to 1e-3. With the same memory format the strategies agree to the last bit.
COMMON = [
    "model.channels_last=false",
    "model.name=resnet18d",
    "data.workers=1",
    "wandb.mode=disabled",
    "precision=fp32",
    "data.batch_size=16",
    "schedule.epochs=1",
    "run.log_every_steps=1",
]


def train_losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["split"] == "train"]


@pytest.fixture(scope="module")
def ten_steps(digits_dir, tmp_path_factory):
    """10 optimizer steps of resnet18d with the full recipe (label smoothing, mixup, warmup, no bias decay,
    Nesterov) under each strategy, 2 processes, fp32, same seed and data."""
    out = tmp_path_factory.mktemp("strategies")
    runs = {}
    for strategy in STRATEGIES:
        res = run_cmd(
            torchrun_cmd(
                2,
                "train",
                "configs/demo.yaml",
                f"data.path={digits_dir}",
                *COMMON,
                f"strategy={strategy}",
                "run.stop_after_steps=10",
                f"run.out_dir={out}",
                f"run.name={strategy}",
            )
        )
        assert "exiting with status 75" in res.stdout, res.stderr[-3000:]
        runs[strategy] = out / strategy
    return runs


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp"])
def test_same_losses_and_weights_as_ddp(ten_steps, strategy):
    ref, got = train_losses(ten_steps["ddp"]), train_losses(ten_steps[strategy])
    assert len(ref) == len(got) == 10
    assert got == pytest.approx(ref, rel=1e-4)
    a = load_checkpoint(list_checkpoints(ten_steps["ddp"] / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(ten_steps[strategy] / "checkpoints")[-1])["model"]
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_overflow_on_one_rank_skips_the_step_on_all(strategy, tmp_path):
    res = run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "strategy_probe.py"),
            strategy,
            str(tmp_path),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["steps"] == [False, True]  # skipped on both ranks, then a clean step
        assert got["scales"] == [512.0, 512.0]  # halved once, not yet grown back
        assert got["changed"] == [False, True]


def test_fsdp_resume_equals_straight_and_loads_at_another_world_size(ten_steps, digits_dir, tmp_path):
    args = [
        "train",
        "configs/demo.yaml",
        f"data.path={digits_dir}",
        *COMMON,
        "strategy=fsdp",
        f"run.out_dir={tmp_path}",
        "run.name=fsdp",
    ]
    first = run_cmd(torchrun_cmd(2, *args, "run.stop_after_steps=4"))
    assert "exiting with status 75" in first.stdout, first.stderr[-3000:]
    assert (list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1] / "dcp").is_dir()
    second = run_cmd(torchrun_cmd(2, *args, "run.stop_after_steps=6"))
    assert "resumed from" in second.stderr and "exiting with status 75" in second.stdout, second.stderr[-3000:]
    straight = ten_steps["fsdp"]
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(straight), rel=1e-6)
    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1])["model"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()) <= 1e-6

    # the sharded checkpoint of 2 processes continues on 3 (torch.distributed.checkpoint reshards)
    third = run_cmd(torchrun_cmd(3, *args, "run.stop_after_steps=2"))
    assert "resumed from" in third.stderr and "exiting with status 75" in third.stdout, third.stderr[-3000:]
    assert read_meta(list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1])["global_step"] == 12


def test_fsdp_needs_more_than_one_process(tiny_digits, tmp_path):
    from dist_bot.cli import main

    code = main(
        ["train", "configs/demo.yaml", f"data.path={tiny_digits}", *COMMON, "strategy=fsdp", f"run.out_dir={tmp_path}"]
    )
    assert code == 2
