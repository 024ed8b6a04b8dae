"""W&B tracking: offline without a key or a server that answers, the run id kept in checkpoints, the same run
continued on resume, and training that goes on (with one warning) whenever W&B fails."""

import http.server
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

import dist_bot
from dist_bot.checkpoint import list_checkpoints, load_checkpoint
from dist_bot.cli import main
from dist_bot.config import load_config
from dist_bot.errors import UserError
from dist_bot.provenance import source_info
from dist_bot.tracking import PROBE_TIMEOUT_S, Tracker, resolve_wandb_mode, updated_summary
from dist_bot.train import loop

FAKE_KEY = "f" * 40
# fp32: what these tests check is tracking, and bf16 is emulated (~10x slower) on CPUs without AMX
TINY = ["model.name=resnet10d", "data.workers=0", "data.batch_size=8", "schedule.warmup_epochs=0", "precision=fp32"]


@pytest.fixture
def silent_server():
    """A W&B address that takes connections and never answers (a firewall that drops, a hung proxy)."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as s:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def closed_port():
    """A W&B address that refuses connections (no network route, the server down)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Answers200(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers200)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No ~/.netrc, no W&B settings files, no key; wandb's process-wide settings read afresh from this env."""
    wandb = pytest.importorskip("wandb", reason="W&B tracking needs wandb (pip install -e '.[wandb]')")
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in (
        "WANDB_API_KEY",
        "WANDB_BASE_URL",
        "WANDB_CONFIG_DIR",
        "WANDB_MODE",
        "WANDB_SILENT",
        "WANDB_INIT_TIMEOUT",
    ):
        monkeypatch.delenv(var, raising=False)
    wandb.teardown()  # wandb reads the environment once per process: forget an earlier test's
    yield monkeypatch
    wandb.teardown()


def unreachable(monkeypatch, url: str) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", url)


def w_and_b_warnings(caplog) -> list[str]:
    """dist_bot's W&B warnings, each checked to carry no traceback (wandb's own records go to its log files)."""
    records = [r for r in caplog.records if r.name == "dist_bot.tracking" and r.levelno >= logging.WARNING]
    assert all(r.exc_info is None for r in records)
    return [r.getMessage() for r in records]


def test_auto_mode_is_online_only_with_a_key_and_a_server_that_answers(
    wandb_env, caplog, answering_server, silent_server, closed_port
):
    assert resolve_wandb_mode("auto", answering_server) == "offline"  # no key
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_wandb_mode("auto", answering_server) == "online"
    assert resolve_wandb_mode("auto", closed_port) == "offline"
    assert resolve_wandb_mode("disabled") == "disabled" and resolve_wandb_mode("online", closed_port) == "online"
    wandb_env.setenv("WANDB_BASE_URL", silent_server)  # the address W&B itself would use
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        t0 = time.perf_counter()
        assert resolve_wandb_mode("auto") == "offline"
        assert time.perf_counter() - t0 < PROBE_TIMEOUT_S + 1
    assert w_and_b_warnings(caplog) == [
        f"W&B server {silent_server} did not answer within 3 s: this run tracks offline (`wandb sync` its folder later)"
    ]


def tracker(tmp_path, mode: str) -> Tracker:
    cfg = load_config("configs/demo.yaml", [f"wandb.mode={mode}", f"run.out_dir={tmp_path}"])
    return Tracker(cfg, tmp_path, enabled=True, config_dict={"a": 1})


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "address"), [("auto", "silent_server"), ("online", "closed_port")])
def test_unreachable_w_and_b_starts_an_offline_run_with_one_warning(
    wandb_env, capsys, caplog, request, tmp_path, mode, address
):
    url = request.getfixturevalue(address)
    unreachable(wandb_env, url)
    wandb_env.setenv("WANDB_INIT_TIMEOUT", "3")  # W&B's own variable: the online try gives up after 3 s
    with caplog.at_level(logging.WARNING):
        t0 = time.perf_counter()
        t = tracker(tmp_path, mode)
        # auto: the 3 s probe; online: W&B's 2 x 5 s identity look-ups, then its 3 s init timeout
        assert time.perf_counter() - t0 < (15 if mode == "auto" else 30)
    assert t.wandb_run is not None and t.wandb_run.offline
    t.log({"split": "train", "epoch": 0, "step": 1, "loss": 2.0})
    t.close()
    [warning] = w_and_b_warnings(caplog)
    assert url in warning and "offline" in warning and FAKE_KEY not in warning
    assert "Traceback" not in capsys.readouterr().err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{t.wandb_id}"))) == 1


