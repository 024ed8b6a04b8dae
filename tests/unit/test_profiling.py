"""run.profile_steps=A:B: a torch.profiler trace of steps A to B-1 per process, counted over the whole run."""

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import run_cmd, torchrun_cmd

from dist_bot.checkpoint import list_checkpoints, load_checkpoint
from dist_bot.cli import main
from dist_bot.config import load_config
from dist_bot.errors import ConfigError

# fp32 (bf16 is emulated, so slow, on many CPUs); 100 tiny digits at batch 16: 7 steps an epoch
TINY = [
    "model.name=resnet10d",
    "data.workers=0",
    "data.batch_size=16",
    "precision=fp32",
    "wandb.mode=disabled",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
]


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]


def trace(path: Path) -> list[dict]:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def profiler_steps(events: list[dict]) -> list[int]:
    return sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#"))


@pytest.mark.parametrize("value", ["5", "9:3", "3:3", "a:b", "0:2", "2:", ":4"])
def test_a_profile_window_must_be_a_to_b_with_1_le_a_lt_b(value):
    with pytest.raises(ConfigError, match=rf"run.profile_steps='{value}' is not a window of optimizer steps"):
        load_config("configs/demo.yaml", [f"run.profile_steps={value}"])


def test_a_bad_window_is_one_line_and_status_2(capsys):
    assert main(["config", "configs/demo.yaml", "run.profile_steps=9:3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 <= A < B" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_resumed_run_traces_the_window_by_global_step_with_accumulation(tiny_digits, tmp_path, caplog):
    args = ["train", "configs/demo.yaml", *TINY, f"data.path={tiny_digits}", f"run.out_dir={tmp_path}"]
    args += ["optim.grad_accum_steps=2", "data.batch_size=8"]
    profile = tmp_path / "demo" / "profile"
    # stopped in the warm-up step before the window: nothing traced, nothing written
    assert main([*args, "run.profile_steps=3:9", "run.stop_after_steps=2"]) == 75
    assert not profile.exists()
    with caplog.at_level(logging.INFO, logger="dist_bot.profiling"):
        # the window may change on resume; steps 3 and 4 of the run, i.e. this process's first two
        assert main([*args, "run.profile_steps=3:5"]) == 0
    [path] = profile.iterdir()
    assert path.name == "rank0_steps3-4.pt.trace.json.gz"
    events = trace(path)
    assert profiler_steps(events) == [3, 4]
    names = [e.get("name") for e in events]
    assert "aten::convolution" in names
    # 2 micro-batches per step: forward-backward twice, the optimizer once
    assert (names.count("forward_backward"), names.count("optimizer_step")) == (4, 2)
    assert names.count("data_wait") >= 4
    [table] = [r.getMessage() for r in caplog.records if "top operators" in r.getMessage()]
    assert "profile of steps 3-4" in table and "Self CPU" in table and "aten::" in table

    # profiling changes nothing: the same weights as a run without it
    assert main([*args, f"run.out_dir={tmp_path / 'plain'}"]) == 0
    assert not (tmp_path / "plain" / "demo" / "profile").exists()
    profiled, plain = (final_weights(tmp_path / d / "demo") for d in (".", "plain"))
    assert all(torch.equal(profiled[k], plain[k]) for k in plain)


@pytest.mark.slow
def test_two_processes_write_one_trace_each_of_the_window_only(tiny_digits, tmp_path):
    res = run_cmd(
        torchrun_cmd(
            2,
            "train",
            "configs/demo.yaml",
            *TINY,
            f"data.path={tiny_digits}",
            f"run.out_dir={tmp_path}",
            "data.batch_size=8",
            "run.profile_steps=2:3",
            "run.stop_after_steps=4",
        )
    )
    assert res.returncode != 0 and "exiting with status 75" in res.stdout, res.stderr[-3000:]
    profile = tmp_path / "demo" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [f"rank{r}_steps2-2.pt.trace.json.gz" for r in (0, 1)]
    for path in profile.iterdir():
        events = trace(path)
        assert profiler_steps(events) == [2]  # step 1 was the warm-up: nothing of it is kept
        assert "aten::convolution" in {e.get("name") for e in events}
    assert "top operators on rank 0" in res.stderr and "aten::" in res.stderr
