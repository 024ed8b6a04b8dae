"""Small real datasets written as ImageNet-layout folders, for demos and tests that need no download."""

from __future__ import annotations

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
