"""A fatal error ends the whole run, promptly: every process exits with status 2 and names the cause, and
nothing of the run is left behind (DataLoader workers, their forkserver, DALI's workers), nor holds its output.

The runs here use each loader's DEFAULT worker count, so the loaders' helper processes take part: a run with
data.workers=0 (as in test_bad_input.py) has none. The bad image is the first one that a chosen process reads,
so that process fails at its first step while the other one waits for it in that step's gradient all-reduce.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, torchrun_cmd

from dist_bot.config import load_config
from dist_bot.data.plan import plan_epoch
from dist_bot.data.source import scan_dataset

ARGS = ["model.name=resnet10d", "data.batch_size=8", "wandb.mode=disabled", "schedule.epochs=1", "data.workers=null"]
RUN_TIMEOUT_S = 300  # start (imports, forkserver, model, data) + first step + exit, on 2 busy CPU cores
EXIT_AFTER_ERROR_S = 30  # from the error's line in the output to the end of the output (every process gone)
MARKER = "DIST_BOT_FATAL_TEST_RUN"  # in the environment of every process of a run, helpers included


def with_bad_first_image(src: Path, dst: Path, rank: int, world_size: int) -> Path:
    """A copy of ``src`` in which process ``rank``'s first image of the first epoch is a truncated JPEG."""
    shutil.copytree(src, dst, symlinks=False)
    cfg = load_config("configs/demo.yaml", ARGS)
    train, _ = scan_dataset(str(dst))
    steps = plan_epoch(len(train), 8, rank, world_size, cfg.optim.grad_accum_steps, cfg.run.seed, epoch=0)
    bad = Path(train.samples[steps[0].micro_batches[0][0]][0])
    bad.write_bytes(bad.read_bytes()[:40])
    return dst


class Run:
    """A process started in its own session, its output (stdout and stderr together) read line by line."""

    def __init__(self, cmd: list[str], marker: str, extra_env: dict[str, str] | None = None):
        env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", MARKER: marker} | (extra_env or {})
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[tuple[float, str]] = []
        self.eof_at: float | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
        self.eof_at = time.monotonic()

    def finish(self, deadline: float) -> tuple[int, str]:
        """Exit status and output; fails if the output has not ended (every holder of the pipe gone) by then."""
        self.reader.join(max(0.0, deadline - time.monotonic()))
        assert self.eof_at is not None, "the run's output never ended: a process of the run still holds it"
        return self.proc.wait(timeout=10), self.output

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def seconds_from(self, text: str) -> float:
        """From the first line holding ``text`` to the end of the output."""
        first = next(t for t, line in self.lines if text in line)
        return self.eof_at - first


def processes_of(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{MARKER}={marker}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return found


@pytest.fixture
def marker():
    """A fresh marker; afterwards, no process may carry it (any left is killed, and the test fails)."""
    mark = uuid.uuid4().hex
    yield mark
    deadline = time.monotonic() + 10  # a process that has closed its output may still be exiting
    while (left := processes_of(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run left behind: {left}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(data: Path, out: Path, loader: str) -> list[str]:
    args = [f"data.path={data}", f"run.out_dir={out}", f"data.loader={loader}", *ARGS]
    return [sys.executable, "-m", "dist_bot", "train", "configs/demo.yaml", *args]


def needs(loader: str) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")


def assert_names_the_file_and_the_fix(text: str) -> None:
    assert "cannot read image" in text and "Remove or replace the file" in text and "Traceback" not in text, text


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_bad_image_ends_the_run_with_its_workers(tiny_digits, tmp_path, marker, loader):
    needs(loader)
    data = with_bad_first_image(tiny_digits, tmp_path / "data", rank=0, world_size=1)
    run = Run(train_cmd(data, tmp_path / "runs", loader), marker)
    code, out = run.finish(time.monotonic() + RUN_TIMEOUT_S)
    assert code == 2, out[-3000:]
    assert_names_the_file_and_the_fix(out)
    assert run.seconds_from("cannot read image") < EXIT_AFTER_ERROR_S


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_bad_image_on_one_process_ends_every_process_with_status_2(tiny_digits, tmp_path, marker, loader):
    """Two processes as srun starts them (each its own exit status): process 1 fails at its first step;
    process 0, waiting for it in that step's all-reduce, stops too, with process 1's error."""
    needs(loader)
    data = with_bad_first_image(tiny_digits, tmp_path / "data", rank=1, world_size=2)
    launch = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = train_cmd(data, tmp_path / "runs", loader)
    runs = [Run(cmd, marker, launch | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    (code0, out0), (code1, out1) = (run.finish(deadline) for run in runs)
    assert (code0, code1) == (2, 2), out0[-3000:] + out1[-3000:]
    assert_names_the_file_and_the_fix(out1)
    assert_names_the_file_and_the_fix(out0)
    assert "error: stopping: rank 1 failed: cannot read image" in out0
    assert all(run.seconds_from("cannot read image") < EXIT_AFTER_ERROR_S for run in runs)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_bad_image_ends_a_torchrun_run(tiny_digits, tmp_path, marker, loader):
    """Under torchrun the same, as far as torchrun lets it show: torchrun's own status is 1 whenever a process
    failed (it may also end the other process itself, with SIGTERM, as soon as the first has exited)."""
    needs(loader)
    data = with_bad_first_image(tiny_digits, tmp_path / "data", rank=1, world_size=2)
    cmd = torchrun_cmd(2, *train_cmd(data, tmp_path / "runs", loader)[3:])
    run = Run(cmd, marker)
    code, out = run.finish(time.monotonic() + RUN_TIMEOUT_S)
    assert code == 1 and "exitcode  : 2" in out, out[-3000:]
    assert "dist-bot train: error: cannot read image" in out and "Remove or replace the file" in out
    assert run.seconds_from("cannot read image") < EXIT_AFTER_ERROR_S
