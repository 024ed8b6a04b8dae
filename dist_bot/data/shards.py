"""Reading a pack: a dataset written by ``dist-bot data pack`` as tar shards, each sample read by its index.

Layout (``FORMAT_VERSION`` 1)::

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

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import DataError
from .folder import ImageList, scan_dataset

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
        raise DataError(f"{root} is an unfinished pack (no {PACK_FILE}): rerun `dist-bot data pack SRC {root}`")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != "dist-bot-pack" or manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{file} is not a dist-bot pack of format version {FORMAT_VERSION}: pack the folder again with this "
            "version of dist-bot"
        )
    return manifest


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
    src = os.path.join(manifest["source"], split)  # names are the source files' paths: errors name the original
    samples = tuple((os.path.join(src, n), label) for n, label in zip(names, index["label"].tolist(), strict=True))
    return ImageList(d, tuple(manifest["classes"]), samples, reader)


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
