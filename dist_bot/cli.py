"""The `dist-bot` command.

    dist-bot train CONFIG [key=value ...]       train (one process, or every process under torchrun / srun)
    dist-bot eval CONFIG --checkpoint PATH [--ema] [--image-sizes 160,224,288] [key=value ...]   top-1/top-5 on val/
    dist-bot export RUN_OR_CHECKPOINT --format timm|torchvision|onnx --out FILE [--ema]   weights for other tools
    dist-bot predict CHECKPOINT_OR_EXPORT IMAGE ... [--topk 5] [--json]   each image's top classes by name
    dist-bot models [--image-size 224]          every model: parameters and multiply-adds
    dist-bot config CONFIG [key=value ...]      the resolved config of a recipe plus overrides, as YAML
    dist-bot config [CONFIG] --explain          every key: value, default, range, may it change on resume, meaning
    dist-bot data digits OUT_DIR                write the bundled handwritten digits as an ImageFolder
    dist-bot data fake OUT_DIR [--images 2000]  random JPEGs of ImageNet's size, for loader and GPU benchmarks
    dist-bot data check DIR [--workers N]       scan a dataset or pack for unreadable files, empty classes, leakage
    dist-bot data pack SRC DST [--shard-size 1GB]  a folder dataset as tar shards (WebDataset layout) + index
    dist-bot data imagenet TRAIN_TAR VAL_TAR DEVKIT DST  a pack straight from ImageNet's official archives
    dist-bot data archives SRC OUT_DIR          a WNID-named folder dataset as ImageNet's archives (to try the above)
    dist-bot bench data CONFIG [key=value ...]  images/s of each data loader, side by side (JSON lines)
    dist-bot bench train [CONFIG] [key=value ...]  training step vs a bare PyTorch loop (and fed by data.path)
    dist-bot doctor CONFIG [key=value ...] [--out FILE]  a preflight of every process: CPUs, disk, data, network
    dist-bot report RUN_DIR [RUN_DIR ...]       PNG plots of loss, lr, img/s, top-1; a table for several runs

Bad input (an unknown key, a wrongly typed value, an unknown model, an unreadable image) ends with one line on
stderr that names the problem and the fix, and exit status 2, like argparse's own usage errors. On any process
of a run it ends every process within seconds, each with status 2 and that line (see process_group).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from dist_bot import __version__
from dist_bot.config import explain, load_config, to_yaml
from dist_bot.errors import ConfigError, UserError


def cmd_models(args: argparse.Namespace) -> int:
    from dist_bot.models.profile import model_table  # imports torch: only for the commands that need it

    print(model_table(image_size=args.image_size, num_classes=args.num_classes))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config, overrides = args.config, args.overrides
    if config is not None and "=" in config:  # `dist-bot config key=value ...`: the defaults
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    sys.stdout.write(explain(cfg) + "\n" if args.explain else to_yaml(cfg))
    return 0


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def cpu_list(cpus) -> str:
    """{0, 1, 2, 5, 7, 8} -> '0-2,5,7-8', as taskset and Slurm write CPU lists."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def set_up_process(cfg, env) -> str:
    """This process's CPU threads, and the start-up line every process of a launched job writes to stderr (a plain
    process logs it): where it runs and what it may use, so that a job starved of CPUs (srun without -c) shows it
    in its first lines, not days later."""
    import socket

    import torch

    from dist_bot.data.loader import cpus_per_process, dali_py_workers, dataloader_workers, decode_workers

    cpus = cpus_per_process(env)
    # A launched process's threads follow the CPUs it was given (the launcher's OMP_NUM_THREADS wins: torchrun sets
    # 1). A plain process keeps torch's default, its affinity, and its environment: dist_bot.cli.main called
    # from Python must not change the caller's environment, which later child processes would inherit.
    if env.source != "single" and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(cpus)
        torch.set_num_threads(cpus)
    fields = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "rank": f"{env.rank}/{env.world_size}",
        "local_rank": f"{env.local_rank}/{env.local_world_size}",
        "launcher": env.source,
        "device": str(env.device),
        "cpus": cpus,
        "affinity": cpu_list(os.sched_getaffinity(0)),
        "dali_threads": decode_workers(cfg, env),
        "dali_py_workers": dali_py_workers(cfg, env),
        "dataloader_workers": dataloader_workers(cfg, env),
        "omp_threads": torch.get_num_threads(),
    }
    line = "start-up: " + " ".join(f"{k}={v}" for k, v in fields.items())
    if env.source == "single":  # a plain process: a log line (its stderr holds one line for bad input, no more)
        logging.getLogger("dist_bot.cli").info(line)
    else:  # one write: the lines of several processes sharing a log do not interleave
        sys.stderr.write(f"[rank {env.rank}] {line}\n")
        sys.stderr.flush()
    return line


