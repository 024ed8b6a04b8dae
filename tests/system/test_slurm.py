"""Against a REAL two-node Slurm cluster (tests/system/slurm/cluster.py): the sbatch script, the submitit launcher,
preemption with requeue through both, and a sweep as a job array.

Every job trains a ResNet-10-D on a 200-image Imagenette subset at 64 px, 2 epochs of 13 steps, with 2
processes (2 nodes x 1 task) and the torchvision loader with a worker process, so Slurm's signals also reach
DataLoader workers, as on a real cluster. In fp32, not the config's bf16: the subject here is Slurm, and on
CPUs without AMX bf16 autocast is ~10x slower (bf16 has its own end-to-end tests). An uninterrupted sbatch run
is the reference: a preempted and requeued run must log every step once and end with exactly its metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, alive, check_doctor_report, startup_fields

from dist_bot.checkpoint import list_checkpoints, read_meta

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import cluster  # the test helper beside this file

pytestmark = pytest.mark.slurm

STEPS_PER_EPOCH, EPOCHS = 13, 2
SMALL = [
    "model.name=resnet10d",
    "data.image_size=64",
    "data.batch_size=8",
    "data.loader=torch",
    "data.workers=1",
    "precision=fp32",
    f"schedule.epochs={EPOCHS}",
    "optim.base_lr_per_256=0.5",
    "run.log_every_steps=1",
    "wandb.mode=offline",
    "wandb.log_model=false",  # the artifact (an ONNX export of a ResNet-10: seconds per job) is test_tracking's
]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm_env(pytestconfig):
    """The client environment of a fresh 2-node cluster, torn down after the session even when tests fail."""
    _capture[:] = [c for c in [pytestconfig.pluginmanager.get_plugin("capturemanager")] if c]
    why = cluster.missing()
    if why:
        if os.environ.get("DIST_BOT_REQUIRE_SLURM") == "1":
            pytest.fail(f"DIST_BOT_REQUIRE_SLURM=1 (set by .ci/run after installing Slurm), but {why}")
        pytest.skip(why)
    # scripts/test.sh names the folder so that its exit trap can stop a cluster that pytest left behind;
    # short, under /tmp: a munge socket path has a length limit
    folder = Path(os.environ.get("DIST_BOT_SLURM_DIR") or tempfile.mkdtemp(prefix="dist_bot_slurm_"))
    t0 = time.monotonic()
    try:
        client = cluster.up(folder)
    except cluster.ClusterError:
        cluster.down(folder)
        raise
    report(f"2-node test cluster up in {time.monotonic() - t0:.2f} s ({folder})")
    # without the runner's OMP_NUM_THREADS (a library imported by an earlier test may set it): the jobs' own
    # thread counts, from the CPUs each task got, are under test
    runner = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    # The two test nodes are one host: a 2-node job's tasks are each bound to the same 2 cores, and OpenMP's
    # threads spinning while they wait would take the other node's cores. Measured: an uninterrupted 2-node job
    # 38 s with spinning, 18 s without; a 1-node job 16 s either way. A real cluster's nodes share no cores.
    yield runner | client | {"WANDB_SILENT": "true", "OMP_WAIT_POLICY": "PASSIVE"}
    cluster.down(folder, remove=True)


_capture = []  # pytest's capture manager, set by the slurm_env fixture


def report(line: str) -> None:
    """Timings for the CI log, past pytest's output capture."""
    for cm in _capture:
        with cm.global_and_fixture_disabled():
            print(f"\n[slurm] {line}", flush=True)


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def job_info(job: str, env: dict) -> dict[str, str]:
    out = run(["scontrol", "show", "job", "-o", job], env)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv) if out.returncode == 0 else {}


def wait_job(job: str, env: dict, timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job, env)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish within {timeout} s: {job_info(job, env)}")


