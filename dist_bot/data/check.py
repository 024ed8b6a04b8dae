"""Check an ImageNet-layout folder (``<root>/{train,val}/<class>/<image>``) before a long run.

Training reads each image only when its batch comes up, so a bad file can stop a multi-day run hours in,
and a val image copied from train inflates accuracy without any error at all. This reads every file once,
up front, and reports:

- images that do not decode (truncated, corrupt, not really images, decompression bombs);
- files without an image extension in class folders (the loader ignores them: a warning);
- class folders with no readable image, classes only in val (errors) and train classes without val images
  (a warning: they are just not evaluated);
- files with identical bytes in both train and val (train/val leakage).

A pack (``dist-bot data pack``) is checked the same way, image by image, after checking that its index and its
shards agree: every shard is a tar whose members lie where the index says, with the labels it says.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .source import IMAGE_EXTENSIONS, is_pack, open_pack

SPLITS = ("train", "val")
MAX_LISTED = 20  # per problem section of to_text(); to_dict() has them all


@dataclass
class DatasetReport:
    counts: dict[str, dict[str, int]]  # split -> class -> readable images
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    non_image: list[str] = field(default_factory=list)
    empty_classes: list[tuple[str, str]] = field(default_factory=list)  # (split, class)
    missing_in_val: list[str] = field(default_factory=list)
    extra_in_val: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train path, val path)
    root: str = ""

    @property
    def ok(self) -> bool:
        # non_image and missing_in_val do not break training or bias evaluation, so they only warn.
        return not (self.unreadable or self.empty_classes or self.extra_in_val or self.duplicates)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def to_text(self) -> str:
        lines = [f"dataset {self.root}"]
        for split in SPLITS:
            n = self.counts.get(split, {})
            lines.append(f"  {split}: {sum(n.values())} readable images in {len(n)} classes")
        classes = sorted(set().union(*(self.counts.get(s, {}) for s in SPLITS)))
        width = max([len("class"), *map(len, classes)])
        lines += ["", f"{'class':<{width}} {'train':>8} {'val':>8}"]
        for c in classes:
            train, val = (self.counts.get(s, {}).get(c, "-") for s in SPLITS)
            lines.append(f"{c:<{width}} {train:>8} {val:>8}")
        sections = [
            ("ERROR unreadable images", [f"{p}: {e}" for p, e in self.unreadable]),
            ("ERROR class folders with no readable image", [f"{s}/{c}" for s, c in self.empty_classes]),
            ("ERROR classes in val/ but not in train/", self.extra_in_val),
            ("ERROR identical files in train and val", [f"{t} == {v}" for t, v in self.duplicates]),
            ("warning: train classes with no val images", self.missing_in_val),
            ("warning: non-image files in class folders (ignored by training)", self.non_image),
        ]
        for title, items in sections:
            if items:
                lines += ["", f"{title} ({len(items)}):", *(f"  {x}" for x in items[:MAX_LISTED])]
                if len(items) > MAX_LISTED:
                    lines.append(f"  ... and {len(items) - MAX_LISTED} more")
        lines += ["", "OK" if self.ok else "PROBLEMS FOUND: fix the errors above before training"]
        return "\n".join(lines)


def check_file(path: str) -> tuple[str, str | None]:
    """(sha1 of the bytes, None or why the image does not decode)."""
    return check_bytes(Path(path).read_bytes())  # read once: both the hash and the decode use it


def check_bytes(data: bytes) -> tuple[str, str | None]:
    """(sha1 of an image file's bytes, None or why the image does not decode)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            # The loader turns this warning into an error; warnings filters are process-wide and not
            # thread-safe, so the same limit is checked here directly.
            if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombWarning(f"{im.width}x{im.height} pixels is over Image.MAX_IMAGE_PIXELS")
            im.convert("RGB")  # a full decode: open() alone reads only the header
        error = None
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        error = f"{type(e).__name__}: {e}"[:200]
        if isinstance(e, UnidentifiedImageError):  # its message names the in-memory buffer, not the file
            error = "UnidentifiedImageError: not an image format PIL can read"
    return hashlib.sha1(data).hexdigest(), error


def check_dataset(root: str | Path, workers: int = 8) -> DatasetReport:
    """Decode and hash every image of ``root/train`` and ``root/val`` (a folder or a pack); raises DataError if a
    folder is missing or a pack is unfinished."""
    root = Path(root).expanduser()
    if is_pack(root):
        return check_pack(root, workers)
    layout = "it must hold train/ and val/, each with one sub-folder of images per class (ImageNet layout)"
    if not root.is_dir():
        raise DataError(f"{root} does not exist or is not a folder: {layout}")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root} has no '{split}/' folder: {layout}")

    report = DatasetReport(counts={s: {} for s in SPLITS}, root=str(root))
    files: list[tuple[str, str, str]] = []  # (split, class, path) of every image file
    for split in SPLITS:
        for cdir in sorted(e.path for e in os.scandir(root / split) if e.is_dir()):
            report.counts[split][Path(cdir).name] = 0
            for f in sorted(e.path for e in os.scandir(cdir) if e.is_file()):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((split, Path(cdir).name, f))
                else:
                    report.non_image.append(f)

    # One pool for both splits: decoding is the slow part, and PIL releases the GIL while it decodes.
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(check_file, [f for _, _, f in files]))

    tally(report, files, results)
    return report