@contextlib.contextmanager
def process_group(cfg, command: str, watch_hangs: bool = False):
    """This process's DistEnv, in the run's process group, left at the end: the one start-up path of every
    launcher (torchrun, srun and the sbatch scripts, submitit's TrainJob, a plain process).

    A fatal error on any process ends them all within seconds, each with that error (see FailureWatch): an error
    here that another process's failure caused (a collective that lost its peer) is reported as that failure;
    an error of this process's own is announced, so that the others stop now, not at the process group's
    timeout. With ``watch_hangs`` (training), a hang ends them all too, each writing its stacks to <run>/hang/
    (see dist_bot/distributed/watchdog.py)."""
    import threading
    from pathlib import Path

    from dist_bot.distributed.env import FailureWatch, init_distributed, shutdown
    from dist_bot.distributed.watchdog import HANG_EXIT_CODE, HANG_MARK, HangWatch, dump_stacks, flight_recorder_env
    from dist_bot.train import Preempted

    hang_dir = Path(cfg.run.out_dir) / str(cfg.run.name) / "hang"
    if watch_hangs:
        flight_recorder_env(hang_dir)  # before NCCL's process group is made
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_min)
    setup_logging(env.rank)
    set_up_process(cfg, env)

    hung_here = threading.Event()  # this process announced the hang: its own announcement, read back, is not news

    def on_message(message: str) -> None:  # another process announced a hang: dump here too, and end
        if message.startswith(HANG_MARK) and not hung_here.is_set():
            dump_stacks(hang_dir, env.rank, f"stopping: {message.removeprefix(HANG_MARK)}")
            exit_now(command, f"stopping: {message.removeprefix(HANG_MARK)}", HANG_EXIT_CODE)

    def on_hang(why: str) -> None:  # this process saw nothing complete for dist.hang_timeout_min
        hung_here.set()
        dump_stacks(hang_dir, env.rank, why)
        message = f"{why}: a hang; every process's stacks are in {hang_dir}"
        watch.announce_text(HANG_MARK + message)
        exit_now(command, message, HANG_EXIT_CODE)

    watch = FailureWatch(env, on_peer_failure=lambda message: exit_now(command, message), on_message=on_message)
    hang = HangWatch(cfg.dist.hang_timeout_min * 60 if watch_hangs else 0, env.rank, on_hang)
    finished = False  # no exception here: every process ends together (see shutdown)
    try:
        yield env
    except Preempted:  # all processes stop together, at a checkpoint: nothing failed
        raise
    except Exception as e:
        peer = None if isinstance(e, UserError) else watch.peer_failure()
        if peer is not None:
            raise peer from None
        watch.announce(e)
        raise
    else:
        finished = True
    finally:
        hang.close()
        watch.close()
        shutdown(finished)


def exit_now(command: str, message: str, status: int = 2) -> None:
    """Print the error and end this process at once (from any thread: this one may be blocked in a collective).
    Its loaders' workers end with it (see dist_bot/signals.py)."""
    sys.stdout.flush()
    # one write for the whole line: print() writes the text and its newline apart, so the same error from several
    # processes sharing a stderr could interleave into one line
    sys.stderr.write(f"dist-bot {command}: error: {message}\n")
    sys.stderr.flush()
    os._exit(status)


