"""Datasets written as ImageNet-layout folders, for demos, tests and benchmarks that need no download."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError


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


def _fake_image(path: str, width: int, height: int, seed: int, mode: str = "RGB") -> int:
    """A smooth random picture with grain: about 70 KB as a JPEG at 500 x 375 (ImageNet's average file is ~110 KB).
    ``mode`` L (grayscale) or CMYK, as ImageNet holds a few of each. Dropped from the page cache once written,
    so that a benchmark's first epoch reads it from the disk, as a training run's does."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode).save(path, quality=90)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return os.path.getsize(path)


def imagenet_like_size(seed: int) -> tuple[int, int, str]:
    """(width, height, mode) of fake image ``seed``, spread as ImageNet's train set is: most sides 300-500 px
    (the typical 500 x 375 or 375 x 500), a tail of 1,000-2,500 px (about 3 %), a few grayscale (about 2 %) and
    CMYK (a few in a thousand) files."""
    rng = np.random.default_rng([seed, 7])
    u = rng.random()
    if u < 0.03:
        long = int(rng.integers(1000, 2500))
    elif u < 0.15:
        long = int(rng.integers(500, 1000))
    else:
        long = int(rng.integers(300, 501))
    short = int(long * rng.uniform(0.6, 0.9))
    width, height = (long, short) if rng.random() < 0.75 else (short, long)  # most are landscape
    m = rng.random()
    return width, height, "L" if m < 0.02 else "CMYK" if m < 0.025 else "RGB"


def write_fake_jpegs(
    out_dir: str | Path,
    images: int = 2000,
    width: int = 500,
    height: int = 375,
    classes: int = 10,
    val_share=0.1,
    imagenet_sizes: bool = False,
) -> dict[str, int]:
    """``images`` random JPEGs of ImageNet's typical size (500 x 375), or with ``imagenet_sizes`` of its spread
    of sizes and modes (imagenet_like_size), in ``classes`` class folders with ``val_share`` of each class in
    val/: real files to decode for loader and training benchmarks. Written in parallel; refuses a non-empty
    folder."""
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
            seed = c * per_class + i
            w, h, mode = imagenet_like_size(seed) if imagenet_sizes else (width, height, "RGB")
            jobs.append((str(folder / f"{i:05d}.jpg"), w, h, seed, mode))
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(_fake_image, *zip(*jobs, strict=True), chunksize=16))
    counts = {split: sum(1 for j in jobs if f"/{split}/" in j[0]) for split in ("train", "val")}
    modes = {m: sum(j[4] == m for j in jobs) for m in ("RGB", "L", "CMYK")}
    longest = max(max(j[1], j[2]) for j in jobs)
    return counts | {"mean_kb": round(sum(sizes) / len(sizes) / 1024, 1), "modes": modes, "longest_side": longest}


def write_ilsvrc_archives(src: str | Path, out_dir: str | Path, words: dict[str, str] | None = None) -> dict:
    """An ImageNet-layout folder whose classes are WNIDs (Imagenette's are) as ImageNet's three official archives in
    ``out_dir``, to try and to measure `dist-bot data imagenet` on: ILSVRC2012_img_train.tar (one tar per synset,
    each holding that class's files under their own names), ILSVRC2012_img_val.tar (flat, the val files renumbered
    ILSVRC2012_val_00000001.JPEG ... in a shuffled order of classes) and ILSVRC2012_devkit_t12.tar.gz
    (data/meta.mat: the classes as leaf synsets with ILSVRC2012_IDs in a shuffled order, as ImageNet's are not in
    WNID order, and two parent synsets; data/ILSVRC2012_validation_ground_truth.txt). ``words``: wnid -> the
    description meta.mat gives it (default: the WNID). Returns the three paths (train_tar, val_tar, devkit) and the
    image counts (train, val)."""
    import io
    import tarfile

    try:
        import scipy.io
    except ImportError:
        raise UserError("writing a devkit's meta.mat needs scipy: pip install 'dist-bot[imagenet]'") from None
    src, out = Path(src), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: choose a new folder for the archives")
    out.mkdir(parents=True, exist_ok=True)
    wnids = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    paths = {k: out / n for k, n in (("train", "ILSVRC2012_img_train.tar"), ("val", "ILSVRC2012_img_val.tar"))}
    paths["devkit"] = out / "ILSVRC2012_devkit_t12.tar.gz"

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    train_counts = {}
    with tarfile.open(paths["train"], "w") as outer:
        for wnid in wnids:
            files = sorted((src / "train" / wnid).iterdir())
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for f in files:
                    add(tar, f.name, f.read_bytes())
            add(outer, f"{wnid}.tar", inner.getvalue())
            train_counts[wnid] = len(files)
    val_files = [(f, wnid) for wnid in wnids for f in sorted((src / "val" / wnid).iterdir())]
    val_files = [val_files[i] for i in rng.permutation(len(val_files))]
    ids = {wnid: int(i) + 1 for wnid, i in zip(wnids, rng.permutation(len(wnids)), strict=True)}
    with tarfile.open(paths["val"], "w") as tar:
        for k, (f, _) in enumerate(val_files, 1):
            add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", f.read_bytes())
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height"]
    synsets = np.zeros(len(wnids) + 2, dtype=[(f, "O") for f in [*fields, "num_train_images"]])
    for i, wnid in enumerate(wnids):
        synsets[i] = (ids[wnid], wnid, (words or {}).get(wnid, wnid), "", 0, np.zeros(0), 0, train_counts[wnid])
    leaves = np.array(sorted(ids.values()), dtype=float)
    n = len(wnids)
    synsets[n] = (n + 1, "n00001740", "entity", "", 1, np.array([n + 2.0]), 2, 0)  # parents: num_children > 0
    synsets[n + 1] = (n + 2, "n00002684", "object", "", n, leaves, 1, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[wnid]}\n" for _, wnid in val_files).encode()
    with tarfile.open(paths["devkit"], "w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    archives = {"train_tar": str(paths["train"]), "val_tar": str(paths["val"]), "devkit": str(paths["devkit"])}
    return archives | {"train": sum(train_counts.values()), "val": len(val_files)}
