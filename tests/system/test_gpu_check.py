"""scripts/gpu_check.sh rehearsed on CPU: the whole matrix it runs on a GPU host, so that nothing a CPU could
have caught is left for the few minutes of a lent GPU; and its summary written whatever happens."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

RUNS = {
    "bf16-eager",
    "bf16-compiled",
    "bf16-compiled-dali",
    "bf16-eager-ddp",
    "bf16-compiled-ddp",
    "bf16-eager-dali",
    "fp16-eager",
    "fp16-eager-torch",
    "fp16-compiled",
    "fp16-compiled-torch",
}


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
    assert {("bf16-eager", "dist_bot"), ("bf16-eager", "bare"), ("bf16-eager", "timm")} <= sides
    for fed in ("bf16-eager-dali", "bf16-compiled-dali", "fp16-eager-torch", "fp16-compiled-torch"):
        assert {impl for run, impl in sides if run == fed} == {"dist_bot+" + fed.rsplit("-", 1)[1]}  # alone
    assert {t["launcher"] for t in table if t["run"].endswith("-ddp")} == {"torchrun"}
    assert {t["launcher"] for t in table if not t["run"].endswith("-ddp")} == {"process"}
    assert all(t["data_s"] is not None for t in table if t["impl"].startswith("dist_bot+"))
    marks = summary["marks"]
    assert all(m["value"] is not None and m["pass"] is None for m in marks.values())  # measured, not judged
    assert (
        marks["dali_over_synthetic_compiled"]["value"] == summary["ratios"]["bf16-compiled-dali"]["data_over_synthetic"]
    )
    records = [r for p in summary["parts"].values() for r in p.get("records", []) if "impl" in r]
    assert all(
        {"device", "torch", "dali", "cudnn_benchmark", "max_rss_mb"} <= r.keys() for r in records if "skipped" not in r
    )
    for r in records:  # each names what it measured
        assert r["launcher"] in ("process", "torchrun") and r["strategy"] == "ddp", r
        assert r["loader"] in ("synthetic", "dali", "torch") and r["compile_mode"] in (None, "default"), r
    compiled = [r for r in records if r["compile"]]
    assert {r["compile_backend"] for r in compiled} == {"inductor", "aot_eager"}  # inductor for one case here
    assert all((r["compile_mode"] == "default") == (r["compile_backend"] == "inductor") for r in compiled)
    by_run = {t["run"]: t["compile_backend"] for t in table}
    assert by_run["bf16-compiled"] == by_run["bf16-compiled-dali"] == "inductor" and by_run["bf16-eager"] is None
    fed = [r for r in records if r["loader"] != "synthetic"]
    assert fed and all(r["warmup_steps"] >= 2 * 2 for r in fed)  # at least twice a loader's prefetch depth
    variants = [x["variant"] for x in summary["loaders"]]
    assert variants == ["dali@data.dali_hw_decoder_load=0", "dali", "dali@data.dali_hw_decoder_load=0.9", "torch"]
    made = summary["parts"]["data"]["dataset"]
    assert made["longest_side"] > 500 and sum(made["modes"].values()) == made["train"] + made["val"]


@pytest.mark.slow
def test_the_summary_names_what_the_deadline_cut_off(tmp_path):
    """A deadline long enough for the tests part on a loaded machine, too short for the matrix (its compiled
    runs alone take minutes on a CPU): what was cut is named, with the deadline as the reason."""
    res, summary = check(tmp_path / "check", deadline_s=30)
    assert summary["passed"] is False
    assert summary["parts"]["tests"]["status"] == "ok"
    cut = {k: v for k, v in summary["not_measured"].items() if not k.startswith("mark ")}
    assert "bench-fp16-compiled-torch" in cut, cut  # the last of the matrix
    assert all("deadline" in why or "DALI" in why for why in cut.values()), cut
    assert "summary:" in res.stdout
