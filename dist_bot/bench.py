"""Benchmarks that print numbers: medians over repeated runs, alternatives side by side in one run."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import numpy as np
import torch

from .config import Config
from .data import make_loaders
from .distributed.env import DistEnv
from .engine import Trainer
from .models import build_model


def bench_data(cfg: Config, loaders: list[str], batches: int = 20, repeats: int = 3, warmup: int = 3):
    """Training-loader throughput (decode + augmentation + transfer to the device) and the training thread's CPU
    time per batch, one record per loader variant: a loader's name, or ``name@key=value@key=value`` (e.g.
    ``dali@data.dali_py_workers=0``), on the training device (cuda:0 when there is one, else the CPU).

    Each repeat times ``batches`` batches after ``warmup`` batches, from a fresh epoch iterator (so DALI's
    pipeline build and DataLoader worker start-up stay outside the timing). Runs alternate between variants
    so that a noisy neighbour hurts them alike; the median over repeats is reported. ``main_thread_ms`` is the
    training thread's CPU time per batch (``time.thread_time`` around the timed ``next()`` calls): what the
    loader takes from the thread that must also keep the GPU fed.
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
            loader.set_epoch(rep)
            it = iter(loader)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_loop(cfg: Config, env: DistEnv):
    """The reference: the same work written as a plain PyTorch loop, as one would by hand.

    Same model (dist_bot's ResNet builder, so the networks are identical), SGD with Nesterov momentum and
    weight decay, the same precision (autocast, a GradScaler for fp16), channels_last, torch.compile, DDP
    when distributed, label smoothing and mixup when the config has them, on the same synthetic batch.
    Returns a function doing one training step.
    """
    d, o, dev = cfg.data, cfg.optim, env.device
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model.name, cfg.model.num_classes or 1000).to(dev)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if cfg.model.compile:
        model.compile()
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16")
    g = torch.Generator().manual_seed(cfg.run.seed + env.rank)
    in_dtype = torch.float16 if cfg.precision == "fp16" else torch.float32  # what the loaders emit
    images = torch.randn(d.batch_size, 3, d.image_size, d.image_size, generator=g).to(dev, in_dtype, memory_format=fmt)
    labels = torch.randint(0, cfg.model.num_classes or 1000, (d.batch_size,), generator=g).to(dev)
    rng = np.random.default_rng(cfg.run.seed)
    alpha, eps = cfg.loss.mixup_alpha, cfg.loss.label_smoothing

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x, lam = images, 1.0
        if alpha > 0:
            lam = float(rng.beta(alpha, alpha))
            x = lam * images + (1 - lam) * images.flip(0)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=eps)
        if alpha > 0:
            loss = lam * loss + (1 - lam) * torch.nn.functional.cross_entropy(
                logits.float(), labels.flip(0), label_smoothing=eps
            )
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def bench_train(cfg: Config, env: DistEnv, steps: int = 20, warmup: int = 5, repeats: int = 3):
    """Images/s of dist_bot's whole training step against a bare PyTorch loop doing the same work.

    dist_bot: the Trainer's own epoch loop (lr schedule, recipe losses, strategy, loss-scale guard, stop
    check, logging) on synthetic data in a throw-away run folder, timed by a hook after every optimizer step.
    Bare: `_bare_loop`. They alternate, `repeats` blocks each of `warmup` + `steps` steps; the step time is
    the median over all timed steps of a side, and img/s = global batch / that. Yields one JSON-able record
    per side, then their ratio.
    """
    cfg.data.loader, cfg.wandb.mode = "synthetic", "disabled"
    tmp = tempfile.TemporaryDirectory(prefix="dist_bot_bench_")
    cfg.run.out_dir, cfg.run.name, cfg.run.resume = tmp.name, "bench", "never"
    trainer = Trainer(cfg, env)
    bare = _bare_loop(cfg, env)
    per_block = warmup + steps
    if len(trainer.train_loader) < per_block:
        raise ValueError(f"the synthetic epoch has {len(trainer.train_loader)} steps: ask for fewer than {per_block}")

    times: dict[str, list[float]] = {"dist_bot": [], "bare": []}
    marks: list[float] = []

    def mark() -> None:
        _sync(env.device)
        marks.append(time.perf_counter())

    trainer.on_step = mark
    trainer.train_loader.steps = trainer.train_loader.steps[:per_block]
    for _ in range(repeats):
        trainer.epoch_step = 0
        _sync(env.device)
        marks[:] = [time.perf_counter()]
        trainer.train_epoch()
        times["dist_bot"] += [b - a for a, b in zip(marks[warmup:], marks[warmup + 1 :], strict=False)]
        mark_bare = [time.perf_counter()]
        for _ in range(per_block):
            bare()
            _sync(env.device)
            mark_bare.append(time.perf_counter())
        times["bare"] += [b - a for a, b in zip(mark_bare[warmup:], mark_bare[warmup + 1 :], strict=False)]
    trainer.tracker.close()
    tmp.cleanup()

    batch = cfg.data.batch_size * env.world_size * cfg.optim.grad_accum_steps
    common = {
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "global_batch": batch,
        "processes": env.world_size,
        "precision": cfg.precision,
        "channels_last": cfg.model.channels_last,
        "compile": cfg.model.compile,
        "strategy": cfg.strategy,
        "device": str(env.device),
    }
    rate = {}
    for side, t in times.items():
        med = statistics.median(t)
        rate[side] = batch / med
        yield {"bench": "train", "impl": side, "img_per_s": rate[side], "step_s": med, "steps": len(t)} | common
    yield {
        "bench": "train",
        "ratio": rate["dist_bot"] / rate["bare"],
        "overhead_pct": 100 * (rate["bare"] / rate["dist_bot"] - 1),
    } | common
