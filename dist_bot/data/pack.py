"""``dist-bot data pack SRC DST``: an ImageNet-layout folder as tar shards (layout: source.py), so that a cluster's
shared file system serves a few large files per epoch instead of a million small ones.

Every image is checked as ``dist-bot data check`` does (a full decode); a bad one is reported and not packed.
Packing is resumable: each shard is written as ``.tmp`` and renamed when complete, with a record of the source
files it holds in ``DST/.pack-progress/``; a rerun keeps the complete shards whose record names the source's
next files (by name: a file rewritten in place between the runs is not noticed) and writes the rest. pack.json
is written last, by an atomic rename: until then DST is not a pack, and the loaders say it is unfinished.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadImageError, DataError
from .check import check_bytes
from .source import FORMAT_VERSION, INDEX_DTYPE, PACK_FILE, ImageList, scan_dataset, split_source

PROGRESS = ".pack-progress"
MIN_SHARD_SIZE = 10**6  # bytes; smaller shards would be many small files again
AHEAD = 128  # files read and decoded ahead of the shard being written


@dataclass
class PackSummary:
    dst: str
    samples: dict[str, int] = field(default_factory=dict)  # split -> images packed
    shards: dict[str, int] = field(default_factory=dict)  # split -> shard files
    bad: list[tuple[str, str]] = field(default_factory=list)  # (source path, why it does not decode): not packed
    resumed_shards: int = 0  # complete shards of an interrupted run, kept
    seconds: float = 0.0
    written: int = 0  # images this run read, decoded and wrote (a resumed run: not those of the kept shards)
    written_bytes: int = 0  # their bytes

    def rates(self) -> dict[str, float]:
        """images/s and MB/s of this run's reading, checking and writing."""
        s = max(self.seconds, 1e-9)
        return {"images_per_s": round(self.written / s, 1), "mb_per_s": round(self.written_bytes / s / 1e6, 1)}


def write_json(path: Path, obj) -> None:
    """Write through a temporary file and an atomic rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def member_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


class SplitPacker:
    """Writes one split's shards from source position ``start`` on; ``done`` holds the records of complete shards."""

    def __init__(self, images: ImageList, out: Path, progress: Path, split: str, shard_size: int, pool):
        self.images, self.out, self.progress, self.split = images, out, progress, split
        self.shard_size, self.pool = shard_size, pool
        self.prefix = str(images.root) + os.sep
        self.done: list[dict] = []
        self.kept = 0  # complete shards of an earlier run, kept
        self.written, self.written_bytes = 0, 0  # by this run

    def rel(self, i: int) -> str:
        return self.images.samples[i][0][len(self.prefix) :]

    def record_path(self, k: int) -> Path:
        return self.progress / f"{self.split}-{k:06d}.json"

    def resume(self) -> int:
        """Keep the complete shards an earlier run wrote for exactly these source files; drop everything after."""
        pos = 0
        while True:
            k = len(self.done)
            rec_file, shard = self.record_path(k), self.out / f"shard-{k:06d}.tar"
            if not (rec_file.is_file() and shard.is_file()):
                break
            rec = json.loads(rec_file.read_text())
            names = rec["consumed"]
            if names != [self.rel(i) for i in range(pos, min(pos + len(names), len(self.images)))]:
                break
            self.done.append(rec)
            pos += len(names)
        for f in list(self.out.glob("shard-*")) + list(self.progress.glob(f"{self.split}-*.json")):
            k = int(f.name.split("-")[1].split(".")[0])
            if k >= len(self.done):
                f.unlink()
        return pos

    def checked(self, start: int):
        """(source position, bytes, error) of every file from ``start`` on, in order; the pool reads and decodes
        up to ``AHEAD`` files ahead (bounding the bytes held in memory)."""

        def one(i):
            try:
                data = self.images.read(i)
            except BadImageError as e:  # a file that cannot even be opened is a bad file too
                return i, b"", str(e)
            return i, data, check_bytes(data)[1]

        ahead: deque = deque()
        for i in range(start, len(self.images)):
            ahead.append(self.pool.submit(one, i))
            if len(ahead) >= AHEAD:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def run(self) -> None:
        start = self.resume()
        self.kept = len(self.done)
        packed = sum(len(r["samples"]) for r in self.done)
        files = self.checked(start)
        item = next(files, None)
        while item is not None:  # one shard per turn
            tmp = self.out / f"shard-{len(self.done):06d}.tar.tmp"
            rec = {"consumed": [], "samples": [], "bad": []}
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                while item is not None:
                    i, data, error = item
                    if rec["samples"] and tar.offset + len(data) + 4 * tarfile.BLOCKSIZE > self.shard_size:
                        break  # the next shard's first file
                    rel, label = self.rel(i), self.images.samples[i][1]
                    rec["consumed"].append(rel)
                    if error:
                        rec["bad"].append([self.images.samples[i][0], error])
                    else:
                        key = f"{packed:08d}"
                        add_member(tar, f"{key}.{member_ext(rel)}", data)
                        add_member(tar, f"{key}.cls", str(label).encode())
                        rec["samples"].append([rel, label])
                        packed += 1
                        self.written, self.written_bytes = self.written + 1, self.written_bytes + len(data)
                    item = next(files, None)
            self.close_shard(tmp, rec)

    def close_shard(self, tmp: Path, rec: dict) -> None:
        """Finish a written shard: read its members' data offsets back with tarfile (which also proves it a valid
        tar), then rename it into place and write its record."""
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        with tarfile.open(tmp) as t:
            images = [m for m in t.getmembers() if not m.name.endswith(".cls")]
        rec["samples"] = [[*s, m.offset_data, m.size] for s, m in zip(rec["samples"], images, strict=True)]
        k = len(self.done)
        os.replace(tmp, self.out / f"shard-{k:06d}.tar")
        write_json(self.record_path(k), rec)
        self.done.append(rec)

    def write_index(self) -> dict:
        """index.npy and names.txt from the shards' records; this split's entry of pack.json."""
        rows = [(k, s[1], s[2], s[3]) for k, r in enumerate(self.done) for s in r["samples"]]
        index = np.array(rows, dtype=INDEX_DTYPE) if rows else np.zeros(0, INDEX_DTYPE)
        with open(self.out / "index.npy.tmp", "wb") as f:
            np.save(f, index)
        os.replace(self.out / "index.npy.tmp", self.out / "index.npy")
        names = [s[0] for r in self.done for s in r["samples"]]
        if any("\n" in n for n in names):
            raise DataError(f"{self.images.root} has a file name with a line break: rename it, then pack again")
        tmp = self.out / "names.txt.tmp"
        tmp.write_text("".join(n + "\n" for n in names), encoding="utf-8")
        os.replace(tmp, self.out / "names.txt")
        return {"samples": len(rows), "shards": [f"shard-{k:06d}.tar" for k in range(len(self.done))]}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # the same bytes from the same files: reproducible
    tar.addfile(info, io.BytesIO(data))