def wait_for_step(metrics: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{metrics} did not reach step {step} within {timeout} s")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_val(run_dir: Path) -> dict:
    val = [m for m in read_metrics(run_dir) if m["split"] == "val"][-1]
    return {k: val[k] for k in ("epoch", "step", "top1", "top5", "loss", "samples")}


def sbatch_cpu(
    env: dict, data: Path, out: Path, name: str, *flags: str, overrides: tuple[str, ...] = (), **job_env: str
) -> subprocess.CompletedProcess:
    """The CPU script on 2 nodes x 1 task of 2 CPUs (each node's both: task/affinity binds them), unless
    ``flags`` say otherwise."""
    job_env = env | {"DATA": str(data), "OUT_DIR": str(out), "RUN_NAME": name} | job_env
    script = ["slurm/cpu_imagenette_2nodes.sh", *SMALL, *overrides]
    return run(["sbatch", "--parsable", f"--output={out}/%x-%j.out", "--cpus-per-task=2", *flags, *script], job_env)


def assert_cpus(log: str, expected: dict[int, tuple[str, int]], launcher: str = "slurm") -> dict[int, dict]:
    """Each rank's start-up line: the launcher, its CPUs (affinity as Slurm bound it) and what follows from them."""
    fields = startup_fields(log)
    assert sorted(fields) == sorted(expected), log[-3000:]
    for rank, (affinity, cpus) in expected.items():
        f = fields[rank]
        assert (f["launcher"], f["affinity"], int(f["cpus"])) == (launcher, affinity, cpus), f
        assert int(f["omp_threads"]) == cpus, f  # (the loaders' workers: data.workers=1 in these jobs)
    return fields


def submitit_cmd(out: Path, data: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.submit",
        "configs/imagenette_cpu.yaml",
        *SMALL,
        f"data.path={data}",
        f"run.out_dir={out}",
        "--name",
        name,
        "--cluster",
        "slurm",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "1",
        "--time",
        "20",
        "--cpus-per-task",
        "2",
        *extra,
    ]


def assert_resumed_exactly(run_dir: Path, reference: dict, log: str) -> int:
    """Every step logged once, a mid-epoch checkpoint resumed, the same W&B run, the reference's metrics."""
    steps = [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1)), f"steps repeated or skipped: {steps}"
    assert "resumed from" in log, log[-3000:]
    resumed_at = int(log.split("resumed from")[1].split("step_")[1][:9])
    assert resumed_at % STEPS_PER_EPOCH > 0, f"resumed at step {resumed_at}: not mid-epoch"
    assert final_val(run_dir) == reference
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    ids = {p.name.rsplit("-", 1)[1] for p in wandb_runs}
    assert len(wandb_runs) == 2 and len(ids) == 1, f"expected one W&B run id in two attempts: {wandb_runs}"
    assert read_meta(list_checkpoints(run_dir / "checkpoints")[-1])["wandb_id"] in ids
    return resumed_at


@pytest.fixture(scope="module")
def straight(slurm_env, imagenette_subset, tmp_path_factory) -> dict:
    """(a) `sbatch --wait` of the CPU script on 2 nodes x 1 task: the uninterrupted reference run."""
    out = tmp_path_factory.mktemp("sbatch")
    t0 = time.monotonic()
    done = sbatch_cpu(slurm_env, imagenette_subset, out, "straight", "--wait")
    log = "\n".join(p.read_text() for p in out.glob("*.out"))
    assert done.returncode == 0, f"{done.stderr}\n{log[-3000:]}"
    report(f"sbatch --wait, 2 nodes: {time.monotonic() - t0:.1f} s")
    return {"run_dir": out / "straight", "log": log, "val": final_val(out / "straight")}