def train(config: str | None, overrides: list[str], command: str = "train") -> dict:
    """A training run, started the same way whatever launched the process (`dist-bot train` under torchrun or
    srun, the sbatch scripts, submitit's TrainJob): the preemption handlers first, the config, the process group
    (with its failure and hang watches), the Trainer. Returns the run folder, the last step and the final
    evaluation; raises Preempted when the run stopped at a checkpoint to be requeued, UserError for bad input."""
    from dist_bot.signals import PREEMPTION

    # First, before torch is imported: a preemption signal during start-up is then a requeue (status 75, the
    # Trainer acts on it at its first agreement), not a death by signal that no launcher requeues.
    installed = PREEMPTION.install()
    try:
        from dist_bot.export import export_for_tracking
        from dist_bot.models import parse_name
        from dist_bot.train import Trainer

        cfg = load_config(config, overrides)
        parse_name(cfg.model.name)  # an unknown model is reported now, before any process group or data scan
        with process_group(cfg, command, watch_hangs=True) as env:
            trainer = Trainer(cfg, env)
            result = trainer.fit(export_model=export_for_tracking)
            return {"run_dir": str(trainer.run_dir), "global_step": trainer.global_step} | result
    finally:
        if installed:
            PREEMPTION.restore()  # last: after the tracker and the process group are closed


def cmd_train(args: argparse.Namespace) -> int:
    try:
        train(args.config, args.overrides, args.command)
    except Exception as stop:
        from dist_bot.train import REQUEUE_EXIT_CODE, Preempted  # here: train() imports torch after its handlers

        if not isinstance(stop, Preempted):
            raise
        if os.environ.get("RANK", "0") == "0":  # exported by the start-up path for every launcher
            print(f"{stop}; exiting with status {REQUEUE_EXIT_CODE} so the launcher requeues", flush=True)
        return REQUEUE_EXIT_CODE
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from dist_bot.checkpoint import load_checkpoint, resolve_checkpoint
    from dist_bot.data import make_loaders
    from dist_bot.data.loader import val_size
    from dist_bot.models import build_model
    from dist_bot.train import evaluate

    if any(o.startswith("checkpoint=") for o in args.overrides):
        raise ConfigError("checkpoint=PATH is now an option: dist-bot eval CONFIG --checkpoint PATH")
    if args.checkpoint is None:
        raise ConfigError("dist-bot eval needs --checkpoint PATH: a checkpoint folder, or a run folder")
    sizes = parse_sizes(args.image_sizes) if args.image_sizes else [None]
    cfg = load_config(args.config, args.overrides)
    path = resolve_checkpoint(args.checkpoint)
    with process_group(cfg, args.command) as env:
        state = load_checkpoint(path, ema=args.ema)
        model = None
        for size in sizes:  # each its own validation loader (the crop and the resize before it follow the size)
            size_cfg = (
                cfg if size is None else load_config(args.config, [*args.overrides, f"data.val_image_size={size}"])
            )
            _, val = make_loaders(size_cfg, env)
            try:
                if model is None:
                    check_classes(state, val)
                    model = build_model(state["model_name"], state["num_classes"]).to(env.device)
                    model.load_state_dict(state["model"])
                    if cfg.model.channels_last:
                        model = model.to(memory_format=torch.channels_last)
                result = evaluate(model, val, env, cfg.precision)
            finally:
                val.close()  # its workers end now, whatever happened (see Trainer.fit)
            if env.is_main:
                weights = "ema" if args.ema else "raw"
                record = {
                    "split": "val",
                    "checkpoint": str(path),
                    "weights": weights,
                    "image_size": val_size(size_cfg.data),
                }
                print(json.dumps(record | result), flush=True)
    return 0


