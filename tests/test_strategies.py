"""DDP and FSDP2 behind one interface: the same training, the same fp16 loss scaling, resumable checkpoints."""

import importlib.util
import json
import sys

import pytest
import torch
from conftest import REPO, run_cmd, torchrun_cmd

from dist_bot.checkpoint import list_checkpoints, load_checkpoint, read_meta
from dist_bot.config import UserError

# name -> overrides; DeepSpeed at each ZeRO stage it supports
STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "zero0": ["strategy=deepspeed", "dist.zero_stage=0"],
    "zero1": ["strategy=deepspeed", "dist.zero_stage=1"],
    "zero2": ["strategy=deepspeed", "dist.zero_stage=2"],
}


def needs(name, fp16=False):
    if name.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
        if fp16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported() and not torch.cuda.is_available():
            pytest.skip("DeepSpeed's fp16 needs a GPU or a CPU with AVX512-FP16/AMX-FP16; this CPU has neither")


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
    for strategy, overrides in STRATEGIES.items():
        if strategy.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
            continue
        args = ["train", "configs/demo.yaml", f"data.path={digits_dir}", *COMMON, *overrides]
        res = run_cmd(torchrun_cmd(2, *args, "run.stop_after_steps=10", f"run.out_dir={out}", f"run.name={strategy}"))
        assert "exiting with status 75" in res.stdout, res.stderr[-3000:]
        runs[strategy] = out / strategy
    return runs


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp"])
def test_same_losses_and_weights_as_ddp(ten_steps, strategy):
    needs(strategy)
    ref, got = train_losses(ten_steps["ddp"]), train_losses(ten_steps[strategy])
    assert len(ref) == len(got) == 10
    assert got == pytest.approx(ref, rel=1e-4)
    a = load_checkpoint(list_checkpoints(ten_steps["ddp"] / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(ten_steps[strategy] / "checkpoints")[-1])["model"]
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2"])  # DeepSpeed fp16 needs ZeRO >= 1
def test_fp16_overflow_on_one_rank_skips_the_step_on_all(strategy, tmp_path):
    needs(strategy, fp16=True)
    probe = str(REPO / "tests" / "strategy_probe.py")
    res = run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            probe,
            str(tmp_path),
            *STRATEGIES[strategy],
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["steps"] == [False, True]  # skipped on both ranks, then a clean step
        assert got["scales"] == [512.0, 512.0]  # halved once, not yet grown back
        assert got["changed"] == [False, True]


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp"])  # ddp: tests/test_train.py
def test_resume_equals_the_uninterrupted_run(ten_steps, digits_dir, tmp_path, strategy):
    needs(strategy)
    args = [
        "train",
        "configs/demo.yaml",
        f"data.path={digits_dir}",
        *COMMON,
        *STRATEGIES[strategy],
        f"run.out_dir={tmp_path}",
        f"run.name={strategy}",
    ]
    first = run_cmd(torchrun_cmd(2, *args, "run.stop_after_steps=4"))
    assert "exiting with status 75" in first.stdout, first.stderr[-3000:]
    second = run_cmd(torchrun_cmd(2, *args, "run.stop_after_steps=6"))
    assert "resumed from" in second.stderr and "exiting with status 75" in second.stdout, second.stderr[-3000:]
    straight = ten_steps[strategy]
    assert train_losses(tmp_path / strategy) == pytest.approx(train_losses(straight), rel=1e-6)
    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / strategy / "checkpoints")[-1])["model"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()) <= 1e-6


def test_fsdp_checkpoint_continues_at_another_world_size(digits_dir, tmp_path):
    args = [
        "train",
        "configs/demo.yaml",
        f"data.path={digits_dir}",
        *COMMON,
        "strategy=fsdp",
        "data.global_batch_size=48",
        f"run.out_dir={tmp_path}",
        "run.name=fsdp",
    ]
    first = run_cmd(torchrun_cmd(2, *args, "run.stop_after_steps=2"))
    assert "exiting with status 75" in first.stdout, first.stderr[-3000:]
    assert (list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1] / "dcp").is_dir()
    # the sharded checkpoint of 2 processes continues on 3 (torch.distributed.checkpoint reshards)
    second = run_cmd(torchrun_cmd(3, *args, "run.stop_after_steps=2"))
    assert "resumed from" in second.stderr and "exiting with status 75" in second.stdout, second.stderr[-3000:]
    assert read_meta(list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1])["global_step"] == 4
    losses = train_losses(tmp_path / "fsdp")
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)


def test_fsdp_needs_more_than_one_process(tiny_digits, tmp_path):
    from dist_bot.cli import main

    code = main(
        ["train", "configs/demo.yaml", f"data.path={tiny_digits}", *COMMON, "strategy=fsdp", f"run.out_dir={tmp_path}"]
    )
    assert code == 2


def test_deepspeed_config_maps_dist_bots_settings():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    from dist_bot.config import load_config
    from dist_bot.distributed.deepspeed import DeepSpeedStrategy, deepspeed_config
    from dist_bot.distributed.env import DistEnv

    cfg = load_config(
        None,
        [
            "precision=fp16",
            "data.batch_size=32",
            "optim.grad_accum_steps=2",
            "optim.grad_clip_norm=1.5",
            "loss_scale.init_scale=1024",
            "loss_scale.growth_interval=500",
            "loss_scale.min_scale=2",
            "dist.zero_stage=2",
        ],
    )
    ds = deepspeed_config(cfg, world_size=8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        32,
        2,
        512,
    )
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.5
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 10,
        "loss_scale_window": 500,
        "hysteresis": 1,
        "min_loss_scale": 2.0,
    }
    assert ds["data_types"] == {"buffer_dtype": "fp16"}
    assert "fp16" not in deepspeed_config(load_config(None, ["precision=bf16"]), 2)

    zero0 = load_config(None, ["precision=fp16", "dist.zero_stage=0"])
    with pytest.raises(UserError, match=r"needs dist\.zero_stage=1 or 2"):
        DeepSpeedStrategy(torch.nn.Linear(2, 2), None, DistEnv(), zero0)