@pytest.mark.slow
def test_sbatch_cpu_script_trains_and_evaluates_on_two_nodes(straight):
    """...and each task gets the CPUs the job asked for (sbatch --cpus-per-task=2), bound by Slurm: srun does not
    inherit --cpus-per-task (Slurm >= 22.05), so without the script's SRUN_CPUS_PER_TASK each would get one."""
    assert "2 tasks on node[1-2], master node1" in straight["log"]
    fields = assert_cpus(straight["log"], {0: ("0-1", 2), 1: ("0-1", 2)})
    assert [fields[r]["local_rank"] for r in (0, 1)] == ["0/1", "0/1"]
    assert straight["val"]["samples"] == 100  # the whole validation subset, counted once over both nodes
    assert straight["val"]["step"] == EPOCHS * STEPS_PER_EPOCH
    steps = [m["step"] for m in read_metrics(straight["run_dir"]) if m["split"] == "train"]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))


@pytest.mark.slow
def test_sbatch_preempted_mid_epoch_requeues_and_resumes_exactly(slurm_env, straight, imagenette_subset, tmp_path):
    """Slurm's --signal=B:USR1 warning, sent by hand: checkpoint on every rank, requeue, resume."""
    t0 = time.monotonic()
    job = sbatch_cpu(slurm_env, imagenette_subset, tmp_path, "preempted").stdout.strip()
    wait_for_step(tmp_path / "preempted" / "metrics.jsonl", 3)
    assert run(["scancel", "--batch", "--signal=USR1", job], slurm_env).returncode == 0
    info = wait_job(job, slurm_env)
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    assert "requeueing job" in log and "restart 1" in log
    at = assert_resumed_exactly(tmp_path / "preempted", straight["val"], log)
    report(f"sbatch preempted at step {at}, requeued, done: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_submitit_launcher_on_two_nodes_preempted_mid_epoch_requeues_and_resumes_exactly(
    slurm_env, straight, imagenette_subset, tmp_path
):
    """`python -m launch.submit ... --nodes 2 --wait`, preempted as Slurm preempts (what submitit's own
    `job._interrupt()` sends: SIGTERM, then its SIGUSR2, to every process): Checkpointable requeue, resume, and the
    result printed at the end is the sbatch script's (same world size and seed: the same run). One job for the
    launcher and its preemption: a job's start-up is most of its cost."""
    cmd = submitit_cmd(tmp_path, imagenette_subset, "preempted", "--nodes", "2", "--wait")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = json.loads(proc.stdout.readline())["job_id"]  # printed (and flushed) before it waits
        wait_for_step(tmp_path / "preempted" / "metrics.jsonl", 3)
        for sig in ("SIGTERM", "USR2"):
            assert run(["scancel", job, "--signal", sig], slurm_env).returncode == 0
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and lines[-1]["state"] == "done", stdout + stderr[-3000:]
    result = lines[-1]["result"]
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "submitit_logs").glob("*/*_0_log.*")))
    assert {k: result[k] for k in straight["val"]} == straight["val"], logs[-3000:]
    assert Path(result["run_dir"]) == tmp_path / "preempted"
    assert "requeueing through submitit" in logs and "Requeued job" in logs
    at = assert_resumed_exactly(tmp_path / "preempted", straight["val"], logs)
    # submitit's srun line passes no CPU count of its own: launch.submit adds it (--cpus-per-task 2 here)
    errs = [p.read_text() for p in sorted((tmp_path / "submitit_logs").glob("*/*_log.err"))]
    assert_cpus("\n".join(errs), {0: ("0-1", 2), 1: ("0-1", 2)})
    report(f"submitit preempted at step {at}, requeued, done: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_sweep_runs_as_a_job_array(slurm_env, imagenette_subset, tmp_path):
    cmd = submitit_cmd(tmp_path, imagenette_subset, "sweep", "--sweep", "optim.base_lr_per_256=0.25,1.0", "--wait")
    cmd[cmd.index(f"schedule.epochs={EPOCHS}")] = "schedule.epochs=1"
    done = run(cmd, slurm_env)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    results = [x for x in lines if "state" in x]
    assert done.returncode == 0 and [r["state"] for r in results] == ["done", "done"], done.stdout + done.stderr
    array = {r["job_id"].split("_")[0] for r in results}
    assert len(array) == 1 and sorted(r["job_id"].split("_")[1] for r in results) == ["0", "1"]
    array_id = array.pop()
    script = (tmp_path / "submitit_logs" / array_id / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%" in script  # one sbatch: a job array of two, not two jobs
    lrs = {}
    for r in results:
        run_dir = Path(r["result"]["run_dir"])
        assert run_dir.name == r["name"] and r["result"]["samples"] == 100
        lrs[run_dir.name] = [m["lr"] for m in read_metrics(run_dir) if m["split"] == "train"]
    assert sorted(lrs) == ["sweep-base_lr_per_256=0.25", "sweep-base_lr_per_256=1.0"]
    peak = {k: max(v) for k, v in lrs.items()}
    assert peak["sweep-base_lr_per_256=1.0"] == pytest.approx(4 * peak["sweep-base_lr_per_256=0.25"])


@pytest.mark.slow
def test_deepspeed_through_the_sbatch_script_on_two_tasks_of_one_cpu_each_and_a_long_end(
    slurm_env, imagenette_subset, tmp_path
):
    """strategy=deepspeed under srun: DeepSpeed asserts LOCAL_RANK, which srun does not set; the start-up path
    exports it (and RANK, WORLD_SIZE, ...) for every launcher. 1 node x 2 tasks x 1 CPU: Slurm binds each task
    to a CPU of its own. And rank 0's end-of-run work takes 8 s (tests/system/slurm/slow_end) with srun --wait=3:
    the ranks end together, so the finished run is COMPLETED (rank 1 exiting first, srun would end rank 0)."""
    done = sbatch_cpu(
        slurm_env,
        imagenette_subset,
        tmp_path,
        "zero",
        "--wait",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        overrides=("strategy=deepspeed", "dist.zero_stage=1", "schedule.epochs=1"),
        SRUN_WAIT="3",
        DIST_BOT_SLOW_END_S="8",
        PYTHONPATH=str(REPO / "tests" / "system" / "slurm" / "slow_end"),
    )
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert done.returncode == 0, f"{done.stderr}\n{log[-3000:]}"
    job = wait_job(done.stdout.strip(), slurm_env, timeout=60)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
    fields = assert_cpus(log, {0: ("0", 1), 1: ("1", 1)})
    assert [fields[r]["local_rank"] for r in (0, 1)] == ["0/2", "1/2"]
    assert "over gloo" in log and "deepspeed" in log
    assert final_val(tmp_path / "zero")["samples"] == 100


@pytest.mark.slow
def test_a_stopped_task_under_the_sbatch_script_is_a_hang_that_ends_the_job(slurm_env, imagenette_subset, tmp_path):
    """SIGSTOP of rank 1 (node2) mid-epoch: rank 0 writes its stacks to the run's hang/ folder and exits 3 within
    dist.hang_timeout_min and seconds; srun ends the stopped task after its --wait (3 s here); the job FAILS
    and is not requeued."""
    hang_min = 0.2  # 12 s: well above the longest gap between beats of these runs (a few seconds)
    job = sbatch_cpu(
        slurm_env,
        imagenette_subset,
        tmp_path,
        "hung",
        overrides=("schedule.epochs=50", f"dist.hang_timeout_min={hang_min}"),
        SRUN_WAIT="3",
    ).stdout.strip()
    wait_for_step(tmp_path / "hung" / "metrics.jsonl", 3)
    log_file = next(tmp_path.glob("*.out"))
    victim = int(startup_fields(log_file.read_text())[1]["pid"])
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    info = wait_job(job, slurm_env, timeout=hang_min * 60 + 150)
    ended = time.monotonic() - stopped
    log = log_file.read_text()
    stacks = (tmp_path / "hung" / "hang" / "rank0.txt").read_text()
    dumped = (tmp_path / "hung" / "hang" / "rank0.txt").stat().st_mtime - (time.time() - ended)
    report(f"sbatch, rank 1 stopped: rank 0's stacks after {dumped:.1f} s, the job ended after {ended:.1f} s")
    # srun reports the worst of its tasks: rank 0's status 3, or the stopped task's SIGKILL (137) from srun
    assert info["JobState"] == "FAILED" and info["ExitCode"].split(":")[0] in ("3", "137"), (info, log[-3000:])
    assert "rank 0: nothing completed for" in stacks and "loop.py" in stacks, stacks[:3000]
    assert "a hang; every process's stacks are in" in log and "task 0: Exited with exit code 3" in log, log[-3000:]
    assert info["Restarts"] == "0" and not alive(victim)


@pytest.mark.slow
def test_a_corrupt_jpeg_under_submitit_ends_every_rank_within_seconds_with_status_2(
    slurm_env, imagenette_subset, tmp_path
):
    """Rank 1's first image is truncated: rank 1 fails at its first step; rank 0, waiting for it in the gradient
    all-reduce, stops too (the failure watch of the CLI's start-up path, which TrainJob now runs): both tasks
    end with status 2 and the error's line, seconds after it, not at the collectives' 30-minute timeout."""
    from test_fatal_errors import with_bad_first_image

    data = with_bad_first_image(imagenette_subset, tmp_path / "data", rank=1, world_size=2)
    t0 = time.monotonic()
    done = run(submitit_cmd(tmp_path, data, "bad", "--nodes", "2", "--wait"), slurm_env)
    took = time.monotonic() - t0
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert done.returncode == 1 and lines[-1]["state"] == "failed", done.stdout + done.stderr[-3000:]
    folder = next(p for p in (tmp_path / "submitit_logs").iterdir() if p.is_dir())  # the job's, %j
    errs = {t: (folder / f"{folder.name}_{t}_log.err").read_text() for t in (0, 1)}
    errors = {t: [x for x in text.splitlines() if x.startswith("dist-bot train: error: ")] for t, text in errs.items()}
    assert len(errors[1]) == 1 and "stopping" not in errors[1][0], errs[1][-3000:]  # rank 1's own error
    assert len(errors[0]) == 1 and "stopping: rank 1 failed" in errors[0][0], errs[0][-3000:]  # as rank 1's
    job = wait_job(folder.name, slurm_env, timeout=60)
    assert job["JobState"] == "FAILED" and job["ExitCode"].startswith("2:"), job
    report(f"submitit, a corrupt JPEG on rank 1: both tasks ended with status 2, the job took {took:.1f} s")
    assert took < 240, took  # start-up and the first step included; the collectives' timeout is 30 minutes


@pytest.mark.slow
def test_doctor_through_the_sbatch_script_on_two_nodes(slurm_env, imagenette_subset, tmp_path):
    """DIST_BOT_COMMAND=doctor: the preflight on the job's 2 nodes x 1 task (2 CPUs each), through the same
    script and start-up path as training: each process's record, with the all-reduce across nodes."""
    done = sbatch_cpu(slurm_env, imagenette_subset, tmp_path, "pre", "--wait", DIST_BOT_COMMAND="doctor")
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert done.returncode == 0, f"{done.stderr}\n{log[-3000:]}"
    doc = json.loads((tmp_path / "pre" / "doctor.json").read_text())
    check_doctor_report(doc, 2)
    assert all("nodes" in p["busbw_gb_s"] and "node" not in p["busbw_gb_s"] for p in doc["processes"])
    assert [p["cpus"] for p in doc["processes"]] == [2, 2]
    assert "all-reduce busbw across nodes" in log and "doctor: " in log
    report_table = log[log.index("status  check") : log.index("doctor: ")]
    report(f"doctor on 2 nodes:\n{report_table}")