def test_w_and_b_failing_mid_run_leaves_metrics_jsonl_and_one_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)

    class BrokenRun:
        def log(self, data):
            raise ConnectionError(f"service gone (key {FAKE_KEY})")

        def finish(self):
            raise AssertionError("finish is not called on a run that already failed")

    t = tracker(tmp_path, "disabled")
    t.wandb_run, t.wandb_id = BrokenRun(), "abcd1234"
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            t.log({"split": "train", "epoch": 0, "step": step, "loss": 2.0})
        t.close()
    [warning] = w_and_b_warnings(caplog)
    assert "ConnectionError" in warning and "abcd1234" in warning and FAKE_KEY not in warning
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_finish_failing_does_not_fail_the_run(caplog, tmp_path):
    t = tracker(tmp_path, "disabled")
    t.wandb_run = SimpleNamespace(finish=lambda: (_ for _ in ()).throw(TimeoutError("upload")))
    with caplog.at_level(logging.WARNING):
        t.close()
    assert len(w_and_b_warnings(caplog)) == 1 and t.wandb_run is None


@pytest.mark.slow
def test_train_finishes_when_w_and_b_is_unreachable(wandb_env, capsys, caplog, silent_server, tiny_digits, tmp_path):
    """A whole run around the tracker; each mode's way to an offline run is the tracker's (tested above)."""
    unreachable(wandb_env, silent_server)
    wandb_env.setenv("WANDB_INIT_TIMEOUT", "3")
    args = [f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", "model.name=resnet10d", "data.workers=0"]
    args += ["data.batch_size=32", "precision=fp32", "schedule.epochs=1", "run.log_every_steps=1"]  # 4 steps
    with caplog.at_level(logging.WARNING):
        assert main(["train", "configs/demo.yaml", *args, "wandb.mode=auto"]) == 0
    assert len(w_and_b_warnings(caplog)) == 1
    assert "Traceback" not in capsys.readouterr().err
    run_dir = tmp_path / "demo"
    splits = [json.loads(line)["split"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "train" in splits and "val" in splits
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


OFFLINE_RUN = """
import sys, time
from pathlib import Path
from dist_bot.config import load_config
from dist_bot.tracking import Tracker
run = Path(sys.argv[1])
cfg = load_config("configs/demo.yaml", ["wandb.mode=auto", f"run.out_dir={run}"])  # the default mode
t = Tracker(cfg, run, enabled=True, config_dict={})
t.log({"split": "train", "epoch": 0, "step": 1, "loss": 2.0})
t.close()
print(t.wandb_id, time.time(), flush=True)
"""


@pytest.mark.slow
def test_an_offline_run_ends_without_waiting_for_a_server_that_never_answers(wandb_env, silent_server, tmp_path):
    """The default mode (auto) with a key and a server that takes connections but never answers (a firewall that
    drops, a hung proxy): the run tracks offline, and its process ends at once. W&B would otherwise send its own
    telemetry there at exit, each request waiting 10 s for an answer."""
    unreachable(wandb_env, silent_server)
    cmd = [sys.executable, "-c", OFFLINE_RUN, str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=os.environ)
    ended = time.time()
    assert res.returncode == 0, res.stderr[-3000:]
    wandb_id, closed = res.stdout.split()
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 1
    assert ended - float(closed) < 5, f"the process took {ended - float(closed):.1f} s to end after the run closed"


@pytest.mark.slow
def test_offline_run_is_resumed_under_the_same_id(wandb_env, tiny_digits, tmp_path):
    wandb_env.setenv("WANDB_SILENT", "true")
    args = [
        "train",
        "configs/demo.yaml",
        f"data.path={tiny_digits}",
        f"run.out_dir={tmp_path}",
        *TINY,
        "schedule.epochs=1",
        "run.log_every_steps=2",
        "wandb.mode=auto",
    ]
    assert main([*args, "run.stop_after_steps=3"]) == 75
    run_dir = tmp_path / "demo"
    first_id = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["wandb_id"]
    assert first_id
    assert main(args) == 0
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["wandb_id"] == first_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<start, to the second>-<id>, and -1 after it if a run of that id started in the same second
    assert len(runs) == 2 and all(r.name.split("-")[3] == first_id for r in runs), runs
    logged = b"".join(f.read_bytes() for r in runs for f in r.glob("*.wandb"))
    assert b"train/loss" in logged and b"val/top1" in logged
    assert FAKE_KEY.encode() not in logged


@pytest.mark.slow  # two one-epoch runs
def test_a_finished_run_uploads_its_final_weights_and_ema_as_a_model_artifact(wandb_env, tiny_digits, tmp_path):
    from safetensors.torch import load_file

    from dist_bot.models.interop import to_timm

    wandb_env.setenv("WANDB_SILENT", "true")
    args = [f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", *TINY, "schedule.epochs=1", "wandb.mode=offline"]
    args += ["data.batch_size=32", "model.name=resnet18d"]  # a model with a timm twin: its names are under test
    assert main(["train", "configs/demo.yaml", *args, "model.ema_decay=0.9"]) == 0
    run_dir = tmp_path / "demo"
    final = list_checkpoints(run_dir / "checkpoints")[-1]
    for name, weights in (("resnet18d", "model.pt"), ("resnet18d_ema", "ema.pt")):  # timm's names, exactly these
        exported = load_file(run_dir / "export" / f"{name}.safetensors")
        expected = to_timm(torch.load(final / weights, weights_only=True), "resnet18d")
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected)
    [folder] = (run_dir / "wandb").glob("offline-run-*")
    [artifact] = wandb_records(folder, "artifact")
    run_id = load_checkpoint(final)["wandb_id"]
    assert (artifact.type, artifact.name) == ("model", f"model-{run_id}")
    metadata = json.loads(artifact.metadata)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metadata["best/top1"] == summary["best/top1"] and metadata["checkpoint"] == final.name
    assert sorted(metadata["files"]) == ["resnet18d.safetensors", "resnet18d_ema.safetensors"]
    assert sorted(e.path for e in artifact.manifest.contents) == sorted(metadata["files"])

    # wandb.log_model=false: no export, no artifact
    assert main(["train", "configs/demo.yaml", *args, "run.name=off", "wandb.log_model=false"]) == 0
    assert not (tmp_path / "off" / "export").exists()
    [folder] = (tmp_path / "off" / "wandb").glob("offline-run-*")
    assert wandb_records(folder, "artifact") == []


# -- the run summary, artifacts, and which dist_bot made the run -------------------------------------------------


def wandb_records(run_folder: Path, kind: str, wait_s: float = 30.0) -> list:
    """The `kind` records of an offline W&B run, once its .wandb file is complete: `finish()` returns before
    W&B's service has written the file (it can still be a bare header then), so wait for the run's exit record."""
    deadline = time.monotonic() + wait_s
    while not read_wandb_records(run_folder, "exit") and time.monotonic() < deadline:
        time.sleep(0.2)
    return read_wandb_records(run_folder, kind)


def read_wandb_records(run_folder: Path, kind: str) -> list:
    """The `kind` records ("summary", "run", "artifact") of an offline W&B run, read from its .wandb file: a
    LevelDB-style log (7-byte file header; 32 KiB blocks of chunks, each with a crc32/length/type header) of
    protobuf Records. Offline runs write no wandb-summary.json, and wandb 0.31 has no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_folder.glob("run-*.wandb")
    data, pos, block, chunks, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, chunk_type = struct.unpack("<IHB", data[pos : pos + 7])
        if chunk_type == 0:  # zero padding up to the block's end
            pos += block - pos % block
            continue
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if chunk_type in (1, 4):  # FULL, or the LAST chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == kind:
                out.append(getattr(record, kind))
    return out


def wandb_summary(run_folder: Path) -> dict:
    summary = {}
    for record in wandb_records(run_folder, "summary"):
        for item in record.update:
            summary["/".join([*item.nested_key] or [item.key])] = json.loads(item.value_json)
    return summary


def test_summary_keeps_the_best_and_the_final_of_each_top1():
    def val(epoch, top1, top5):
        return {"split": "val", "epoch": epoch, "step": 10 * (epoch + 1), "top1": top1, "top5": top5, "loss": 1.0}

    s = updated_summary({}, val(0, 50.0, 80.0) | {"ema_top1": 40.0, "ema_top5": 70.0})
    s = updated_summary(s, val(1, 60.0, 85.0) | {"ema_top1": 45.0, "ema_top5": 75.0})
    s = updated_summary(s, val(2, 60.0, 90.0) | {"ema_top1": 44.0, "ema_top5": 76.0})  # a tie keeps epoch 1
    assert s == {
        "best/top1": 60.0,
        "best/top5": 85.0,
        "best/epoch": 1,
        "best/step": 20,
        "final/top1": 60.0,
        "final/top5": 90.0,
        "final/epoch": 2,
        "final/step": 30,
        "best/ema_top1": 45.0,
        "best/ema_top5": 75.0,
        "best/ema_epoch": 1,
        "best/ema_step": 20,
        "final/ema_top1": 44.0,
        "final/ema_top5": 76.0,
        "final/ema_epoch": 2,
        "final/ema_step": 30,
    }


@pytest.mark.slow
def test_summary_survives_a_resume_in_summary_json_and_w_and_b_with_version_and_commit(
    wandb_env, tiny_digits, tmp_path, monkeypatch
):
    """3 epochs, stopped in the second: the first epoch's top-1 (the best) must still be best at the end."""
    wandb_env.setenv("WANDB_SILENT", "true")
    scripted = [70.0, 40.0, 55.0]  # top-1 of epochs 0, 1, 2 in the order they are evaluated

    def evaluate(model, loader, env, precision):
        top1 = scripted.pop(0)
        return {"top1": top1, "top5": top1 + 20, "loss": 1.0, "samples": 40}

    monkeypatch.setattr(loop, "evaluate", evaluate)
    args = ["train", "configs/demo.yaml", f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", *TINY]
    args += ["data.batch_size=32", "precision=fp32", "schedule.epochs=3", "wandb.mode=offline"]  # 4 steps an epoch
    assert main([*args, "run.stop_after_steps=6"]) == 75
    run_dir = tmp_path / "demo"
    assert json.loads((run_dir / "summary.json").read_text())["best/top1"] == 70.0
    assert main(args) == 0
    want = {"top1": 70.0, "top5": 90.0, "epoch": 0, "step": 4}
    want = {f"best/{k}": v for k, v in want.items()} | {"final/top1": 55.0, "final/top5": 75.0, "final/epoch": 2}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert want.items() <= summary.items()
    [_, second] = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert want.items() <= wandb_summary(second).items()  # the resumed segment alone holds the whole summary
    assert not (run_dir / "profile").exists()  # run.profile_steps unset: no profiler

    info = source_info()
    assert info["version"] == dist_bot.__version__
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert info["commit"] and info["commit"].removesuffix("-dirty") == commit
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["dist_bot"] == info
    config = {item.key: json.loads(item.value_json) for item in wandb_records(second, "run")[0].config.update}
    assert config["dist_bot"] == info
    header = (run_dir / "config.yaml").read_text().splitlines()[0]
    assert header == f"# written by dist_bot {info['version']}, commit {info['commit']}"
    assert load_config(run_dir / "config.yaml").schedule.epochs == 3  # still a recipe (the resume read it too)


def test_log_artifact_records_a_file_in_an_offline_run(wandb_env, tmp_path):
    wandb_env.setenv("WANDB_SILENT", "true")
    export = tmp_path / "model.onnx"
    export.write_bytes(b"not really onnx")
    t = tracker(tmp_path, "offline")
    assert t.log_artifact(export, "resnet18d-export", "model", {"top1": 70.0}) is not None
    with pytest.raises(UserError, match="does not exist"):
        t.log_artifact(tmp_path / "missing.onnx", "x", "model")
    t.close()
    [folder] = (tmp_path / "wandb").glob("offline-run-*")
    [artifact] = wandb_records(folder, "artifact")
    assert (artifact.name, artifact.type) == ("resnet18d-export", "model")
    assert json.loads(artifact.metadata) == {"top1": 70.0}
    assert [(c.path, c.size) for c in artifact.manifest.contents] == [("model.onnx", len(b"not really onnx"))]


def test_log_artifact_without_w_and_b_does_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    assert tracker(tmp_path, "disabled").log_artifact(tmp_path / "f", "f", "model") is None
    assert Tracker(None, tmp_path, enabled=False).log_artifact(tmp_path / "missing", "f", "model") is None


@pytest.mark.slow  # a run stopped and resumed
def test_tensorboard_holds_the_scalars_of_metrics_jsonl_without_w_and_b_across_a_resume(tiny_digits, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "configs/demo.yaml", f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", *TINY]
    args += ["schedule.epochs=2", "run.log_every_steps=1", "wandb.mode=disabled", "tensorboard.enabled=true"]
    assert main([*args, "run.stop_after_steps=3"]) == 75
    assert main(args) == 0
    run_dir = tmp_path / "demo"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for split, key in (("train", "loss"), ("train", "lr"), ("val", "top1"), ("val", "loss")):
        want = [(r["step"], r[key]) for r in records if r["split"] == split]
        got = [(e.step, e.value) for e in events.Scalars(f"{split}/{key}")]
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) > 1  # every step once, across the resume
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32 in the event file
    assert not (run_dir / "wandb").exists()
    off = Tracker(load_config("configs/demo.yaml", ["tensorboard.enabled=true"]), tmp_path / "r1", enabled=False)
    off.log({"split": "train", "epoch": 0, "step": 1, "loss": 2.0})
    off.close()
    assert not (tmp_path / "r1").exists()  # the other processes write nothing