def parse_sizes(text: str) -> list[int]:
    """--image-sizes 160,192,224 -> [160, 192, 224]."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--image-sizes {text}: give sizes in pixels separated by commas, e.g. 160,192,224,256")
    return sizes


def check_classes(state: dict, val) -> None:
    """The checkpoint's classes are the data's, in the same order: else its labels would be scored against others."""
    if state["num_classes"] != val.num_classes:
        raise ConfigError(f"the checkpoint predicts {state['num_classes']} classes, the data has {val.num_classes}")
    trained, here = state.get("class_names"), getattr(val, "class_names", None)
    if trained is not None and here is not None and list(trained) != here:
        wrong = next(i for i, (a, b) in enumerate(zip(trained, here, strict=True)) if a != b)
        raise ConfigError(
            f"the checkpoint's class {wrong} is {trained[wrong]!r}, the data's is {here[wrong]!r}: its labels "
            "would be scored against other classes. Evaluate on data with the training set's class folders"
        )


def cmd_export(args: argparse.Namespace) -> int:
    from dist_bot.export import export_checkpoint

    print(json.dumps(export_checkpoint(args.source, args.format, args.out, ema=args.ema)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dist_bot.predict import load_predictor, predict_files

    if args.topk < 1 or args.batch_size < 1:
        raise ConfigError(f"--topk and --batch-size must be at least 1, got {args.topk} and {args.batch_size}")
    predictor = load_predictor(args.source, ema=args.ema)
    words = predictor.info.get("class_descriptions") or {}  # e.g. ImageNet's for its WNIDs
    failed = 0
    for path, result in predict_files(predictor, args.images, args.topk, args.batch_size):
        if isinstance(result, Exception):
            failed += 1
            print(f"dist-bot predict: {result}", file=sys.stderr, flush=True)
        elif args.json:
            top = [{"class": c, "prob": p} | ({"description": words[c]} if c in words else {}) for c, p in result]
            print(json.dumps({"image": path, "top": top}), flush=True)
        else:
            lines = (f"\n  {p:.4f}  {c}" + (f"  {words[c]}" if c in words else "") for c, p in result)
            print(path + "".join(lines), flush=True)
    if failed:
        print(f"dist-bot predict: {failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def cmd_data_digits(args: argparse.Namespace) -> int:
    from dist_bot.datasets import write_digits

    counts = write_digits(args.out_dir, size=args.size)
    print(json.dumps({"dataset": "digits", "path": args.out_dir, **counts}))
    return 0


def cmd_data_fake(args: argparse.Namespace) -> int:
    from dist_bot.datasets import write_fake_jpegs

    width, _, height = args.size.partition("x")
    counts = write_fake_jpegs(
        args.out_dir, args.images, int(width), int(height), args.classes, imagenet_sizes=args.imagenet_sizes
    )
    print(json.dumps({"dataset": "fake", "path": args.out_dir, **counts}))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from dist_bot.data.check import check_dataset

    report = check_dataset(args.dir, workers=args.workers)
    print(json.dumps(report.to_dict()) if args.json else report.to_text())
    return 0 if report.ok else 1


def parse_size(text: str) -> int:
    """Bytes of '1GB', '512MB', '1GiB' or a plain number; argparse reports a ValueError as a usage error."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    t = text.strip().lower().removesuffix("b")
    number = t.rstrip("kmgti")
    if not number or t[len(number) :] not in units:
        raise ValueError(text)
    return int(float(number) * units[t[len(number) :]])


def cmd_data_pack(args: argparse.Namespace) -> int:
    from dist_bot.data.pack import write_pack

    return report_pack(write_pack(args.src, args.dst, shard_size=args.shard_size, workers=args.workers))


def cmd_data_imagenet(args: argparse.Namespace) -> int:
    from dist_bot.data.imagenet import write_imagenet_pack

    summary = write_imagenet_pack(
        args.train_tar, args.val_tar, args.devkit, args.dst, shard_size=args.shard_size, workers=args.workers
    )
    return report_pack(summary)


def report_pack(summary) -> int:
    """A pack's bad files on stderr, one line each, and its summary as one JSON line."""
    for path, error in summary.bad:
        print(f"not packed: {path}: {error}", file=sys.stderr)
    record = {
        "pack": summary.dst,
        "samples": summary.samples,
        "shards": summary.shards,
        "bad_files": len(summary.bad),
        "resumed_shards": summary.resumed_shards,
        "seconds": round(summary.seconds, 1),
    }
    print(json.dumps(record | summary.rates()))
    return 0


def cmd_data_archives(args: argparse.Namespace) -> int:
    from dist_bot.datasets import write_ilsvrc_archives

    print(json.dumps(write_ilsvrc_archives(args.src, args.out_dir)))
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from dist_bot.bench import bench_data

    for record in bench_data(
        load_config(args.config, args.overrides), args.loaders.split(","), args.batches, args.repeats
    ):
        print(json.dumps(record), flush=True)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from dist_bot.bench import bench_train

    config, overrides = args.config, args.overrides
    if config is not None and "=" in config:  # `dist-bot bench train key=value ...`: the defaults
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    with process_group(cfg, args.command) as env:
        sides = tuple(args.sides.split(",")) if args.sides else None
        for record in bench_train(cfg, env, args.steps, args.warmup, args.repeats, args.timm, sides):
            if env.is_main:
                print(json.dumps(record), flush=True)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dist_bot.doctor import run_doctor

    cfg = load_config(args.config, args.overrides)
    with process_group(cfg, args.command) as env:
        return run_doctor(cfg, env, Path(args.out) if args.out else None)


