"""Sample i of a dataset, whichever it is stored in: an ImageNet-layout folder (``<root>/{train,val}/<class>/<image>``,
checked before anything is trained) or a pack (``dist-bot data pack``: tar shards read by index). This is the one
byte reader (``read_sample``) and the one skip-bad-image rule (``first_readable``) of every loader: the loaders see
only indices, so plans, augmentation and resume are the same for a folder and its pack. Reading an image: decoded
to RGB, or only its size from the header; a file that cannot be read is named in a ``BadImageError``.

A pack (``FORMAT_VERSION`` 1)::

    DST/pack.json                 written last, by an atomic rename: without it DST is not a pack
    DST/{train,val}/shard-000000.tar ...   WebDataset layout: <key>.<ext> (the image) + <key>.cls (its label)
    DST/{train,val}/index.npy     one record per sample: shard, offset and size of its image bytes, label
    DST/{train,val}/names.txt     each sample's path in the source split (errors name the original file)

The index is a structured numpy array, memory-mapped (ImageNet's 1.28 M samples: 31 MB), so a process pays
only for the pages it touches. Sample i of a pack is sample i of its source folder (the sorted folder order)
when no source file was bad. Keys are the sample's index, zero-padded (dot-free, sorted as the index), because
WebDataset splits a name at its first dot.

No torch here: DALI's Python workers read through this module.
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
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
    class_descriptions: dict[str, str] | None = None  # class name -> description (ImageNet's: the devkit's words)

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


# -- packs ---------------------------------------------------------------------------------------------------

FORMAT_VERSION = 1
PACK_FILE = "pack.json"
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("label", "<i4"), ("offset", "<i8"), ("size", "<i8")])


def max_open_shards() -> int:
    """Shards a process keeps open. A shuffled plan reads every shard all the time, so a few open files would mean
    an open per image again: keep them all open (ImageNet in 1 GB shards: ~150), within a quarter of the
    process's file limit (commonly 1024) so that the rest of the process has room."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(4, min(1024, soft // 4)) if soft != resource.RLIM_INFINITY else 1024


def opens_per_epoch(shard_of: np.ndarray, batches: list, readers: int, keep: int | None = None) -> int:
    """Shard files an epoch opens when its ``batches`` (lists of indices) go round-robin to ``readers`` processes
    (a DataLoader's workers, or the process itself), each starting with none open and keeping ``keep`` (LRU)."""
    keep = keep or max_open_shards()
    opened = 0
    for r in range(max(1, readers)):
        lru: OrderedDict[int, None] = OrderedDict()
        for batch in batches[r :: max(1, readers)]:
            for shard in shard_of[list(batch)].tolist():
                if shard in lru:
                    lru.move_to_end(shard)
                    continue
                opened += 1
                lru[shard] = None
                if len(lru) > keep:
                    lru.popitem(last=False)
    return opened


def is_pack(path: str | Path) -> bool:
    """A folder written by ``dist-bot data pack`` (finished or not): it has a pack.json or a pack in progress."""
    p = Path(path)
    return (p / PACK_FILE).is_file() or (p / ".pack-progress").is_dir()


class ShardReader:
    """Sample index -> its image bytes: one ``pread`` from its shard at (offset, size). Keeps the shards it read
    open (LRU, up to ``max_open_shards()``) in each process; open files are not pickled, so each DataLoader or DALI
    worker opens its own, once: a worker serves epoch after epoch."""

    def __init__(self, split_dir: str | Path, shard_names: list[str], index: np.ndarray):
        self.split_dir, self.shard_names, self.index = str(split_dir), list(shard_names), index
        self.opened = 0  # shard files opened by this process (bench data reports them)
        self._open: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # threads share the open files (data check reads with a thread pool)
        self.keep = max_open_shards()

    def __len__(self) -> int:
        return len(self.index)

    def shard_path(self, i: int) -> str:
        return os.path.join(self.split_dir, self.shard_names[int(self.index[i]["shard"])])

    def read(self, i: int) -> bytes:
        rec = self.index[i]
        size = int(rec["size"])
        if self._pid != os.getpid():  # a forked copy: the parent's descriptors and lock are not this process's
            self._open, self._pid, self._lock = OrderedDict(), os.getpid(), threading.Lock()
        with self._lock:  # held while reading: another thread could otherwise close the file under it
            data = os.pread(self._fd(int(rec["shard"])), size, int(rec["offset"]))
        if len(data) != size:
            raise DataError(
                f"{self.shard_path(i)} ends before sample {i} (offset {int(rec['offset'])}, {size} bytes): the pack "
                "is damaged; run `dist-bot data check` on it, and pack the folder again"
            )
        return data

    def _fd(self, shard: int) -> int:
        fd = self._open.get(shard)
        if fd is not None:
            self._open.move_to_end(shard)
            return fd
        if len(self._open) >= self.keep:
            os.close(self._open.popitem(last=False)[1])
        fd = os.open(os.path.join(self.split_dir, self.shard_names[shard]), os.O_RDONLY)
        self.opened += 1
        self._open[shard] = fd
        return fd

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"], state["opened"] = OrderedDict(), 0
        state["index"] = np.asarray(self.index)  # a memory map pickles as its data
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid, self._lock = os.getpid(), threading.Lock()


