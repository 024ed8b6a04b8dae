"""`dist-bot bench train` (dist_bot's step against a bare loop) and `dist-bot report` (plots and tables)."""

import json
import sys

import pytest
from conftest import run_cmd

from dist_bot.errors import UserError
from dist_bot.report import fractional_epochs, load_run, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_train_prints_both_sides_and_their_ratio():
    out = run_cmd(
        [
            sys.executable,
            "-m",
            "dist_bot",
            "bench",
            "train",
            "model.name=resnet10d",
            "model.num_classes=10",
            "data.image_size=32",
            "data.batch_size=4",
            "precision=bf16",
            "loss.mixup_alpha=0.2",
            "--steps=3",
            "--warmup=1",
            "--repeats=2",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    dist_bot, bare, ratio = (json.loads(x) for x in out.stdout.splitlines())
    assert (dist_bot["impl"], bare["impl"]) == ("dist_bot", "bare")
    assert dist_bot["steps"] == bare["steps"] == 6  # 2 blocks x 3 timed steps each
    assert dist_bot["img_per_s"] == pytest.approx(4 / dist_bot["step_s"])
    assert ratio["ratio"] == pytest.approx(dist_bot["img_per_s"] / bare["img_per_s"])
    assert ratio["overhead_pct"] == pytest.approx(100 * (bare["img_per_s"] / dist_bot["img_per_s"] - 1))
    assert ratio["model"] == "resnet10d" and ratio["precision"] == "bf16" and ratio["channels_last"] is True
    for r in (dist_bot, bare):
        assert (r["launcher"], r["strategy"], r["compile_mode"], r["loader"]) == ("process", "ddp", None, "synthetic")


@pytest.mark.slow
def test_bench_train_times_a_loader_side_alone_after_twice_its_prefetch_depth(tiny_digits):
    """--sides data: the loader-fed Trainer in a run of its own (no other side's blocks let the loader refill),
    warmed up over at least twice the batches the loader makes ahead, with the step's wait for data."""
    args = ["bench", "train", "model.name=resnet10d", "data.image_size=32", "data.batch_size=4", "precision=fp32"]
    args += [f"data.path={tiny_digits}", "data.loader=torch", "data.workers=2", "--steps=3", "--warmup=1"]
    out = run_cmd([sys.executable, "-m", "dist_bot", *args, "--repeats=2", "--sides=data"])
    assert out.returncode == 0, out.stderr[-3000:]
    (fed,) = (json.loads(x) for x in out.stdout.splitlines())  # one side, and no ratio without a second
    assert (fed["impl"], fed["loader"], fed["launcher"]) == ("dist_bot+torch", "torch", "process")
    assert fed["warmup_steps"] >= 2 * 4 * 2  # 2 workers x prefetch factor 4, twice
    assert 0 <= fed["data_s"] <= fed["step_s"]
    bad = run_cmd([sys.executable, "-m", "dist_bot", *args, "--sides=loader"])
    assert bad.returncode == 2 and "unknown ['loader']" in bad.stderr


def write_run(folder, name, epochs, steps_per_epoch, top1s, duplicate_step=None, ema_top1s=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model:\n  name: resnet50d\nrun:\n  name: {name}\n")
    lines = []
    for e in range(epochs):
        for s in range(1, steps_per_epoch + 1):
            step = e * steps_per_epoch + s
            lines.append({"split": "train", "epoch": e, "step": step, "lr": 0.1, "loss": 9.0, "img_per_s": 30.0})
        lines.append({"split": "val", "epoch": e, "step": step, "top1": top1s[e], "top5": 90.0, "loss": 1.0})
        if ema_top1s:
            lines[-1] |= {"ema_top1": ema_top1s[e], "ema_top5": 91.0, "ema_loss": 0.9}
    if duplicate_step:  # a run that crashed after logging a step, then logged it again after resuming
        lines.insert(duplicate_step, dict(lines[duplicate_step], loss=123.0))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_a_step_logged_twice_counts_once_and_epochs_are_fractional(tmp_path):
    run = load_run(write_run(tmp_path / "a", "a", 2, 4, [50.0, 60.0], duplicate_step=2))
    assert [r["step"] for r in run.train] == list(range(1, 9))
    assert run.train[1]["loss"] == 9.0  # the later line wins
    assert fractional_epochs(run.train) == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]


def test_report_of_several_runs_writes_one_png_and_a_table(tmp_path):
    a = write_run(tmp_path / "baseline", "baseline", 2, 4, [50.0, 60.0])
    b = write_run(tmp_path / "tricks", "tricks", 2, 2, [55.0, 70.5])  # another batch size: 2 steps per epoch
    png, table = report([str(a), str(b)], str(tmp_path / "ladder.png"))
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [(r[0].strip(), r[3].strip()) for r in rows] == [("baseline", "60.00"), ("tricks", "70.50")]


def test_report_tabulates_the_ema_beside_the_weights_when_a_run_has_one(tmp_path):
    a = write_run(tmp_path / "ema", "ema", 3, 2, [50.0, 60.0, 58.0], ema_top1s=[40.0, 62.0, 61.0])
    b = write_run(tmp_path / "plain", "plain", 1, 2, [55.0])
    _, table = report([str(a), str(b)], str(tmp_path / "two.png"))
    header, _, *rows = ([c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines())
    first = dict(zip(header, rows[0], strict=True))
    assert (first["top1"], first["ema_top1"], first["best_ema_top1"]) == ("58.00", "61.00", "62.00")
    assert dict(zip(header, rows[1], strict=True))["ema_top1"] == "-"
    _, table = report([str(b)], str(tmp_path / "one.png"))
    assert "ema_top1" not in table  # no EMA, no columns for it


def test_report_names_runs_by_their_folders_and_tells_equal_names_apart(tmp_path):
    a = write_run(tmp_path / "crop035", "5_mixup", 1, 2, [70.0])  # a copied run keeps its run.name
    b = write_run(tmp_path / "crop008", "5_mixup", 1, 2, [68.0])
    c = write_run(tmp_path / "old" / "crop008", "5_mixup", 1, 2, [67.0])
    _, table = report([str(a), str(b)], str(tmp_path / "two.png"))
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["crop035", "crop008"]
    _, table = report([str(b), str(c)], str(tmp_path / "same.png"))
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == [f"{tmp_path.name}/crop008", "old/crop008"]


def test_report_names_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match=r"no metrics\.jsonl"):
        report([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:1 is not a dist_bot metrics line"):
        report([str(tmp_path)])
    out = run_cmd([sys.executable, "-m", "dist_bot", "report", str(tmp_path / "missing")])
    assert out.returncode == 2 and "no metrics.jsonl" in out.stderr
