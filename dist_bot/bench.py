"""Benchmarks that print numbers: medians over repeated runs, alternatives side by side in one run."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .config import Config, compile_options
from .data import make_loaders
from .data.loader import over_epochs
from .data.synthetic import SyntheticLoader
from .distributed.env import DistEnv, local_peak_memory_mb
from .distributed.strategy import DTYPES, make_grad_scaler
from .errors import UserError
from .models import build_model
from .models.interop import timm_twin
from .recipe.sgd import make_sgd
from .train import Trainer


def bench_data(cfg: Config, loaders: list[str], batches: int = 20, repeats: int = 3, warmup: int = 3):
    """Training-loader throughput (decode + augmentation + transfer to the device) and the training thread's CPU
    time per batch, one record per loader variant: a loader's name, or ``name@key=value@key=value`` (e.g.
    ``dali@data.dali_py_workers=0``), on the training device (cuda:0 when there is one, else the CPU).

    Each repeat times ``batches`` batches after ``warmup`` batches, from a fresh epoch iterator (so DALI's
    pipeline build and DataLoader worker start-up stay outside the timing). Runs alternate between variants
    so that a noisy neighbour hurts them alike; the median over repeats is reported. ``main_thread_ms`` is the
    training thread's CPU time per batch (``time.thread_time`` around the timed ``next()`` calls): what the
    loader takes from the thread that must also keep the GPU fed.

    ``data.path`` may differ between variants (``torch@data.path=/packs/imagenette``): each record says whether
    it read a ``folder`` or a ``pack``, its training files, and ``files_opened_per_epoch``: one per image for a
    folder; for a pack, the shards its reading processes open in a first epoch of the plan (later epochs reuse
    them: shards.opens_per_epoch).
    """
    import os
    import platform

    from .config import from_dict, parse_override

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = DistEnv(device=device)
    built = {}
    for spec in loaders:
        name, *overrides = spec.split("@")
        data = dataclasses.asdict(cfg)
        for key, value in map(parse_override, [f"data.loader={name}", *overrides]):
            *sections, leaf = key.split(".")
            node = data
            for part in sections:
                node = node[part]
            node[leaf] = value
        built[spec] = make_loaders(from_dict(data), env)[0]
    rates: dict[str, list[float]] = {spec: [] for spec in loaders}
    thread_ms: dict[str, list[float]] = {spec: [] for spec in loaders}
    for rep in range(repeats):
        for spec, loader in built.items():
            it = over_epochs(loader, rep * 1000)  # a small dataset's epoch may be shorter than a run
            for _ in range(warmup):
                next(it)
            n, t0, cpu0 = 0, time.perf_counter(), time.thread_time()
            for _ in range(batches):
                images, _ = next(it)
                n += images.shape[0]
            thread_ms[spec].append(1000 * (time.thread_time() - cpu0) / batches)
            images.sum().item()  # wait for asynchronous device work
            rates[spec].append(n / (time.perf_counter() - t0))
            del it
    for loader in built.values():
        loader.close()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                device_name = next((x.partition(":")[2].strip() for x in f if x.startswith("model name")), device_name)
    try:
        import nvidia.dali

        dali_version = nvidia.dali.__version__
    except ImportError:
        dali_version = None
    for spec, r in rates.items():
        loader = built[spec]
        yield {
            **data_files(loader),
            "bench": "data",
            "loader": loader.cfg.data.loader,
            "variant": spec,
            "img_per_s": statistics.median(r),
            "runs": [round(x, 1) for x in r],
            "main_thread_ms": statistics.median(thread_ms[spec]),
            "image_size": loader.cfg.data.image_size,
            "batch_size": loader.cfg.data.batch_size,
            "workers": getattr(loader, "workers", loader.cfg.data.workers),
            **({"py_workers": loader.py_workers} if hasattr(loader, "py_workers") else {}),
            "device": str(device),
            "device_name": device_name,
            "cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "dali": dali_version,
            "ratio_to_" + loaders[-1]: statistics.median(r) / statistics.median(rates[loaders[-1]]),
        }


def data_files(loader) -> dict:
    """What a training loader reads: a folder or a pack, its files, and the files an epoch opens."""
    from .data.source import opens_per_epoch

    images = getattr(loader, "images", None)
    if images is None:  # synthetic
        return {"data": None}
    if images.reader is None:
        return {"data": "folder", "files": len(images), "files_opened_per_epoch": len(images)}
    loader.set_epoch(0)
    readers = loader.py_workers if hasattr(loader, "py_workers") else loader.workers  # 0: the training thread
    opened = opens_per_epoch(images.reader.index["shard"], loader.train_batches(), readers)
    return {"data": "pack", "files": len(images.reader.shard_names), "files_opened_per_epoch": opened}


def versions(device: torch.device) -> dict:
    """What a throughput number depends on besides the code: the device and the library versions."""
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dali": dali,
    }


def endless_steps(trainer: Trainer, loader) -> Iterator[None]:
    """Trainer steps over ``loader``'s epochs, one per ``next()``, for as long as the bench asks; the seconds the
    training thread waited for the loader's batches add up in ``trainer.interval.data_s``."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for step in loader:
            trainer.train_step(step)
            yield
        epoch += 1


