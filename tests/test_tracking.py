"""W&B tracking: offline without a key or a server that answers, the run id kept in checkpoints, the same run
continued on resume, and training that goes on (with one warning) whenever W&B fails."""

import http.server
import json
import logging
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from dist_bot.checkpoint import list_checkpoints, load_checkpoint
from dist_bot.cli import main
from dist_bot.config import load_config
from dist_bot.tracking import PROBE_TIMEOUT_S, Tracker, resolve_wandb_mode

FAKE_KEY = "f" * 40
TINY = ["model.name=resnet18d", "data.workers=0", "data.batch_size=8", "schedule.warmup_epochs=0"]


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


@pytest.mark.parametrize(("mode", "address"), [("auto", "silent_server"), ("online", "closed_port")])
def test_train_finishes_when_w_and_b_is_unreachable(
    wandb_env, capsys, caplog, request, tiny_digits, tmp_path, mode, address
):
    unreachable(wandb_env, request.getfixturevalue(address))
    wandb_env.setenv("WANDB_INIT_TIMEOUT", "3")
    args = [f"data.path={tiny_digits}", f"run.out_dir={tmp_path}", "model.name=resnet18d", "data.workers=0"]
    args += ["data.batch_size=32", "precision=fp32", "schedule.epochs=1", "run.log_every_steps=1"]  # 4 steps
    with caplog.at_level(logging.WARNING):
        assert main(["train", "configs/demo.yaml", *args, f"wandb.mode={mode}"]) == 0
    assert len(w_and_b_warnings(caplog)) == 1
    assert "Traceback" not in capsys.readouterr().err
    run_dir = tmp_path / "demo"
    splits = [json.loads(line)["split"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "train" in splits and "val" in splits
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


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
    assert len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)
    logged = b"".join(f.read_bytes() for r in runs for f in r.glob("*.wandb"))
    assert b"train/loss" in logged and b"val/top1" in logged
    assert FAKE_KEY.encode() not in logged
