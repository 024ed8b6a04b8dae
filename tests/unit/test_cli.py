"""The `dist-bot` command as users run it: the installed console script and `python -m dist_bot`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_bot.models import MODEL_NAMES

REPO = Path(__file__).resolve().parents[2]
DIST_BOT = Path(sys.executable).parent / "dist-bot"  # the console script pip installed beside python


def run(*args: str, entry: tuple[str, ...] = (str(DIST_BOT),)) -> subprocess.CompletedProcess:
    return subprocess.run([*entry, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_models_table_lists_every_variant_with_measured_size_and_cost():
    if not DIST_BOT.exists():
        pytest.fail(f"console script {DIST_BOT} is missing: run `bash scripts/setup.sh` (pip install -e .)")
    out = run("models")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert list(rows) == list(MODEL_NAMES)
    assert rows["resnet50d"][1] == "25,576,264" and rows["resnet50a"][1] == "25,557,032"
    assert float(rows["resnet50d"][3]) == pytest.approx(4.33, abs=0.01)
    assert float(rows["resnet50a"][3]) == pytest.approx(3.86, abs=0.01)


def test_python_dash_m_config_prints_the_resolved_yaml():
    out = run(
        "config",
        "configs/resnet50d_bs1024.yaml",
        "schedule.epochs=90",
        entry=(sys.executable, "-m", "dist_bot"),
    )
    assert out.returncode == 0, out.stderr
    assert "  epochs: 90\n" in out.stdout and "  name: resnet50d\n" in out.stdout and "precision: fp16\n" in out.stdout


def test_config_explain_tables_each_key_with_default_range_resume_rule_and_doc():
    out = run("config", "resnet50d_bs1024", "run.seed=7", "--explain", entry=(sys.executable, "-m", "dist_bot"))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    from dist_bot.config import all_keys

    assert list(rows) == all_keys()
    assert rows["run.seed"].split()[1:4] == ["7", "0", "fixed"]  # value, default, no range, fixed on resume
    assert rows["data.batch_size"].split()[3:5] == ["[1,", "inf)"] and " fixed " in rows["data.batch_size"]
    assert "may change" in rows["data.path"] and "folder holding train/ and val/" in rows["data.path"]
    # a doc continued on the next comment lines is read whole
    assert rows["data.workers"].endswith("(torch: one fewer, left to the training thread)")


def test_config_errors_are_one_clear_line_and_exit_status_2():
    out = run("config", "configs/resnet50d_bs1024.yaml", "optim.lr=0.4", entry=(sys.executable, "-m", "dist_bot"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "unknown config key 'optim.lr'" in out.stderr and "base_lr_per_256" in out.stderr


def test_unknown_command_is_rejected():
    out = run("trian", entry=(sys.executable, "-m", "dist_bot"))
    assert out.returncode == 2 and "invalid choice: 'trian'" in out.stderr


def test_data_check_reports_planted_problems_and_exits_1(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.effect_noise((16, 16), 40 + i + (c == "b")).save(tmp_path / split / c / f"{split}{i}.jpg")
    out = run("data", "check", str(tmp_path), entry=(sys.executable, "-m", "dist_bot"))
    assert out.returncode == 0 and out.stdout.rstrip().endswith("OK"), out.stdout
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "val" / "b" / "leak.jpg").write_bytes((tmp_path / "train" / "b" / "train0.jpg").read_bytes())
    out = run("data", "check", str(tmp_path), "--json", entry=(sys.executable, "-m", "dist_bot"))
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert [Path(p).name for p, _ in report["unreadable"]] == ["broken.jpg"]
    assert [(Path(t).name, Path(v).name) for t, v in report["duplicates"]] == [("train0.jpg", "leak.jpg")]
    assert report["counts"]["train"] == {"a": 2, "b": 2} and report["counts"]["val"] == {"a": 2, "b": 3}


@pytest.mark.slow
def test_bench_data_prints_one_json_line_per_loader(tmp_path):
    from dist_bot.datasets import write_digits

    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")
    write_digits(tmp_path / "d")
    out = run(
        "bench",
        "data",
        "configs/demo.yaml",
        f"data.path={tmp_path / 'd'}",
        "--batches",
        "2",
        "--repeats",
        "2",
        entry=(sys.executable, "-m", "dist_bot"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["loader"] for x in lines] == ["dali", "torch"]
    assert all(x["img_per_s"] > 0 and len(x["runs"]) == 2 for x in lines)
    assert lines[1]["ratio_to_torch"] == 1.0 and lines[0]["ratio_to_torch"] > 0


def test_data_fake_writes_jpegs_of_the_asked_size_in_class_folders_and_refuses_a_full_folder(tmp_path):
    from PIL import Image

    out = tmp_path / "fake"
    res = run("data", "fake", str(out), "--images", "30", "--size", "50x40")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["train"], report["val"]) == (20, 10) and report["mean_kb"] > 1  # 10 classes: 1 of 3 in val
    files = sorted(out.glob("*/*/*.jpg"))
    assert len(files) == 30 and len({f.parent.name for f in files}) == 10
    assert all(Image.open(f).size == (50, 40) for f in files)
    again = run("data", "fake", str(out))
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_overrides_may_follow_options_and_anything_else_unknown_is_refused(capsys):
    from dist_bot.cli import parse_args

    args = parse_args(["eval", "configs/demo.yaml", "a.b=1", "--checkpoint", "runs/x", "c.d=2", "--ema"])
    assert (args.checkpoint, args.ema, args.overrides) == ("runs/x", True, ["a.b=1", "c.d=2"])
    with pytest.raises(SystemExit):
        parse_args(["eval", "configs/demo.yaml", "--checkpoint", "runs/x", "--nonsense"])
    assert "unrecognized arguments: --nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["models", "a.b=1"])  # a command without overrides takes none


def test_training_from_python_leaves_the_callers_environment_as_it_was(tiny_digits, tmp_path, monkeypatch):
    """cli.main(["train", ...]) in a plain process sets no OMP_NUM_THREADS (nor anything else) in os.environ:
    a test runner's later subprocesses would inherit it (one such leak made two resume runs differ)."""
    import os

    from dist_bot.cli import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    args = ["train", "configs/demo.yaml", f"data.path={tiny_digits}", "model.name=resnet10d", "precision=fp32"]
    args += ["schedule.epochs=1", "data.loader=torch", "data.workers=0", "wandb.mode=disabled"]
    assert main([*args, f"run.out_dir={tmp_path}"]) == 0
    changed = {k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k)}
    assert changed <= {"TORCHINDUCTOR_CACHE_DIR"}, changed  # torch's own, set when its compiler is imported