LAUNCHERS = {"single": "process", "torchrun": "torchrun", "slurm": "slurm"}  # DistEnv.source -> the record's name
SIDES = ("synthetic", "data", "bare", "timm")


def _bare_loop(cfg: Config, env: DistEnv, model: torch.nn.Module | None = None) -> Callable[[], None]:
    """The reference: the same work written as a plain PyTorch loop, as one would by hand.

    The same model (dist_bot's ResNet builder, or ``model``, e.g. timm's), fused SGD with Nesterov momentum and
    weight decay, the same precision (autocast, a GradScaler for fp16), channels_last, torch.compile, DDP when
    distributed, the same micro-batches per step, label smoothing and mixup when the config has them, on one
    synthetic batch. Nothing in the step waits for the device. Returns a function doing one training step.
    """
    d, o, dev = cfg.data, cfg.optim, env.device
    torch.manual_seed(cfg.run.seed)
    num_classes = cfg.model.num_classes or 1000
    model = (model or build_model(cfg.model.name, num_classes)).to(dev)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if cfg.model.compile:
        model.compile(**compile_options(cfg.model))
    ddp = None
    if torch.distributed.is_initialized():  # as the Trainer: DDP whenever there is a process group
        ddp = model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    groups = [{"params": list(model.parameters()), "weight_decay": o.weight_decay}]
    opt = make_sgd(groups, o.momentum, o.nesterov)
    for g in opt.param_groups:
        g["lr"] = 0.1
    dtype = DTYPES[cfg.precision]
    scaler = make_grad_scaler(cfg.precision, dev, cfg.loss_scale)
    g = torch.Generator().manual_seed(cfg.run.seed + env.rank)
    in_dtype = torch.float16 if cfg.precision == "fp16" else torch.float32  # what the loaders emit
    images = torch.randn(d.batch_size, 3, d.image_size, d.image_size, generator=g).to(dev, in_dtype, memory_format=fmt)
    labels = torch.randint(0, num_classes, (d.batch_size,), generator=g).to(dev)
    rng = np.random.default_rng(cfg.run.seed)
    alpha, eps, accum = cfg.loss.mixup_alpha, cfg.loss.label_smoothing, o.grad_accum_steps
    ce = torch.nn.functional.cross_entropy

    def micro_step() -> None:
        x, lam = images, 1.0
        if alpha > 0:
            lam = float(rng.beta(alpha, alpha))
            x = lam * images + (1 - lam) * images.flip(0)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = ce(logits.float(), labels, label_smoothing=eps)
        if alpha > 0:
            loss = lam * loss + (1 - lam) * ce(logits.float(), labels.flip(0), label_smoothing=eps)
        scaler.scale(loss / accum).backward()

    def step() -> None:
        for _ in range(accum - 1):
            with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
                micro_step()
        micro_step()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def timm_model(cfg: Config) -> torch.nn.Module | str:
    """timm's model of the same architecture, or why there is none."""
    try:
        import timm
    except ImportError:
        return "timm is not installed"
    twin = timm_twin(cfg.model.name)
    if twin is None:
        return f"timm has no model of {cfg.model.name}'s architecture"
    name, kwargs = twin
    return timm.create_model(name, num_classes=cfg.model.num_classes or 1000, **kwargs)