def cmd_report(args: argparse.Namespace) -> int:
    from dist_bot.report import report

    png, table = report(args.run_dirs, args.out)
    print(table)
    print(f"\nplots: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-bot", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"dist-bot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe (under torchrun/srun: every process runs this)")
    p.add_argument("config", help="recipe YAML, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.path=/data")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation set")
    p.add_argument("config", help="recipe YAML giving the data and precision")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.path=/data")
    # required, but checked in cmd_eval: the old form checkpoint=PATH gets a message saying what replaced it
    p.add_argument("--checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint); required")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (ema.pt) instead of the raw ones")
    p.add_argument(
        "--image-sizes", help="evaluate at each of these center crops, a JSON line each (e.g. 160,192,224,256)"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="a checkpoint's weights as timm safetensors, a torchvision state dict, or ONNX")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run folder (its newest checkpoint) or checkpoint")
    p.add_argument("--format", required=True, choices=("timm", "torchvision", "onnx"), help="the file to write")
    p.add_argument("--out", required=True, help="FILE.safetensors (timm), FILE.pth (torchvision), FILE.onnx")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (ema.pt) instead of the raw ones")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="each image's top classes by name, from a checkpoint or an export")
    p.add_argument("source", metavar="CHECKPOINT_OR_EXPORT", help="run or checkpoint folder, or an exported file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--ema", action="store_true", help="a checkpoint's EMA weights (ema.pt) instead of the raw ones")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="make demo datasets, check or pack a dataset (from folders or ImageNet's archives)")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    d = dsub.add_parser("digits", help="scikit-learn's handwritten digits as JPEG class folders (train/ and val/)")
    d.add_argument("out_dir", help="new folder to write")
    d.add_argument("--size", type=int, default=32, help="image size in pixels (default 32)")
    d.set_defaults(func=cmd_data_digits)
    d = dsub.add_parser("fake", help="random JPEGs of ImageNet's typical size in class folders (train/ and val/)")
    d.add_argument("out_dir", help="new folder to write")
    d.add_argument("--images", type=int, default=2000, help="images in all (default 2000, 10%% of them in val/)")
    d.add_argument("--size", default="500x375", help="WIDTHxHEIGHT in pixels (default 500x375, ImageNet's typical)")
    d.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    d.add_argument(
        "--imagenet-sizes",
        action="store_true",
        help="ImageNet's spread instead of one size: most sides 300-500 px, ~3%% 1,000-2,500 px, ~2%% grayscale, "
        "a few CMYK",
    )
    d.set_defaults(func=cmd_data_fake)
    d = dsub.add_parser("check", help="scan train/ and val/: counts, unreadable files, empty classes, leakage")
    d.add_argument("dir", help="dataset folder holding train/ and val/, or a pack (dist-bot data pack)")
    d.add_argument("--workers", type=int, default=8, help="parallel readers (default 8)")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d.set_defaults(func=cmd_data_check)
    d = dsub.add_parser("pack", help="a folder dataset as tar shards + an index; bad images reported, not packed")
    d.add_argument("src", help="dataset folder holding train/ and val/ (ImageNet layout)")
    d.add_argument("dst", help="new folder for the pack (or an unfinished pack of SRC, to finish it)")
    d.add_argument("--shard-size", type=parse_size, default="1GB", help="bytes per shard, e.g. 1GB (default), 256MB")
    d.add_argument("--workers", type=int, default=8, help="parallel readers and decoders (default 8)")
    d.set_defaults(func=cmd_data_pack)
    d = dsub.add_parser(
        "imagenet", help="a pack straight from ImageNet's official archives (ILSVRC2012), nothing extracted to disk"
    )
    d.add_argument("train_tar", help="ILSVRC2012_img_train.tar (one tar per synset)")
    d.add_argument("val_tar", help="ILSVRC2012_img_val.tar (50,000 JPEGs, flat)")
    d.add_argument("devkit", help="ILSVRC2012_devkit_t12.tar.gz (meta.mat, the val ground truth)")
    d.add_argument("dst", help="new folder for the pack (or an unfinished one of these archives, to finish it)")
    d.add_argument("--shard-size", type=parse_size, default="1GB", help="bytes per shard, e.g. 1GB (default), 256MB")
    d.add_argument("--workers", type=int, default=8, help="parallel readers and decoders (default 8)")
    d.set_defaults(func=cmd_data_imagenet)
    d = dsub.add_parser(
        "archives", help="a folder dataset named by WNIDs as ImageNet's three archives (to try `data imagenet`)"
    )
    d.add_argument("src", help="dataset folder holding train/ and val/, class folders named by WNID")
    d.add_argument("out_dir", help="new folder for ILSVRC2012_img_train.tar, _img_val.tar and _devkit_t12.tar.gz")
    d.set_defaults(func=cmd_data_archives)

    p = sub.add_parser("bench", help="benchmarks (JSON lines)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    b = bsub.add_parser("data", help="images/s of each data loader over the same batches, side by side")
    b.add_argument("config", help="recipe YAML (data.path, image size, batch size, workers)")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.image_size=224")
    b.add_argument(
        "--loaders",
        default="dali,torch",
        help="comma-separated loaders, each a name or name@key=value@..., e.g. dali@data.dali_py_workers=0,dali,torch "
        "(default dali,torch)",
    )
    b.add_argument("--batches", type=int, default=20, help="timed batches per run, after 3 warm-up (default 20)")
    b.add_argument("--repeats", type=int, default=3, help="runs per loader; the median is reported (default 3)")
    b.set_defaults(func=cmd_bench_data)
    b = bsub.add_parser(
        "train",
        help="images/s of dist_bot's training step and of a bare PyTorch loop doing the same work, and their ratio",
    )
    b.add_argument("config", nargs="?", help="recipe YAML (optional: the defaults, i.e. resnet50d at 224 px)")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. precision=bf16 data.batch_size=32")
    b.add_argument("--steps", type=int, default=20, help="optimizer steps per timed block (default 20)")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps per side before the first block (default 5)")
    b.add_argument("--repeats", type=int, default=3, help="timed blocks per side, alternating (default 3)")
    b.add_argument("--timm", action="store_true", help="also time timm's model of the same name in the bare loop")
    b.add_argument(
        "--sides",
        help="comma-separated sides to time: synthetic, data (the loader of data.loader), bare, timm (default: all "
        "that apply); time data alone to keep other sides from giving its loader time to refill",
    )
    b.set_defaults(func=cmd_bench_train)

    p = sub.add_parser(
        "doctor",
        help="a preflight before a long run, started like training (every process): CPUs, disk, data, network, W&B",
    )
    p.add_argument("config", help="the recipe the run will use, e.g. configs/resnet50d_bs1024.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the run's overrides, e.g. data.path=/data")
    p.add_argument("--out", help="JSON report to write (default: doctor.json in the run folder)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("report", help="PNG plots and a table of one or more runs, from their metrics.jsonl")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (<run.out_dir>/<run.name>)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/report.png for one run, ./report.png for several)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("models", help="list every model with its parameters and multiply-adds")
    p.add_argument("--image-size", type=int, default=224, help="input resolution in pixels (default 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="width of the classifier (default 1000)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("config", help="print the resolved config of a recipe and overrides as YAML")
    p.add_argument("config", nargs="?", help="recipe YAML or bundled name, e.g. resnet50d_bs1024 (default: none)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. schedule.epochs=90")
    p.add_argument(
        "--explain", action="store_true", help="a table instead: each key's value, default, range, resume rule, doc"
    )
    p.set_defaults(func=cmd_config)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, with key=value overrides allowed after options too (`dist-bot eval CONFIG --checkpoint RUN
    data.path=...`): argparse ends a positional ``nargs="*"`` at the first option and would refuse the rest."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        sys.stderr.write(f"dist-bot {args.command}: error: {e}\n")  # one write: see exit_now
        return 2
