"""Submit dist_bot training runs to Slurm with submitit: one task per GPU, requeue on preemption, sweeps as arrays.

    python -m launch.submit CONFIG [key=value ...] --nodes N --gpus-per-node G [--partition P] [--account A]
                            [--time 2-00:00:00] [--name NAME] [--sweep key=v1,v2,...] [--wait]

    # the paper's efficient ResNet-50-D on 4 nodes x 8 GPUs (global batch stays 1024: 32 per GPU)
    python -m launch.submit configs/resnet50d_bs1024.yaml data.path=/datasets/imagenet --nodes 4 --partition gpu
    # one job per value, submitted as one job array (several --sweep flags: every combination)
    python -m launch.submit configs/resnet50d_bs1024.yaml --sweep optim.base_lr_per_256=0.1,0.2 --nodes 1
    # a sweep over recipes (e.g. the ablation ladder): the key `config` replaces CONFIG
    python -m launch.submit configs/resnet50d_bs1024.yaml --sweep config=configs/a.yaml,configs/b.yaml
    # the preflight on the nodes and CPUs the job will get (its report: doctor.json in the run folder)
    python -m launch.submit configs/resnet50d_bs1024.yaml data.path=/datasets/imagenet --nodes 4 --doctor --wait
    # no Slurm: the same job as local processes (--gpus-per-node 0 --tasks-per-node 2 for 2 CPU processes)
    python -m launch.submit configs/demo.yaml --cluster local --gpus-per-node 0 --tasks-per-node 2 --wait

Every job is a `TrainJob` (a submitit Checkpointable). Slurm sends it SIGUSR2 `--signal-delay-s` seconds before
the time limit (and on preemption, with PreemptParameters=send_user_signal, or `job._interrupt()`): every rank
finishes its step, the ranks write one checkpoint together, and rank 0 hands over to submitit, which requeues
the job. The requeued job runs the same call, which resumes the run folder's latest checkpoint: same step,
same schedule, same W&B run (its id is in the checkpoint). A plain SIGTERM (scancel, or Slurm preempting
without the user signal) also checkpoints, then leaves the requeue to Slurm.

Configs are loaded and checked here, before anything is queued: a typo fails now, not hours later.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from dist_bot.config import find_recipe, load_config
from dist_bot.errors import UserError

log = logging.getLogger("launch.submit")


@dataclass
class RunSpec:
    """One training run: the recipe, its overrides, and the run name derived from the sweep point."""

    config: str
    overrides: list[str]
    name: str
    sweep: dict[str, str] = field(default_factory=dict)


def split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside [...] stay (`schedule.step_milestones=[30,60],[40,80]`)."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    values.append(cur)
    if any(not v.strip() for v in values) or depth:
        raise UserError(f"--sweep value list {text!r} has an empty value or unbalanced brackets")
    return [v.strip() for v in values]


def parse_sweeps(sweeps: list[str]) -> list[dict[str, str]]:
    """`--sweep a=1,2 --sweep b=x,y` -> every combination, in order: [{a:1,b:x}, {a:1,b:y}, {a:2,b:x}, ...]."""
    axes = []
    for s in sweeps:
        key, eq, values = s.partition("=")
        if not eq or not key:
            raise UserError(f"--sweep {s!r} is not key=v1,v2,...: e.g. --sweep optim.base_lr_per_256=0.1,0.2")
        if key in (k for k, _ in axes):
            raise UserError(f"--sweep names {key!r} twice: give all its values in one --sweep")
        axes.append((key, split_values(values)))
    return [dict(zip([k for k, _ in axes], combo, strict=True)) for combo in itertools.product(*[v for _, v in axes])]


def _slug(key: str, value: str) -> str:
    short = Path(value).stem if key == "config" else f"{key.split('.')[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", short)


def plan_runs(config: str, overrides: list[str], name: str, sweeps: list[str]) -> list[RunSpec]:
    """The runs to submit; each config is loaded (and so checked) here. Paths become absolute for the job."""
    points = parse_sweeps(sweeps) if sweeps else [{}]
    specs = []
    for point in points:
        recipe = point.get("config", config)
        extra = [f"{k}={v}" for k, v in point.items() if k != "config"]
        run_name = name if not point else f"{name}-{','.join(_slug(k, v) for k, v in point.items())}"
        specs.append(RunSpec(str(find_recipe(recipe).resolve()), [*overrides, *extra], run_name, point))
    if len({s.name for s in specs}) != len(specs):
        raise UserError("two sweep points give the same run name: make the swept values distinct")
    for spec in specs:
        spec.overrides = _resolved_overrides(spec, group=name if sweeps else None)
    return specs


def _resolved_overrides(spec: RunSpec, group: str | None) -> list[str]:
    """Pin what the job must see as at submission: run name, absolute out_dir and data.path, the W&B group."""
    cfg = load_config(spec.config, [*spec.overrides, f"run.name={spec.name}"])
    out = [*spec.overrides, f"run.name={spec.name}", f"run.out_dir={Path(cfg.run.out_dir).resolve()}"]
    if cfg.data.path and not Path(cfg.data.path).is_absolute():
        out.append(f"data.path={Path(cfg.data.path).resolve()}")
    if group and cfg.wandb.group is None:
        out.append(f"wandb.group={group}")  # a sweep's runs side by side in W&B
    load_config(spec.config, out)  # the exact call the job will make
    return out


def exit_2_after(error: BaseException) -> None:
    """Bad input (dist_bot's UserError) in a job: the CLI's one line now, and status 2 for the task once submitit
    has recorded the error for `job.results()` (it re-raises it; Python would exit with 1). An exit handler, not
    sys.excepthook, which W&B replaces."""
    sys.stdout.flush()
    sys.stderr.write(f"dist-bot train: error: {error}\n")
    sys.stderr.flush()

    def exit_2() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)

    atexit.register(exit_2)


class TrainJob(submitit.helpers.Checkpointable):
    """One dist_bot run as a submitit job. A requeued job makes the same call and resumes the latest checkpoint.

    `checkpoint()` (submitit calls it on rank 0 when requeueing) is Checkpointable's: resubmit the same call.
    The training state itself was already written by all ranks together (see `__call__`), which submitit's
    handler, running on rank 0 alone, could not do for sharded strategies.
    """

    def __init__(self, sigterm_wait_s: float = 120.0):
        self.sigterm_wait_s = sigterm_wait_s

    def __call__(self, config: str, overrides: list[str]) -> dict:
        from dist_bot.cli import train
        from dist_bot.train import Preempted

        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the job; every GPU stays visible, picked by LOCAL_RANK
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        try:  # the CLI's start-up path: process group, failure and hang watches, threads, the start-up line
            return train(config, overrides)
        except Preempted as stop:
            return self._after_stop(stop, int(os.environ["RANK"]))
        except UserError as e:
            exit_2_after(e)
            raise

    def _after_stop(self, stop, rank: int) -> dict:
        usr = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        if usr in stop.signals:
            if rank == 0:  # submitit's own handler: checkpoint() -> requeue -> exit
                log.warning("%s: requeueing through submitit", stop)
                try:
                    signal.getsignal(usr)(usr, None)
                except subprocess.CalledProcessError as e:
                    if list(e.cmd[:2]) != ["scontrol", "requeue"] or e.returncode != -signal.SIGTERM:
                        raise
                    # The requeue took: Slurm ended this attempt, scontrol (a process of the job) included, before
                    # scontrol returned. submitit would record that as the job's error, and `job.results()` would
                    # report a failure while the requeued job runs; exit as submitit does after a requeue instead.
                    log.warning("job requeued (scontrol ended by the requeue's SIGTERM): exiting this attempt")
                    sys.exit(-1)
            return {"preempted_at_step": stop.step}
        if signal.SIGTERM in stop.signals:
            # Slurm ends (or requeues) the job itself after a SIGTERM; a user signal may still follow.
            log.warning("%s: waiting up to %.0f s for Slurm to end or requeue the job", stop, self.sigterm_wait_s)
            time.sleep(self.sigterm_wait_s)
        raise RuntimeError(f"{stop}, and the job was not requeued: submit the same command again to resume")


class DoctorJob:
    """`dist-bot doctor` as a submitit job: the preflight on the nodes, tasks and CPUs a TrainJob would get, through
    the same start-up path; its result is the exit status (1: something would make the run fail)."""

    def __call__(self, config: str, overrides: list[str]) -> int:
        from dist_bot.cli import main

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return main(["doctor", config, *overrides])


def make_executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_timeouts)
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    cpus = args.cpus_per_task or (8 if args.gpus_per_node else 1)
    params = {
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": cpus,
        "timeout_min": args.time_min,
        "name": args.job_name,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if executor.cluster == "slurm":
        params |= {
            "slurm_signal_delay_s": args.signal_delay_s,
            "slurm_array_parallelism": args.array_parallelism,
            # since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task, and submitit's srun line does not
            # pass it: on a cluster binding tasks to CPUs each task would get one
            "slurm_srun_args": ["--cpus-per-task", str(cpus)],
        }
        for opt in ("partition", "account", "qos", "constraint"):
            if getattr(args, opt):
                params[f"slurm_{opt}"] = getattr(args, opt)
        if args.setup:
            params["slurm_setup"] = args.setup
    executor.update_parameters(**params)
    return executor


def _minutes(text: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    parts = [int(x) for x in m.group(2).split(":")]
    if m.group(1):  # D-HH[:MM[:SS]]
        h, mi, s = [*parts, 0, 0][:3]
        h += 24 * int(m.group(1))
    else:
        h, mi, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return h * 60 + mi + (s > 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="recipe YAML (configs/...)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one task each (0: CPU jobs)")
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per process (default 8 with GPUs, else 1)")
    p.add_argument("--mem-gb", type=int, help="memory per node in GB (default: the partition's)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--qos", help="Slurm QOS")
    p.add_argument("--constraint", help="Slurm node constraint, e.g. h100")
    p.add_argument("--setup", action="append", default=[], help="shell line run before the job (repeatable)")
    p.add_argument("--time", dest="time_min", type=_minutes, default=2 * 1440, help="time limit (default 2-00:00:00)")
    p.add_argument("--signal-delay-s", type=int, default=180, help="SIGUSR2 this long before the time limit")
    p.add_argument("--max-timeouts", type=int, default=30, help="requeues after a time limit before giving up")
    p.add_argument("--array-parallelism", type=int, default=64, help="sweep jobs running at once")
    p.add_argument("--sweep", action="append", default=[], help="key=v1,v2,... one job per value (repeatable)")
    p.add_argument("--name", help="run name (default: the recipe's file name and the time); sweeps add the point")
    p.add_argument("--job-name", default="dist_bot", help="Slurm job name")
    p.add_argument("--folder", help="submitit's logs and pickles (default: RUN.out_dir/submitit_logs/%%j)")
    p.add_argument("--cluster", choices=["slurm", "local"], help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and print each result as a JSON line")
    p.add_argument("--dry-run", action="store_true", help="print the runs that would be submitted, submit nothing")
    p.add_argument(
        "--doctor",
        action="store_true",
        help="submit `dist-bot doctor` (the preflight: CPUs, disk, data, network) with these settings, not training",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.nodes < 1 or args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
            raise UserError("--nodes and --tasks-per-node must be >= 1, --gpus-per-node >= 0")
        name = args.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        runs = plan_runs(args.config, args.overrides, name, args.sweep)
    except (UserError, OSError) as e:
        print(f"launch.submit: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for r in runs:
            print(json.dumps({"name": r.name, "sweep": r.sweep, "config": r.config, "overrides": r.overrides}))
        return 0
    out_dir = Path(load_config(runs[0].config, runs[0].overrides).run.out_dir)
    folder = Path(args.folder) if args.folder else out_dir / "submitit_logs" / "%j"
    executor = make_executor(args, folder)
    job = DoctorJob() if args.doctor else TrainJob()
    with executor.batch():  # one job array on Slurm, however many runs
        jobs = [executor.submit(job, r.config, r.overrides) for r in runs]
    for r, j in zip(runs, jobs, strict=True):
        logs = str(j.paths.stdout).replace("%t", "0")
        print(json.dumps({"job_id": j.job_id, "name": r.name, "run_dir": str(out_dir / r.name), "logs": logs}))
    sys.stdout.flush()
    if not args.wait:
        return 0
    failed = 0
    for r, j in zip(runs, jobs, strict=True):
        try:
            result = j.results()[0]
            state = "failed" if args.doctor and result != 0 else "done"  # the doctor's status: 1 when a check failed
            failed += state == "failed"
            print(json.dumps({"job_id": j.job_id, "name": r.name, "state": state, "result": result}))
        except Exception as e:  # submitit re-raises the job's error with its traceback; report and go on
            failed += 1
            print(json.dumps({"job_id": j.job_id, "name": r.name, "state": "failed", "error": str(e)[-2000:]}))
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