def write_pack(src: str | Path, dst: str | Path, shard_size: int = 1 << 30, workers: int = 8) -> PackSummary:
    """Pack ``src`` (train/ and val/ class folders) into ``dst``; resumes an interrupted pack of the same source."""
    check_shard_size(shard_size)  # before scanning a large folder
    src = Path(src).expanduser().resolve()
    train, val = scan_dataset(str(src))
    return pack_splits(train, val, dst, str(src), shard_size, workers)


def check_shard_size(shard_size: int) -> None:
    if shard_size < MIN_SHARD_SIZE:
        raise DataError(f"--shard-size {shard_size} bytes is too small: use at least 1MB (e.g. 1GB)")


def describe(source: str | dict) -> str:
    """A pack's source for messages: its folder, or its archives (``dist-bot data imagenet``)."""
    return source if isinstance(source, str) else " ".join(source.values())


def pack_splits(
    train: ImageList,
    val: ImageList,
    dst: str | Path,
    source: str | dict[str, str],
    shard_size: int = 1 << 30,
    workers: int = 8,
    class_descriptions: dict[str, str] | None = None,
) -> PackSummary:
    """Pack two image lists into ``dst``: their bytes (read through ``ImageList.read``, from files or from an
    archive), each checked by a full decode. ``source`` is what they came from: a folder (its train/ and val/
    hold the files the pack's names.txt lists) or one path per split and {"devkit": ...} (archives); the
    same ``source`` and ``shard_size`` resume an interrupted pack."""
    t0 = time.perf_counter()
    dst = Path(dst).expanduser()
    check_shard_size(shard_size)
    if (dst / PACK_FILE).exists():
        raise DataError(f"{dst} is already a finished pack: delete it, or pack into another folder")
    progress = dst / PROGRESS
    params = {"source": source, "shard_size": shard_size}
    if progress.is_dir():
        before = json.loads((progress / "params.json").read_text())
        if before != params:
            raise DataError(
                f"{dst} holds an unfinished pack of {describe(before['source'])} with --shard-size "
                f"{before['shard_size']}: rerun with those arguments to finish it, or delete the folder"
            )
    elif dst.exists() and any(dst.iterdir()):
        raise DataError(f"{dst} exists and is not empty: pack into a new folder")
    else:
        progress.mkdir(parents=True)
        write_json(progress / "params.json", params)

    summary = PackSummary(str(dst))
    splits = {}
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while it decodes
        for split, images in (("train", train), ("val", val)):
            (dst / split).mkdir(exist_ok=True)
            packer = SplitPacker(images, dst / split, progress, split, shard_size, pool)
            packer.run()
            summary.resumed_shards += packer.kept
            summary.written += packer.written
            summary.written_bytes += packer.written_bytes
            splits[split] = packer
    manifest = {
        "format": "dist-bot-pack",
        "version": FORMAT_VERSION,
        "classes": list(train.classes),
        "source": source,
        "shard_size": shard_size,
        "splits": {},
        "bad_files": [],
    }
    if class_descriptions:
        manifest["class_descriptions"] = class_descriptions
    for split, packer in splits.items():
        manifest["splits"][split] = packer.write_index()
        manifest["bad_files"] += [b for r in packer.done for b in r["bad"]]
        summary.samples[split] = manifest["splits"][split]["samples"]
        summary.shards[split] = len(packer.done)
        if not summary.samples[split]:
            raise DataError(
                f"no readable image in {split_source(source, split)}: nothing to pack (see the bad files above)"
            )
    summary.bad = [tuple(b) for b in manifest["bad_files"]]
    write_json(dst / PACK_FILE, manifest)  # last: from here on, dst is a pack
    shutil.rmtree(progress)
    summary.seconds = time.perf_counter() - t0
    return summary
