"""An ImageNet-layout folder: ``<root>/{train,val}/<class>/<image>``; checked before anything is trained.
Reading one of its images: decoded to RGB, or only its size from the header; a file that cannot be read is
named in a ``BadImageError``. An ``ImageList`` reads sample i's bytes from its file, or from a pack's shard
(shards.py) when it has a reader: the loaders see only indices either way. (No torch here: DALI's Python
workers import this module.)
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from PIL import Image, UnidentifiedImageError

from ..errors import BadImageError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def read_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Decode an image file (or its bytes ``data``, read elsewhere) to RGB (grayscale, CMYK and palette images are
    converted); a BadImageError names the file and why it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                return im.convert("RGB")
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as e:
        raise BadImageError(f"cannot read image {path}: {e}") from None


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """An image of the dataset, decoded to RGB; the error of an unreadable one says how to go on."""
    try:
        return read_rgb(path, data)
    except BadImageError as e:
        raise BadImageError(
            f"{e}. Remove or replace the file, or set data.skip_bad_images=true "
            "to skip unreadable images (they are counted and reported)"
        ) from None


def image_size_of(data: bytes, path: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding; a non-image names the file."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:
        why = "not an image file, or its header is damaged" if isinstance(e, UnidentifiedImageError) else e
        raise BadImageError(
            f"cannot read image {path}: {why}. Remove or replace the file, or set data.skip_bad_images=true"
        ) from None


class SampleReader(Protocol):
    """Where a pack's samples are (shards.ShardReader): sample index -> its bytes."""

    def read(self, i: int) -> bytes: ...


def read_sample(i: int, path: str, reader: SampleReader | None) -> bytes:
    """The bytes of sample ``i``: from its pack's shards (``reader``), or from its file ``path``. The one byte reader
    of every loader (ImageList and the DALI feeder's FileList hold their samples differently, and read them here)."""
    if reader is not None:
        return reader.read(i)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImageError(f"cannot read image {path}: {e.strerror or e}") from None


T = TypeVar("T")


def first_readable(n: int, index: int, read: Callable[[int], T], skip_bad: bool) -> tuple[int, T, list[BadImageError]]:
    """The skip-bad-image rule, once for every loader: sample ``index`` of ``n``, read with ``read(i)``; with
    ``skip_bad`` an unreadable one (a BadImageError) is replaced by the next readable one, wrapping around, else its
    error is raised. Returns (the sample read, what ``read`` returned, the errors of the samples skipped)."""
    skipped = []
    for attempt in range(n):
        i = (index + attempt) % n
        try:
            return i, read(i), skipped
        except BadImageError as e:
            if not skip_bad:
                raise
            skipped.append(e)
    raise BadImageError(f"no readable image among the split's {n}: {skipped[0]}")


@dataclass(frozen=True)
class ImageList:
    root: Path
    classes: tuple[str, ...]  # class folder names, sorted: the label of classes[i] is i
    samples: tuple[tuple[str, int], ...]  # (path, label), sorted by path: a fixed order every run
    reader: SampleReader | None = None  # a pack's: samples[i][0] then only names the packed file in messages

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> bytes:
        """The bytes of sample i's image file."""
        return read_sample(i, self.samples[i][0], self.reader)


def scan_split(root: Path, split: str, classes: tuple[str, ...] | None = None) -> ImageList:
    """List the images of ``root/split``; ``classes`` (from train) fixes the labels of val."""
    d = root / split
    found = tuple(sorted(e.name for e in os.scandir(d) if e.is_dir()))
    if not found:
        raise DataError(f"{d} has no class folders: put each class's images in {d}/<class name>/")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{d} has classes that train/ lacks: {', '.join(unknown[:5])}; the splits must match")
    samples = []
    for label, name in enumerate(classes):
        cdir = d / name
        if not cdir.is_dir():
            continue  # a class absent from val is allowed (it just has no val images)
        files = sorted(e.path for e in os.scandir(cdir) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(
                f"class folder {cdir} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                "remove the folder or add its images"
            )
        samples += [(f, label) for f in files]
    return ImageList(d, classes, tuple(samples))


def scan_dataset(path: str | None) -> tuple[ImageList, ImageList]:
    """train and val image lists of ``data.path``, with one class table for both."""
    if not path:
        raise DataError("data.path is not set: pass data.path=/path/to/imagenet (a folder holding train/ and val/)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={path} does not exist or is not a folder")
    for split in ("train", "val"):  # both, before reading either
        if not (root / split).is_dir():
            raise DataError(
                f"data.path={path} has no '{split}/' folder: it must hold train/ and val/, each with one "
                "sub-folder of images per class (ImageNet layout)"
            )
    train = scan_split(root, "train")
    val = scan_split(root, "val", train.classes)
    return train, val
