"""scripts/gpu_speed.sh, the sweep for the fastest setting on one GPU: its matrix, its summary and its mark, and
its rehearsal on CPU (the cases a CI deadline reaches measured, the rest named as cut off)."""

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_speed


def overrides(case) -> dict[str, str]:
    return dict(o.split("=", 1) for o in case[2])


def test_the_matrix_sweeps_batches_compile_modes_precisions_launchers_and_dali(tmp_path):
    cases = gpu_speed.cases("gpu", tmp_path)
    names = [c[0] for c in cases]
    assert names[0] == "bf16-b256-eager" and "--timm" in cases[0][3]  # the reference against bare and timm first
    got = [overrides(c) for c in cases]
    assert {o["data.batch_size"] for o in got} == {"256", "384", "512"}
    assert {o.get("model.compile_mode") for o in got} == {
        None,
        "default",
        "reduce-overhead",
        "max-autotune-no-cudagraphs",
    }
    assert {o["precision"] for o in got} == {"bf16", "fp16"}
    assert all(o["model.name"] == "resnet50d" and o["data.image_size"] == "224" for o in got)
    assert all(o["model.channels_last"] == "true" for o in got)
    assert {c[1] for c in cases} == {"process", "torchrun"}
    if "bf16-b256-default-dali" in names:  # where DALI imports: fed by it, timed alone
        fed = overrides(cases[names.index("bf16-b256-default-dali")])
        assert fed["data.loader"] == "dali" and cases[-1][3][-2:] == ["--sides", "data"]
    assert [c[0] for c in gpu_speed.cases("rehearse", tmp_path)] == names  # the rehearsal runs the same matrix
    args = gpu_speed.bench_data_args("gpu", tmp_path)
    assert args[-1] == "dali@data.dali_hw_decoder_load=0,dali,dali@data.dali_hw_decoder_load=0.9"


def bench_record(impl: str, img_per_s: float, batch: int = 256, mode=None, **extra) -> dict:
    return {
        "bench": "train",
        "impl": impl,
        "img_per_s": img_per_s,
        "step_s": batch / img_per_s,
        "global_batch": batch,
        "processes": 1,
        "precision": "bf16",
        "compile_mode": mode,
        "launcher": "process",
        "warmup_s": 1.0,
    } | extra


@pytest.mark.slow  # the host's record: a fresh interpreter importing torch, DALI and timm (~6 s)
def test_the_summary_picks_the_fastest_case_and_judges_it_against_the_devices_mark(tmp_path):
    parts = [
        {"part": "bench-bf16-b256-eager", "status": "ok", "records": [bench_record("dist_bot", 3800.0)]},
        {
            "part": "bench-bf16-b384-default",
            "status": "ok",
            "records": [bench_record("dist_bot", 7000.0, 384, "default")],
        },
        {
            "part": "bench-bf16-b256-default",
            "status": "ok",
            "records": [bench_record("dist_bot", 6600.0, 256, "default")],
        },
        {
            "part": "bench-bf16-b256-default-dali",
            "status": "ok",
            "records": [bench_record("dist_bot+dali", 6300.0, 256, "default", data_s=0.0004)],
        },
        {"part": "bench-fp16-b256-default", "status": "not measured", "why": "the check's deadline came first"},
    ]
    (tmp_path / "parts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in parts))
    summary = gpu_speed.summarize(tmp_path, "gpu", 280)
    assert summary["best"]["case"] == "bf16-b384-default" and summary["marks"]["best_img_per_s"]["value"] == 7000.0
    assert summary["marks"]["dali_over_synthetic"]["value"] == pytest.approx(6300 / 6600, abs=1e-4)
    assert summary["marks"]["best_img_per_s"]["pass"] is False  # 7,000 < 7,500 (this host is no H100)
    assert summary["passed"] is False and summary["not_measured"] == {"bench-fp16-b256-default": parts[-1]["why"]}
    case = next(t for t in summary["cases"] if t["case"] == "bf16-b384-default")
    assert (case["batch"], case["step_ms"], case["warmup_s"]) == (384, pytest.approx(54.86, abs=0.01), 1.0)
    assert json.loads((tmp_path / "gpu_speed.json").read_text())["best"] == summary["best"]
    assert gpu_speed.mark_for("NVIDIA H100 80GB HBM3") == pytest.approx(7500 / 1.11, abs=0.1)
    assert gpu_speed.mark_for("NVIDIA H200") == 7500
    host = summary["host"]  # this interpreter's versions, and what imports, from one fresh interpreter
    assert (host["python"], host["torch"]) == (platform.python_version(), torch.__version__)
    assert host["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    for module in ("nvidia.dali", "timm"):
        assert (host[module.split(".")[-1]] == "importable") == installed(module), host


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # find_spec imports the parent package (nvidia) first
        return False


@pytest.mark.slow
def test_the_rehearsal_measures_what_its_deadline_reaches_and_names_the_rest(tmp_path):
    """The sweep on CPU with a tiny model under a CI-sized deadline: the eager reference measured (with the bare
    loop and timm), the first compiled case killed by the deadline (a compilation takes a minute on 2 cores; the
    GPU check's rehearsal runs the compiled paths in full), every other case named as cut off; the summary and
    the table written on exit."""
    pytest.importorskip("timm", reason="the reference case compares with timm's model (pip install -e '.[dev]')")
    out = tmp_path / "speed"
    env = os.environ | {"PYTHON": sys.executable, "GPU_SPEED_DEADLINE_S": "60", "OMP_NUM_THREADS": "2"}
    res = subprocess.run(
        ["bash", "scripts/gpu_speed.sh", "--rehearse", str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((Path(out) / "gpu_speed.json").read_text())
    assert summary["mode"] == "rehearse" and summary["failed"] == []
    assert "bf16-b256-eager" in {t["case"] for t in summary["cases"]}
    eager = [t for t in summary["cases"] if t["case"] == "bf16-b256-eager"]
    assert {t["impl"] for t in eager} == {"dist_bot", "bare", "timm"}
    assert "dist_bot_over_timm" in summary["ratios"]["bf16-b256-eager"]
    assert all(t["batch"] == 8 and t["compile_mode"] is None and t["warmup_s"] > 0 for t in eager)
    cut = summary["not_measured"]
    assert "bench-bf16-b256-default-ddp" in cut and all("deadline" in why or "DALI" in why for why in cut.values())
    assert all(m["pass"] is None for m in summary["marks"].values())  # a CPU's numbers are not judged
    assert "case | impl | img_per_s" in res.stdout and "summary:" in res.stdout
