"""The fault matrix: each fault injected into a real run, nothing lost, the outcome asserted exactly.

Runs are tiny (100 digits, resnet10d, 2 processes x 8 images, fp32 unless said) so that the whole matrix is a
few minutes; tests/probes/fault_probe.py injects the faults that cannot be made from outside (a full disk, a read error
on one node, a signal at a chosen moment of start-up). docs/reliability.md lists the same cases.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, alive, run_cmd, run_statuses, runs_cmd, startup_fields, torchrun_cmd

from dist_bot.checkpoint import list_checkpoints, load_checkpoint, read_file
from dist_bot.config import load_config
from dist_bot.distributed.env import DistEnv
from dist_bot.errors import CheckpointError
from dist_bot.train import Trainer

PROBE = str(REPO / "tests" / "probes" / "fault_probe.py")
# the global batch is fixed, so a run may resume at any number of processes (here also a single in-process one)
ARGS = [
    "model.name=resnet10d",
    "data.global_batch_size=16",
    "precision=fp32",
    "schedule.epochs=2",
    "run.log_every_steps=1",
]
S = 7  # steps per epoch: 100 images / global batch 16 = 6 steps of 16 and one of 4


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "configs/demo.yaml", f"data.path={data}", *ARGS, f"run.out_dir={out}", "run.name=r", *extra]


def probe_cmd(nproc: int, fault: str, *args: str, restarts: int = 0) -> list[str]:
    return torchrun_cmd(nproc, fault, *args, script=PROBE, restarts=restarts)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    return read_file(path / "model.pt")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "dist-bot train: error:" in line]


@pytest.fixture(scope="module")
def straight(tiny_digits, tmp_path_factory) -> Path:
    """2 processes, 2 epochs, uninterrupted: checkpoints after epoch 1 and 2."""
    out = tmp_path_factory.mktemp("straight")
    res = run_cmd(torchrun_cmd(2, *train_args(tiny_digits, out)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [load_checkpoint(p)["global_step"] for p in list_checkpoints(out / "r" / "checkpoints")] == [S, 2 * S]
    return out / "r"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to / "r")
    return to / "r"


# -- a rank dies ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_one_rank_mid_step_restarts_and_ends_with_the_same_weights(straight, tiny_digits, tmp_path):
    cmd = probe_cmd(2, "none", *train_args(tiny_digits, tmp_path), restarts=1)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run, deadline = tmp_path / "r", time.time() + 180
    while time.time() < deadline:  # the first step of epoch 2: the epoch-1 checkpoint exists
        if (run / "metrics.jsonl").exists() and any(m["epoch"] == 1 for m in metrics(run) if m["split"] == "train"):
            break
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err and f"step_{S:09d}" in err  # the restarted group continued epoch 1's checkpoint
    assert (
        max_diff(
            weights(list_checkpoints(run / "checkpoints")[-1]), weights(list_checkpoints(straight / "checkpoints")[-1])
        )
        <= 1e-6
    )


# -- damaged checkpoints -------------------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()


def resume_in_process(run: Path, data: Path) -> Trainer:
    cfg = load_config("configs/demo.yaml", [f"data.path={data}", *ARGS, f"run.out_dir={run.parent}", "run.name=r"])
    return Trainer(cfg, DistEnv())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "missing"])
@pytest.mark.parametrize("name", ["meta.pt", "model.pt", "train_state.pt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_whole(
    straight, tiny_digits, tmp_path, caplog, name, how
):
    run = copy_run(straight, tmp_path)
    first, newest = list_checkpoints(run / "checkpoints")
    damage(newest / name, how)
    trainer = resume_in_process(run, tiny_digits)
    # everything of the previous checkpoint, nothing of the damaged one: weights, momentum, counters
    assert (trainer.epoch, trainer.epoch_step, trainer.global_step) == (1, 0, S)
    assert max_diff(trainer.strategy.module.state_dict(), weights(first)) == 0
    saved = read_file(first / "train_state.pt")["optimizer"]["state"]
    live = trainer.strategy.optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["momentum_buffer"], live[i]["momentum_buffer"]) for i in saved)
    assert f"checkpoint {newest} cannot be used (rank 0: " in caplog.text and name in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meta.pt", "model.pt", "train_state.pt"])
def test_the_only_checkpoint_damaged_stops_with_its_name_and_never_starts_fresh(
    straight, tiny_digits, tmp_path, capsys, name
):
    from dist_bot.cli import main

    run = copy_run(straight, tmp_path)
    first, newest = list_checkpoints(run / "checkpoints")
    shutil.rmtree(first)
    damage(newest / name, "truncated")
    code = main(train_args(tiny_digits, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"no checkpoint in {run / 'checkpoints'} is readable by every process" in err and name in err
    assert "move" in err and "aside" in err  # what to do
    assert list_checkpoints(run / "checkpoints") == [newest]  # nothing written over it
    with pytest.raises(CheckpointError):
        resume_in_process(run, tiny_digits)


@pytest.mark.slow
def test_a_checkpoint_unreadable_on_one_rank_only_is_skipped_by_every_rank(straight, tiny_digits, tmp_path):
    run = copy_run(straight, tmp_path)
    res = run_cmd(probe_cmd(2, f"unreadable:{2 * S}:1", *train_args(tiny_digits, tmp_path, "schedule.epochs=2")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"step_{2 * S:09d} cannot be used (rank 1: checkpoint file" in res.stderr
    assert f"resumed from {run / 'checkpoints' / f'step_{S:09d}'}" in res.stderr  # both ranks: one collective
    # epoch 2 trained again from epoch 1's checkpoint: the same weights as the straight run
    assert (
        max_diff(
            weights(list_checkpoints(run / "checkpoints")[-1]), weights(list_checkpoints(straight / "checkpoints")[-1])
        )
        <= 1e-6
    )


# -- a full disk while saving --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "rank"), [("ddp", 0), ("fsdp", 1)])
def test_a_full_disk_while_saving_is_an_error_on_every_rank_and_keeps_the_last_checkpoint(
    tiny_digits, tmp_path, strategy, rank
):
    args = train_args(tiny_digits, tmp_path, f"strategy={strategy}")
    t0 = time.time()
    res = run_cmd(probe_cmd(2, f"enospc:{2 * S}:{rank}", *args), timeout=300)
    lines = errors(res.stderr)
    assert res.returncode != 0 and len(lines) == 2, res.stderr[-3000:]  # both ranks: status 2, one line each
    assert all(f"failed on rank {rank} (OSError: [Errno 28] No space left on device)" in line for line in lines)
    assert all("the newest checkpoint is" in line and f"step_{S:09d}" in line for line in lines)
    assert "exitcode  : 2" in res.stderr and "exitcode  : 1" not in res.stderr
    assert time.time() - t0 < 240
    ckpts = tmp_path / "r" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step_{S:09d}"]
    assert not list(ckpts.glob(".tmp_*"))
    assert load_checkpoint(list_checkpoints(ckpts)[-1])["global_step"] == S
    again = run_cmd(torchrun_cmd(2, *args))  # space freed: it resumes from there and finishes
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step_{S:09d}", f"step_{2 * S:09d}"]


# -- the first launches of the resume tests below, in one torchrun ------------------------------------------

# a small initial scale and a short growth interval: the scale doubles every 2 clean steps until it overflows,
# halves and grows again, so a GradScaler state lost at the resume (step 9) would show in the trajectory, and most
# steps are applied, so the weights compare too. 16 px: this CPU runs fp16 ~10x slower than fp32, and the subject
# is the loss scale's state, not the images (the suite's end-to-end fp16 run)
FP16 = ["precision=fp16", "loss_scale.init_scale=4096", "loss_scale.growth_interval=2", "data.image_size=16"]
# (strategy, processes before, processes after, global batch)
WORLD_SIZES = [("ddp", 2, 1, 16), ("fsdp", 2, 3, 36)]


def world_size_args(data: Path, out: Path, strategy: str, global_batch: int) -> list[str]:
    return train_args(data, out, f"strategy={strategy}", f"data.global_batch_size={global_batch}")


@pytest.fixture(scope="module")
def first_launches(tiny_digits, tmp_path_factory) -> Path:
    """The first launch of each test below that resumes a 2-process run, all in one torchrun (runs_probe.py; a
    start-up costs more than these runs): FOLDER/<test>/, each run as that test would start it alone."""
    out = tmp_path_factory.mktemp("first_launches")
    runs = [  # (status, args)
        (0, train_args(tiny_digits, out / "fp16", *FP16, "run.name=straight")),
        (75, train_args(tiny_digits, out / "fp16", *FP16, "run.stop_after_steps=9")),
        (75, train_args(tiny_digits, out / "splits", "data.global_batch_size=24", "run.stop_after_steps=1")),
    ]
    for strategy, _, _, global_batch in WORLD_SIZES:
        args = world_size_args(tiny_digits, out / f"world-{strategy}", strategy, global_batch)
        if strategy != "ddp":  # the ddp case's uninterrupted reference is the straight fixture (ARGS: ddp, 16)
            runs.append((0, [*args, "run.name=ref"]))
        runs.append((75, [*args, "run.stop_after_steps=2"]))
    res = run_cmd(runs_cmd(2, *(args for _, args in runs)))
    assert run_statuses(res.stdout) == {i: [status] * 2 for i, (status, _) in enumerate(runs)}, res.stderr[-3000:]
    return out


# -- preemption ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_signal_during_start_up_exits_75_and_writes_nothing(tiny_digits, tmp_path):
    res = run_cmd(probe_cmd(2, "startup-signal:SIGUSR1", *train_args(tiny_digits, tmp_path)))
    assert "stopped during start-up at step 0, nothing written (SIGUSR1)" in res.stdout, res.stderr[-3000:]
    assert "exiting with status 75" in res.stdout
    assert "exitcode  : 75" in res.stderr and "exitcode  : 2" not in res.stderr
    run = tmp_path / "r"
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not [m for m in metrics(run) if m["split"] == "train"]


@pytest.mark.slow
def test_fp16_preempted_and_resumed_equals_uninterrupted_with_the_loss_scale(first_launches, tiny_digits):
    folder = first_launches / "fp16"  # an uninterrupted run, and one stopped after step 9 (FP16 says why)
    second = run_cmd(torchrun_cmd(2, *train_args(tiny_digits, folder, *FP16)))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]

    def trajectory(run):
        return [(m["step"], m["loss_scale"], m["skipped_steps"]) for m in metrics(run) if m["split"] == "train"]

    want = trajectory(folder / "straight")
    assert trajectory(folder / "r") == want
    scales = [scale for _, scale, _ in want]
    assert max(scales) > 4096 and any(b < a for a, b in itertools.pairwise(scales))  # it grew, and backed off
    assert 1 <= want[-1][2] <= len(want) // 2  # some steps overflowed and were skipped, most were applied
    a, b = (weights(list_checkpoints(folder / n / "checkpoints")[-1]) for n in ("straight", "r"))
    assert max_diff(a, b) <= 1e-6


# -- another world size --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_another_world_size_without_a_global_batch_stops_and_says_how(tiny_digits, tmp_path):
    args = [a for a in train_args(tiny_digits, tmp_path) if not a.startswith("data.global_batch_size")]
    args += ["data.batch_size=8"]  # per process: the global batch follows the number of processes
    first = run_cmd(torchrun_cmd(2, *args, "run.stop_after_steps=3"))
    assert "exiting with status 75" in first.stdout, first.stderr[-3000:]
    res = run_cmd(torchrun_cmd(1, *args))
    (line,) = errors(res.stderr)
    assert "was written by 2 process(es) x 8 images x 1 accumulation = global batch 16" in line
    assert "this run's global batch is 8" in line and "set data.global_batch_size=16" in line
    assert [p.name for p in list_checkpoints(tmp_path / "r" / "checkpoints")] == ["step_000000003"]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "before", "after", "global_batch"), WORLD_SIZES)
def test_another_world_size_with_a_global_batch_continues_the_same_plan(
    straight, first_launches, tiny_digits, tmp_path, strategy, before, after, global_batch
):
    folder = first_launches / f"world-{strategy}"  # `before` processes stopped after step 2 (and a reference)
    args = world_size_args(tiny_digits, folder, strategy, global_batch)
    reference = straight if strategy == "ddp" else folder / "ref"
    (saved,) = list_checkpoints(folder / "r" / "checkpoints")
    assert (saved / "dcp").is_dir() == (strategy == "fsdp")  # FSDP2: sharded, torch.distributed.checkpoint
    # what the new world size holds right after resuming is exactly what was saved (FSDP: resharded 2 -> 3);
    # the probe writes it, then the same launch trains on to the end
    dump = tmp_path / "resumed.pt"
    second = run_cmd(probe_cmd(after, f"dump:{dump}", *args))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"continuing a checkpoint of {before} process(es)" in second.stderr
    assert max_diff(torch.load(dump, weights_only=True), weights(saved)) == 0
    # the same steps (per epoch and in all) and the same lr at each: the recipe did not change with the world
    got, want = (
        [(m["epoch"], m["step"], m["lr"]) for m in metrics(run) if m["split"] == "train"]
        for run in (folder / "r", reference)
    )
    assert got == want


@pytest.mark.slow
def test_another_world_size_that_splits_the_last_step_otherwise_stops_and_says_how(first_launches, tiny_digits):
    # global batch 24 over 100 images: the last step's 4 images feed 2 processes (2 each), not 3; stopped after 1
    args = train_args(tiny_digits, first_launches / "splits", "data.global_batch_size=24")
    res = run_cmd(torchrun_cmd(3, *args))
    lines = errors(res.stderr)
    assert (
        len(set(lines)) == 1  # torchrun may stop the others before they print
        and "with 5 steps per epoch by 2 process(es)" in lines[0]
        and "makes 4 with 3 process(es)" in lines[0]
    ), res.stderr[-3000:]


# -- W&B unreachable -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_w_and_b_unreachable_under_two_processes_trains_offline_with_one_warning(tiny_digits, tmp_path):
    pytest.importorskip("wandb", reason="W&B tracking needs wandb (pip install -e '.[wandb]')")
    import socket

    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:  # takes connections, never answers
        env = os.environ | {
            "OMP_NUM_THREADS": "1",
            "HOME": str(tmp_path),  # no ~/.netrc, no W&B settings
            "WANDB_API_KEY": "f" * 40,
            "WANDB_BASE_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
            # room for a loaded machine: starting W&B's offline service took over dist_bot's 30 s bound there,
            # which this test is not about (W&B's own variable wins over dist_bot's bound)
            "WANDB_INIT_TIMEOUT": "180",
        }
        cmd = torchrun_cmd(2, *train_args(tiny_digits, tmp_path, "wandb.mode=auto", "schedule.epochs=1"))
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if "W&B" in line and "WARNING" in line]
    assert len(warnings) == 1 and "offline" in warnings[0], res.stderr[-3000:]
    assert "f" * 40 not in res.stderr + res.stdout
    assert [m["split"] for m in metrics(tmp_path / "r")][-1] == "val"  # metrics.jsonl has the whole run
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*"))


def test_preemption_handlers_stay_until_everything_is_closed_then_are_restored(tiny_digits, tmp_path, monkeypatch):
    from dist_bot.cli import main
    from dist_bot.signals import PREEMPTION
    from dist_bot.tracking import Tracker

    real_close, seen = Tracker.close, []

    def close(self):  # a SIGTERM while W&B uploads its last data must still be caught
        seen.append(signal.getsignal(signal.SIGTERM) == PREEMPTION._handle)
        real_close(self)

    monkeypatch.setattr(Tracker, "close", close)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    assert main([*train_args(tiny_digits, tmp_path, "schedule.epochs=1"), "data.loader=torch"]) == 0
    assert seen == [True]
    assert {s: signal.getsignal(s) for s in before} == before and not PREEMPTION.installed


# -- a hang -----------------------------------------------------------------------------------------------------


def wait_for_steps(run: Path, steps: int, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    """Until ``run``'s metrics.jsonl holds ``steps`` training records (the run is mid-epoch and stepping)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was stopped"
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if sum(json.loads(x)["split"] == "train" for x in lines if x.endswith("}")) >= steps:
            return
        time.sleep(0.2)
    pytest.fail(f"{run} did not log {steps} steps in {timeout_s} s")


