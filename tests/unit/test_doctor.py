"""`dist-bot doctor`, the preflight: every process measures itself, rank 0 judges each row against a threshold,
prints a table and writes doctor.json; fatal rows exit 1, slow ones warn. (On 2 Slurm nodes: test_slurm.py.)"""

import json

import pytest
from conftest import check_doctor_report, run_cmd, torchrun_cmd

from dist_bot.config import load_config
from dist_bot.doctor import judge

ARGS = ["model.name=resnet10d", "precision=fp32", "data.batch_size=16", "data.workers=1", "wandb.mode=disabled"]


@pytest.mark.slow
def test_doctor_under_torchrun_measures_every_process_and_writes_the_report(tiny_digits, tmp_path):
    args = ["doctor", "configs/demo.yaml", f"data.path={tiny_digits}", *ARGS, f"run.out_dir={tmp_path}", "run.name=d"]
    res = run_cmd(torchrun_cmd(2, *args))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "d" / "doctor.json").read_text())  # by default in the run folder
    check_doctor_report(report, 2)
    assert all("node" in p["busbw_gb_s"] for p in report["processes"])  # 2 processes of one node
    assert report["status"] in ("ok", "warn") and "doctor: " in res.stdout
    assert "all-reduce busbw inside the node" in res.stdout and "data loader" in res.stdout
    # a run in that folder afterwards is not refused: the report is all there is
    train = ["train", "configs/demo.yaml", f"data.path={tiny_digits}", *ARGS, "schedule.epochs=1"]
    res = run_cmd(torchrun_cmd(1, *train, f"run.out_dir={tmp_path}", "run.name=d"))
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_data_path_that_does_not_read_fails_the_doctor_with_its_fix(tmp_path, capsys):
    from dist_bot.cli import main

    out = tmp_path / "report.json"
    status = main(["doctor", "configs/demo.yaml", f"data.path={tmp_path}/none", *ARGS, f"run.out_dir={tmp_path}"])
    assert status == 1
    printed = capsys.readouterr().out
    assert "fail" in printed and "dist-bot data check" in printed
    assert not out.exists()


def record(**changes) -> dict:
    base = {
        "host": "n1",
        "rank": 0,
        "device": "cuda:0",
        "gpu": "H100",
        "gpu_mem_gb": 80,
        "cpus": 12,
        "torch": "2.11",
        "cuda": "13.0",
        "nccl": "2.27",
        "cudnn": 91000,
        "dali": "2.4",
        "driver": "580",
        "dist_bot": "0.1.0",
        "python": "3.12",
        "free_gb": 500.0,
        "write_mb_s": 900.0,
        "read_mb_s": 800.0,
        "read_files_per_s": 7000.0,
        "loader": "dali",
        "decode_img_per_s": 5000.0,
        "step_img_per_s": 3000.0,
        "checkpoint_gb": 0.3,
        "busbw_gb_s": {"node": {"64 MiB": 150.0}, "nodes": {"64 MiB": 40.0}},
    }
    return base | changes


def statuses(rows) -> dict[tuple[str, str], str]:
    return {(r["check"], r["where"]): r["status"] for r in rows}


def test_each_threshold_passes_warns_or_fails_and_names_the_fix():
    cfg = load_config("configs/demo.yaml", [])
    good = judge(cfg, [record(), record(host="n2", rank=1)])
    assert {r["status"] for r in good} <= {"ok", "info"}, [r for r in good if r["status"] not in ("ok", "info")]
    bad = [
        record(cpus=1, decode_img_per_s=2000.0, write_mb_s=20.0, free_gb=0.5),
        record(host="n2", rank=1, torch="2.10", busbw_gb_s={"nodes": {"64 MiB": 1.0}}),
    ]
    rows = judge(cfg, bad)
    got = statuses(rows)
    assert got[("torch version", "all nodes")] == "fail"  # would crash or hang: fatal
    assert got[("free space of run.out_dir", "n1")] == "fail"
    assert got[("CPUs per process", "n1 rank 0")] == "warn"  # would be slow: a warning
    assert got[("data loader (dali)", "n1 rank 0")] == "warn"
    assert got[("write speed of run.out_dir", "n1")] == "warn"
    assert got[("all-reduce busbw across nodes", "n2 rank 1")] == "warn"
    fixes = {r["check"]: r["fix"] for r in rows if r["status"] in ("warn", "fail")}
    assert "SRUN_CPUS_PER_TASK" in fixes["CPUs per process"] and "same torch" in fixes["torch version"]
    assert "NCCL" in fixes["all-reduce busbw across nodes"] and "data.loader=dali" in fixes["data loader (dali)"]


@pytest.mark.parametrize("mode", ["disabled", "offline"])
def test_w_and_b_is_not_probed_when_the_run_does_not_use_it(mode):
    from dist_bot.doctor import wandb_info

    assert wandb_info(load_config("configs/demo.yaml", [f"wandb.mode={mode}"]))["wandb"].startswith("not used")
