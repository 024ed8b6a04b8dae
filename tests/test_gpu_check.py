"""scripts/gpu_check.sh rehearsed on CPU: the whole matrix it runs on a GPU host, so that nothing a CPU could
have caught is left for the few minutes of a lent GPU; and its summary written whatever happens."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

RUNS = {"bf16-eager-dali", "bf16-compiled", "fp16-eager-torch", "fp16-compiled"}


def check(out, deadline_s: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = os.environ | {"PYTHON": sys.executable, "GPU_CHECK_DEADLINE_S": str(deadline_s), "OMP_NUM_THREADS": "2"}
    cmd = ["bash", "scripts/gpu_check.sh", "--rehearse", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=deadline_s + 120)
    return res, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_rehearsal_runs_every_part_of_the_matrix(tmp_path):
    pytest.importorskip("nvidia.dali", reason="the matrix's DALI-fed run needs DALI (pip install -e '.[dali]')")
    pytest.importorskip("timm", reason="the matrix compares with timm's model (pip install -e '.[dev]')")
    res, summary = check(tmp_path / "check", deadline_s=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary["mode"] == "rehearse" and summary["failed"] == [] and summary["not_measured"] == {}
    assert summary["passed"] is True
    cases = summary["parts"]["tests"]["cases"]  # collected, and each says why it cannot run here
    assert len(cases) >= 6 and all(c["result"] == "skipped" and "CUDA" in c["why"] for c in cases.values())
    table = summary["table"]
    assert {t["run"] for t in table} == RUNS and all(t["img_per_s"] > 0 for t in table)
    sides = {(t["run"], t["impl"]) for t in table}
    assert {("bf16-eager-dali", "dist_bot+dali"), ("bf16-eager-dali", "timm")} <= sides
    assert ("fp16-eager-torch", "dist_bot+torch") in sides and ("fp16-compiled", "bare") in sides
    marks = summary["marks"]
    assert all(m["value"] is not None and m["pass"] is None for m in marks.values())  # measured, not judged
    assert marks["dali_over_synthetic"]["value"] == summary["ratios"]["bf16-eager-dali"]["data_over_synthetic"]
    records = [r for p in summary["parts"].values() for r in p.get("records", []) if "impl" in r]
    assert all(
        {"device", "torch", "dali", "compile_mode", "cudnn_benchmark", "max_rss_mb"} <= r.keys() for r in records
    )
    assert {r["compile_mode"] for r in records if r["compile"]} == {"default"}


def test_the_summary_names_what_the_deadline_cut_off(tmp_path):
    res, summary = check(tmp_path / "check", deadline_s=25)
    assert summary["passed"] is False
    assert summary["parts"]["tests"]["status"] == "ok"
    cut = {k: v for k, v in summary["not_measured"].items() if not k.startswith("mark ")}
    assert {"data", "bench-bf16-compiled", "bench-fp16-compiled"} <= cut.keys(), cut
    assert cut.pop("data-fed runs", "no images were made") == "no images were made"
    assert all("deadline" in why for why in cut.values()), cut
    assert all(m["value"] is None for m in summary["marks"].values())
    assert "summary:" in res.stdout