def check_hang_report(hang: Path, ranks: list[int]) -> dict[int, str]:
    """The stack file of each rank in ``ranks``: it says why, and shows where the training thread waited."""
    stacks = {r: (hang / f"rank{r}.txt").read_text() for r in ranks}
    for text in stacks.values():
        assert "nothing completed for" in text, text[:2000]
        assert "Thread" in text and "loop.py" in text, text[:3000]
    return stacks


HANG_MIN = 0.2  # the watchdog's timeout in these tests (12 s): well above their longest gap between beats (seconds)


@pytest.mark.slow
def test_a_stopped_rank_is_a_hang_every_other_rank_dumps_its_stacks_and_the_job_ends(tiny_digits, tmp_path):
    """SIGSTOP of rank 1 mid-epoch under torchrun (2 processes): rank 0 sees no step complete for
    dist.hang_timeout_min, writes its stacks to <run>/hang/rank0.txt and stderr, and exits with status 3. Nothing
    waits for the collectives' 30-minute timeout. Then the stopped rank is continued, as a stalled process that
    recovers would be: it writes its stacks too (for its own watchdog's finding or rank 0's, whichever it reads
    first) and ends at once (left stopped, it is torchrun's to end: SIGKILL after its shutdown timeout, 30 s;
    tests/system/test_slurm.py leaves it to srun)."""
    from test_fatal_errors import MARKER, processes_of

    run, err, mark = tmp_path / "r", tmp_path / "stderr.txt", f"hang-{os.getpid()}-{time.time()}"
    args = train_args(tiny_digits, tmp_path, "schedule.epochs=100", f"dist.hang_timeout_min={HANG_MIN}")
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", MARKER: mark}
    with open(err, "w") as stderr:
        proc = subprocess.Popen(torchrun_cmd(2, *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        wait_for_steps(run, 3, proc)
        fields = startup_fields(err.read_text())
        finder, victim = int(fields[0]["pid"]), int(fields[1]["pid"])
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        while alive(finder) and time.monotonic() < stopped + HANG_MIN * 60 + 60:
            time.sleep(0.1)
        found = time.monotonic() - stopped
        os.kill(victim, signal.SIGCONT)
        status = proc.wait(timeout=120)
        ended = time.monotonic() - stopped
    finally:
        proc.kill()
    text = err.read_text()
    stacks = check_hang_report(run / "hang", [0, 1])
    dumped = (run / "hang" / "rank0.txt").stat().st_mtime - (time.time() - (time.monotonic() - stopped))
    print(
        f"stopped rank 1: rank 0 dumped its stacks {dumped:.1f} s later and ended after {found:.1f} s; "
        f"continued, rank 1 ended {ended - found:.1f} s after that"
    )
    assert status != 0 and ("exitcode  : 3" in text or "exitcode: 3" in text), text[-3000:]
    assert "a hang; every process's stacks are in" in text and "Thread" in text  # on stderr too
    assert not alive(victim)
    assert found < HANG_MIN * 60 + 30, found
    assert ended - found < 15, ended - found  # by itself: torchrun would end it after 30 s
    assert stacks[0].startswith("rank 0: nothing completed for")  # its own finding, not read back as news
    assert "in fit" in stacks[0] and "in train_epoch" in stacks[0]  # where training waited: in a step's collective
    deadline = time.monotonic() + 10  # nothing of the run left behind: loader workers end with their trainer
    while (left := [p for p in processes_of(mark) if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    print(stacks[0][-2500:])