def tally(report: DatasetReport, files: list[tuple[str, str, str]], results: list[tuple[str, str | None]]) -> None:
    """Counts, unreadable images, train/val duplicates and class problems from each file's (sha1, error)."""
    train_hashes: dict[str, str] = {}
    for (split, cls, path), (digest, error) in zip(files, results, strict=True):
        if error:
            report.unreadable.append((path, error))
        else:
            report.counts[split][cls] += 1
        if split == "train":
            train_hashes.setdefault(digest, path)
        elif digest in train_hashes:  # train files come first in `files`, so the table is complete here
            report.duplicates.append((train_hashes[digest], path))

    train, val = report.counts["train"], report.counts["val"]
    report.empty_classes = [(s, c) for s in SPLITS for c, n in report.counts[s].items() if n == 0]
    report.missing_in_val = [c for c in train if not val.get(c)]
    report.extra_in_val = [c for c in val if c not in train]


def check_shards(images) -> list[tuple[str, str]]:
    """(shard, problem) wherever a pack's index and its shards disagree: each indexed image must be a member of
    its shard at the indexed offset and size, followed by its ``.cls`` member holding the indexed label."""
    reader, problems = images.reader, []
    for k, name in enumerate(reader.shard_names):
        path = Path(reader.split_dir) / name
        try:
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                found = {m.offset_data: m for m in members}
                cls = {m.name: tar.extractfile(m).read() for m in members if m.name.endswith(".cls")}
        except (OSError, tarfile.TarError) as e:
            problems.append((str(path), f"not a readable tar: {e}"))
            continue
        rows = (reader.index["shard"] == k).nonzero()[0]
        for i in rows.tolist():
            rec = reader.index[i]
            m = found.get(int(rec["offset"]))
            key = m.name.split(".", 1)[0] if m is not None else ""
            if m is None or m.size != int(rec["size"]):
                problems.append((str(path), f"sample {i}: no member at offset {int(rec['offset'])} of {rec['size']} B"))
            elif cls.get(f"{key}.cls") != str(int(rec["label"])).encode():
                problems.append((str(path), f"sample {i} ({m.name}): its .cls does not hold label {rec['label']}"))
    return problems


def check_pack(root: Path, workers: int = 8) -> DatasetReport:
    """``check_dataset`` of a pack: its index against its shards, then every image decoded and hashed. A sample is
    named by its source file; index problems are listed as unreadable (shard, problem)."""
    train, val = open_pack(root)
    report = DatasetReport(counts={s: dict.fromkeys(train.classes, 0) for s in SPLITS}, root=str(root))
    files, reads = [], []
    for split, images in (("train", train), ("val", val)):
        report.unreadable += check_shards(images)
        for i, (path, label) in enumerate(images.samples):
            files.append((split, images.classes[label], path))
            reads.append((images, i))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: check_bytes(r[0].read(r[1])), reads))
    in_val = {cls for _, cls, _ in files[len(train) :]}
    report.counts["val"] = {c: 0 for c in train.classes if c in in_val}  # as a folder's val: classes it has
    tally(report, files, results)
    return report
