"""Datasets written as ImageNet-layout folders, for demos, tests and benchmarks that need no download."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .config import UserError


def write_digits(out_dir: str | Path, size: int = 32, val_every: int = 5) -> dict[str, int]:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes) as JPEG class folders.

    Images are upscaled to ``size`` px (bicubic); every ``val_every``-th image goes to val/ (a fixed split:
    1,437 train / 360 val for the default 5). Refuses to write into a non-empty folder.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits demo needs scikit-learn: pip install 'dist-bot[demo]'") from None
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: choose a new folder for the digits dataset")
    digits = load_digits()
    counts = {"train": 0, "val": 0}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "val" if i % val_every == 0 else "train"
        img = Image.fromarray(np.uint8(np.round(pixels * (255 / 16))), mode="L").resize((size, size), Image.BICUBIC)
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:04d}.jpg", quality=95)
        counts[split] += 1
    return counts


def _fake_image(path: str, width: int, height: int, seed: int) -> int:
    """A smooth random picture with grain: about 70 KB as a JPEG at 500 x 375 (ImageNet's average file is ~110 KB)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def write_fake_jpegs(
    out_dir: str | Path, images: int = 2000, width: int = 500, height: int = 375, classes: int = 10, val_share=0.1
) -> dict[str, int]:
    """``images`` random JPEGs of ImageNet's typical size (500 x 375), in ``classes`` class folders with
    ``val_share`` of each class in val/: real files to decode for loader and training benchmarks. Written in
    parallel; refuses a non-empty folder."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: choose a new folder for the fake JPEGs")
    per_class = max(2, images // classes)
    jobs = []
    for c in range(classes):
        for i in range(per_class):
            split = "val" if i < max(1, round(per_class * val_share)) else "train"
            folder = out / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((str(folder / f"{i:05d}.jpg"), width, height, c * per_class + i))
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(_fake_image, *zip(*jobs, strict=True), chunksize=16))
    counts = {split: sum(1 for j in jobs if f"/{split}/" in j[0]) for split in ("train", "val")}
    return counts | {"mean_kb": round(sum(sizes) / len(sizes) / 1024, 1)}
