"""Benchmarks that print numbers: medians over repeated runs, alternatives side by side in one run."""

from __future__ import annotations

import dataclasses
import statistics
import time

from .config import Config
from .data import make_loaders
from .distributed.env import DistEnv


def bench_data(cfg: Config, loaders: list[str], batches: int = 20, repeats: int = 3, warmup: int = 3):
    """Training-loader throughput (decode + augmentation + transfer to the device), one record per loader.

    Each repeat times ``batches`` batches after ``warmup`` batches, from a fresh epoch iterator (so DALI's
    pipeline build and DataLoader worker start-up stay outside the timing). Runs alternate between loaders
    so that a noisy neighbour hurts them alike; the median over repeats is reported.
    """
    env = DistEnv()
    built = {}
    for name in loaders:
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=name))
        built[name] = make_loaders(c, env)[0]
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for rep in range(repeats):
        for name, loader in built.items():
            loader.set_epoch(rep)
            it = iter(loader)
            for _ in range(warmup):
                next(it)
            n, t0 = 0, time.perf_counter()
            for _ in range(batches):
                images, _ = next(it)
                n += images.shape[0]
            images.sum().item()  # wait for asynchronous device work
            rates[name].append(n / (time.perf_counter() - t0))
            del it
    for name, r in rates.items():
        yield {
            "bench": "data",
            "loader": name,
            "img_per_s": statistics.median(r),
            "runs": [round(x, 1) for x in r],
            "image_size": cfg.data.image_size,
            "batch_size": cfg.data.batch_size,
            "workers": cfg.data.workers,
            "device": str(env.device),
            "ratio_to_" + loaders[-1]: statistics.median(r) / statistics.median(rates[loaders[-1]]),
        }