def read_manifest(root: Path) -> dict:
    """pack.json of a finished pack; a clear error for an unfinished or foreign one."""
    file = root / PACK_FILE
    if not file.is_file():
        raise DataError(
            f"{root} is an unfinished pack (no {PACK_FILE}): rerun `dist-bot data pack SRC {root}` (or the "
            f"`dist-bot data imagenet ... {root}` that started it)"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != "dist-bot-pack" or manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{file} is not a dist-bot pack of format version {FORMAT_VERSION}: pack the folder again with this "
            "version of dist-bot"
        )
    return manifest


def split_source(source: str | dict[str, str], split: str) -> str:
    """Where a pack's split came from: <folder>/<split>, or the split's archive (``dist-bot data imagenet``, whose
    names.txt then holds <class>/<file> inside it)."""
    return source[split] if isinstance(source, dict) else os.path.join(source, split)


def open_split(root: Path, split: str, manifest: dict) -> ImageList:
    """The ImageList of one split of a pack: names from names.txt, bytes through a ShardReader."""
    d = root / split
    info = manifest["splits"][split]
    try:
        index = np.load(d / "index.npy", mmap_mode="r")
        names = (d / "names.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the index of {d}: {e}; pack the folder again") from None
    if index.dtype != INDEX_DTYPE or len(index) != len(names) or len(index) != info["samples"]:
        raise DataError(
            f"the index of {d} does not match {root / PACK_FILE} ({len(index)} records, {len(names)} names, "
            f"{info['samples']} samples): the pack is damaged; pack the folder again"
        )
    if not len(index):
        raise DataError(f"{d} has no samples: a pack needs images in both train/ and val/")
    reader = ShardReader(d, info["shards"], index)
    src = split_source(manifest["source"], split)  # names are the source files' paths: errors name the original
    samples = tuple((os.path.join(src, n), label) for n, label in zip(names, index["label"].tolist(), strict=True))
    return ImageList(d, tuple(manifest["classes"]), samples, reader, manifest.get("class_descriptions"))


def open_dataset(path: str | None) -> tuple[ImageList, ImageList]:
    """train and val of ``data.path``: a pack (``dist-bot data pack``) or an ImageNet-layout folder."""
    if path and is_pack(Path(path).expanduser()):
        return open_pack(path)
    return scan_dataset(path)


def open_pack(path: str | Path) -> tuple[ImageList, ImageList]:
    """train and val image lists of a pack, with the class table it was packed with."""
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    return open_split(root, "train", manifest), open_split(root, "val", manifest)


# -- the compact list DALI's workers get ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileList:
    """A split's files as a few flat arrays, pickled to every DALI worker: ImageNet's 1.28 M files take about 60 MB
    and 0.1 s to pickle and load (measured), where the tuple of 1.28 M (path, label) tuples takes 1.8 s."""

    root: str
    names: bytes  # the paths relative to root, file-system encoded, concatenated
    offsets: np.ndarray  # int64 (n + 1,): path i is names[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64 (n,)
    reader: SampleReader | None = None  # a pack's ShardReader: the bytes come from its shards, paths name them

    @classmethod
    def of(cls, images: ImageList) -> FileList:
        root = str(images.root) if images.reader is None else os.path.commonpath([p for p, _ in images.samples])
        prefix = root + os.sep
        # a path outside root stays absolute: os.path.join(root, absolute) is that path
        rel = [os.fsencode(p[len(prefix) :] if p.startswith(prefix) else p) for p, _ in images.samples]
        offsets = np.zeros(len(rel) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rel], out=offsets[1:])
        labels = np.fromiter((label for _, label in images.samples), dtype=np.int64, count=len(rel))
        return cls(root, b"".join(rel), offsets, labels, images.reader)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.names[self.offsets[i] : self.offsets[i + 1]]))

    def read(self, i: int) -> bytes:
        return read_sample(i, self.path(i), self.reader)

    def read_header(self, i: int) -> tuple[bytes, tuple[int, int]]:
        """(bytes, (width, height)) of sample i: the size from the header, without decoding."""
        data = self.read(i)
        return data, image_size_of(data, self.path(i))


def read_image(files: FileList, index: int, skip_bad: bool) -> tuple[bytes, int, tuple[int, int], int]:
    """(bytes, label, (width, height), files skipped) of sample ``index``, by the skip-bad-image rule
    (``first_readable``: the feeder judges a file by its header; a file whose data does not decode fails in DALI,
    and DaliLoader names it)."""
    at, (data, size), skipped = first_readable(len(files), index, files.read_header, skip_bad)
    return data, int(files.labels[at]), size, len(skipped)


def unreadable_from(files: FileList, index: int) -> list[BadImageError]:
    """The errors of the unreadable files that a skip starting at sample ``index`` passed over."""
    try:
        return first_readable(len(files), index, files.read_header, skip_bad=True)[2]
    except BadImageError:  # none is readable
        return []