class BlockTimer:
    """Wall time of a block of steps with one wait for the device per block: CUDA events on a GPU (recorded
    in the stream, read after the block), the host clock on a CPU, where every op finishes before it returns."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __call__(self, run: Callable[[], None], n: int) -> tuple[float, float]:
        """(seconds for ``n`` calls of ``run``, peak GPU memory in MiB during them, 0 on a CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        if not self.cuda:
            return time.perf_counter() - t0, 0.0
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated(self.device) / 2**20


def bench_train(
    cfg: Config,
    env: DistEnv,
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 3,
    timm: bool = False,
    sides: tuple[str, ...] | None = None,
):
    """Images/s of dist_bot's whole training step against a bare PyTorch loop doing the same work, side by side.

    Sides (``sides`` picks some; by default all that apply), each timed in ``repeats`` blocks of ``steps``
    optimizer steps (one device wait per block; the step time is the median over blocks of block time / steps),
    alternating so that a noisy neighbour hurts all alike, after ``warmup`` untimed steps each (torch.compile,
    cuDNN's autotuning):
      synthetic  dist_bot: the Trainer's own step (lr schedule, recipe losses, strategy, loss-scale guard) on one
                 synthetic batch, in a throw-away run folder;
      data       dist_bot+LOADER: the same Trainer fed by the real loader (data.loader=dali|torch with data.path),
                 epoch after epoch, after at least twice the loader's prefetch depth of untimed steps, so that
                 batches made ahead cannot hide a slow loader; ``data_s``: the step's wait for its batches. Timed
                 alone (sides=("data",)), no other side's blocks give the loader time to refill its queue;
      bare       `_bare_loop`; timm (with ``timm=True``): the bare loop with timm's model of that name.
    Yields one JSON-able record per side (each naming its launcher, strategy, compile mode and loader), then one
    with the ratios of the sides that ran.
    """
    cfg.wandb.mode = "disabled"
    if cfg.data.loader != "synthetic" and not cfg.data.path:
        cfg.data.loader = "synthetic"  # nothing to read: the synthetic side alone
    wanted = set(sides or SIDES)
    if unknown := wanted - set(SIDES):
        raise UserError(f"bench train --sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    tmp = tempfile.TemporaryDirectory(prefix="dist_bot_bench_")
    cfg.run.out_dir, cfg.run.name, cfg.run.resume = tmp.name, "bench", "never"
    trainer = Trainer(cfg, env)
    cfg = trainer.cfg  # with the per-process batch and accumulation this world size makes
    trainer.strategy.model.train()
    runs: dict[str, Callable[[], None]] = {}
    loaders: dict[str, str] = {}  # side -> the loader feeding it
    warm = dict.fromkeys(SIDES, warmup)
    loader = type(trainer.train_loader).__name__.removesuffix("Loader").lower()  # torch | dali | synthetic
    if "synthetic" in wanted:
        synthetic = SyntheticLoader(cfg, env, True, trainer.num_classes)
        runs["dist_bot"], loaders["dist_bot"] = functools.partial(next, endless_steps(trainer, synthetic)), "synthetic"
    if "data" in wanted and loader != "synthetic":
        side = f"dist_bot+{loader}"
        runs[side] = functools.partial(next, endless_steps(trainer, trainer.train_loader))
        loaders[side] = loader
        warm[side] = max(warmup, 2 * trainer.train_loader.prefetch_batches)
    if "bare" in wanted:
        runs["bare"], loaders["bare"] = _bare_loop(cfg, env), "synthetic"
    skipped = {}
    if timm and "timm" in wanted:
        found = timm_model(cfg)
        if isinstance(found, str):
            skipped["timm"] = found
        else:
            runs["timm"], loaders["timm"] = _bare_loop(cfg, env, found), "synthetic"
    if not runs:
        raise UserError(f"bench train --sides {','.join(sorted(wanted))}: none of them applies to this config")

    timer = BlockTimer(env.device)
    times: dict[str, list[float]] = {side: [] for side in runs}
    data_s: list[float] = []
    peak = dict.fromkeys(runs, 0.0)
    warmup_s = {}  # the untimed steps' seconds: torch.compile's compilation and cuDNN's autotuning are in them
    for side, run in runs.items():
        warmup_s[side] = timer(run, warm.get(side, warmup))[0]
    for _ in range(repeats):
        for side, run in runs.items():
            trainer.interval.data_s = 0.0
            seconds, mem = timer(run, steps)
            times[side].append(seconds / steps)
            peak[side] = max(peak[side], mem)
            if side.startswith("dist_bot+"):
                data_s.append(trainer.interval.data_s / steps)
    trainer.tracker.close()
    trainer.train_loader.close()
    trainer.val_loader.close()
    tmp.cleanup()

    batch = trainer.layout.global_batch
    m = cfg.model
    common = {
        "model": m.name,
        "image_size": cfg.data.image_size,
        "global_batch": batch,
        "processes": env.world_size,
        "launcher": LAUNCHERS[env.source],
        "precision": cfg.precision,
        "channels_last": m.channels_last,
        "compile": m.compile,
        "compile_mode": compile_options(m).get("mode") if m.compile else None,
        "compile_backend": m.compile_backend if m.compile else None,
        "cudnn_benchmark": m.cudnn_benchmark if env.device.type == "cuda" else None,
        "strategy": cfg.strategy,
    } | versions(env.device)
    rate = {}
    for side, t in times.items():
        med = statistics.median(t)
        rate[side] = batch / med
        mem = {"max_gpu_mem_mb": round(peak[side], 1)} if env.device.type == "cuda" else {}
        mem["max_rss_mb"] = round(local_peak_memory_mb(env)[0], 1)
        rec = {"bench": "train", "impl": side, "loader": loaders[side], "img_per_s": rate[side], "step_s": med}
        rec |= {"steps": len(t) * steps, "warmup_steps": warm.get(side, warmup), "warmup_s": round(warmup_s[side], 2)}
        if side.startswith("dist_bot+"):
            rec["data_s"] = statistics.median(data_s)
        yield rec | {"block_step_s": [round(x, 5) for x in t]} | mem | common
    for side, why in skipped.items():
        yield {"bench": "train", "impl": side, "loader": "synthetic", "skipped": why} | common
    ratios = {}
    if "dist_bot" in rate and "bare" in rate:
        ratios = {"ratio": rate["dist_bot"] / rate["bare"], "overhead_pct": 100 * (rate["bare"] / rate["dist_bot"] - 1)}
    if f"dist_bot+{loader}" in rate and "dist_bot" in rate:
        ratios["data_over_synthetic"] = rate[f"dist_bot+{loader}"] / rate["dist_bot"]
    if "timm" in rate and "dist_bot" in rate:
        ratios["dist_bot_over_timm"] = rate["dist_bot"] / rate["timm"]
    if ratios:
        yield {"bench": "train", "loader": None} | ratios | common
