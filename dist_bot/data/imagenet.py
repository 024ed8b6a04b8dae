"""``dist-bot data imagenet TRAIN_TAR VAL_TAR DEVKIT OUT``: a pack (pack.py, read by both loaders) straight from
ImageNet's official archives, read where they lie: no image is extracted to disk (1.28 M small files, written and
read again, are what hurts a shared file system).

    ILSVRC2012_img_train.tar      one tar per synset (n01440764.tar, ...), each holding that class's JPEGs
    ILSVRC2012_img_val.tar        50,000 JPEGs, flat (ILSVRC2012_val_00000001.JPEG, ...)
    ILSVRC2012_devkit_t12.tar.gz  data/meta.mat (the synsets), data/ILSVRC2012_validation_ground_truth.txt

Classes are the leaf synsets' WNIDs in sorted order: the label order of torchvision's and timm's ImageNet models.
The WNIDs are the class names that checkpoints, `predict` and exports carry; the devkit's words ("tench, Tinca
tinca") are kept as their descriptions (pack.json's class_descriptions). A val image's label is its line of the
ground truth, an ILSVRC2012_ID, mapped to a WNID through meta.mat: the IDs are not in WNID order. The samples and
their order are those of `dist-bot data pack` of the archives extracted as train/<wnid>/ and val/<wnid>/ (the
layout of ImageNet's valprep.sh), so a run may move between the two.

The archives' headers are read first (tarfile, which seeks over the data), which gives each image's offset and
size inside its archive; then pack.py reads the images with one pread each, from its threads, decodes each to
check it, and writes the shards in order. Every count is checked against the devkit before anything is packed
(each class has the devkit's number of training images, each val image a ground-truth label and each label an
image); a mismatch is named. Resumable and atomic as `data pack` is; odd files (CMYK JPEGs, a PNG named .JPEG) are
packed as they are, and the loaders decode them (as `data pack` does).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, UserError
from .pack import PackSummary, check_shard_size, pack_splits
from .source import ImageList

META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
LISTED = 5  # mismatches named in an error; the count says how many more


@dataclass(frozen=True)
class Devkit:
    wnids: tuple[str, ...]  # the leaf synsets, sorted: label i is wnids[i]
    words: dict[str, str]  # wnid -> the devkit's words for it
    train_images: dict[str, int]  # wnid -> the training images the devkit says it has
    val_wnids: tuple[str, ...]  # val image k (ILSVRC2012_val_{k:08d}.JPEG, k from 1) -> its wnid


def read_devkit(path: str | Path) -> Devkit:
    """The classes and val labels of ILSVRC2012_devkit_t12.tar.gz (meta.mat read with scipy.io, as torchvision
    reads it)."""
    files = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                for want in (META, GROUND_TRUTH):
                    if m.isfile() and (m.name == want or m.name.endswith("/" + want)):
                        files[want] = tar.extractfile(m).read()
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot read the devkit {path} ({e}): pass ILSVRC2012_devkit_t12.tar.gz") from None
    missing = [f for f in (META, GROUND_TRUTH) if f not in files]
    if missing:
        raise DataError(
            f"the devkit {path} has no {' and no '.join(missing)}: it is not ILSVRC2012's devkit; pass "
            "ILSVRC2012_devkit_t12.tar.gz (image-net.org, 'Development kit (Task 1 & 2)')"
        )
    try:
        import scipy.io
    except ImportError:
        raise UserError("reading the devkit's meta.mat needs scipy: pip install 'dist-bot[imagenet]'") from None
    try:
        synsets = scipy.io.loadmat(io.BytesIO(files[META]), squeeze_me=True)["synsets"]
    except Exception as e:
        raise DataError(f"cannot read {META} of {path} ({type(e).__name__}: {e}): the devkit is damaged") from None
    fields = synsets.dtype.names or ()
    if "ILSVRC2012_ID" not in fields or "WNID" not in fields:
        other = [f for f in fields if f.startswith("ILSVRC")]
        raise DataError(
            f"{META} of {path} has no ILSVRC2012_ID ({', '.join(other) or 'no ILSVRC ids'} instead): a devkit of "
            "another year; pass ILSVRC2012_devkit_t12.tar.gz"
        )
    leaves = np.atleast_1d(synsets)[np.atleast_1d(synsets["num_children"]).astype(int) == 0]
    wnids = [str(w) for w in leaves["WNID"]]
    wnid_of = dict(zip((int(i) for i in leaves["ILSVRC2012_ID"]), wnids, strict=True))
    val = []
    for line, token in enumerate(files[GROUND_TRUTH].decode().split(), 1):
        wnid = wnid_of.get(int(token))
        if wnid is None:
            raise DataError(
                f"line {line} of {GROUND_TRUTH} in {path} is ILSVRC2012_ID {token}, which is no class of {META}: "
                "the devkit is damaged; download it again"
            )
        val.append(wnid)
    return Devkit(
        tuple(sorted(wnids)),
        dict(zip(wnids, (str(w) for w in leaves["words"]), strict=True)),
        dict(zip(wnids, (int(n) for n in leaves["num_train_images"]), strict=True)),
        tuple(val),
    )


class ArchiveReader:
    """Sample i's bytes: one pread from the archive at (offset, size). The file stays open for the reader's life;
    pread takes no file position, so the packer's threads share it."""

    def __init__(self, path: str, offsets: np.ndarray, sizes: np.ndarray):
        self.path, self.offsets, self.sizes = path, offsets, sizes
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, i: int) -> bytes:
        size = int(self.sizes[i])
        data = os.pread(self._fd, size, int(self.offsets[i]))
        if len(data) != size:
            raise DataError(f"{self.path} ends inside image {i}: the archive is truncated; download it again")
        return data

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def open_archive(path: Path, what: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")  # ILSVRC's archives are plain tars: one seek per member, no decompression
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot read {path} as a tar archive ({e}): pass {what}") from None


def image_list(path: Path, devkit: Devkit, rows: list[tuple[str, str, int, int]]) -> ImageList:
    """(wnid, file name, offset, size) rows as an ImageList over the archive, in the order of a scanned folder."""
    rows.sort()
    label = {w: i for i, w in enumerate(devkit.wnids)}
    offsets = np.array([r[2] for r in rows], dtype=np.int64)
    sizes = np.array([r[3] for r in rows], dtype=np.int64)
    samples = tuple((f"{path}/{wnid}/{name}", label[wnid]) for wnid, name, _, _ in rows)
    return ImageList(path, devkit.wnids, samples, ArchiveReader(str(path), offsets, sizes))


def mismatch(items: list[str]) -> str:
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return "; ".join(items[:LISTED]) + more


def train_list(path: Path, devkit: Devkit) -> ImageList:
    """The training images of ILSVRC2012_img_train.tar: a tar of one tar per synset."""
    rows, counts = [], dict.fromkeys(devkit.wnids, 0)
    with open_archive(path, "ILSVRC2012_img_train.tar") as outer:
        for m in outer:
            if not m.isfile():
                continue
            wnid, ext = os.path.splitext(os.path.basename(m.name))
            if ext != ".tar":
                raise DataError(
                    f"{path} holds {m.name}, where ILSVRC2012_img_train.tar holds one tar per synset: pass the "
                    "training archive (is this the val archive?)"
                )
            if wnid not in counts:
                raise DataError(
                    f"{path} holds {m.name}, a synset that is no class of the devkit: the archive and the devkit "
                    "are not both ILSVRC2012's"
                )
            with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as inner:
                for im in inner:
                    if im.isfile():  # offsets inside the inner tar, which starts at m.offset_data
                        rows.append((wnid, os.path.basename(im.name), m.offset_data + im.offset_data, im.size))
                        counts[wnid] += 1
    wrong = [f"{w}: {n} images, the devkit says {k}" for w, n in counts.items() if n != (k := devkit.train_images[w])]
    if wrong:
        raise DataError(
            f"{path} does not hold the devkit's training images ({mismatch(wrong)}): the archive is incomplete "
            "(download it again) or not ILSVRC2012's"
        )
    return image_list(path, devkit, rows)


def val_list(path: Path, devkit: Devkit) -> ImageList:
    """The val images of ILSVRC2012_img_val.tar (flat), each labelled by the devkit's ground truth."""
    rows, seen = [], set()
    with open_archive(path, "ILSVRC2012_img_val.tar") as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = os.path.basename(m.name)
            found = VAL_NAME.fullmatch(name)
            if found is None:
                raise DataError(
                    f"{path} holds {m.name}, where ILSVRC2012_img_val.tar holds ILSVRC2012_val_NNNNNNNN.JPEG files: "
                    "pass the val archive (is this the training archive?)"
                )
            k = int(found.group(1))
            if not 1 <= k <= len(devkit.val_wnids):
                raise DataError(
                    f"{path} holds {name}, but the devkit's ground truth labels {len(devkit.val_wnids)} val images: "
                    "every val image needs a label; the archive and the devkit are not both ILSVRC2012's"
                )
            rows.append((devkit.val_wnids[k - 1], name, m.offset_data, m.size))
            seen.add(k)
    if len(seen) != len(devkit.val_wnids):
        absent = [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, len(devkit.val_wnids) + 1) if k not in seen]
        raise DataError(
            f"{path} has {len(seen)} val images, the devkit's ground truth labels {len(devkit.val_wnids)} (missing "
            f"{mismatch(absent)}): the archive is incomplete; download it again"
        )
    return image_list(path, devkit, rows)


def write_imagenet_pack(
    train_tar: str | Path,
    val_tar: str | Path,
    devkit: str | Path,
    dst: str | Path,
    shard_size: int = 1 << 30,
    workers: int = 8,
) -> PackSummary:
    """Pack ImageNet's official archives into ``dst``; the same arguments resume an interrupted pack."""
    check_shard_size(shard_size)
    paths = {k: Path(p).expanduser().resolve() for k, p in (("train", train_tar), ("val", val_tar), ("devkit", devkit))}
    for what, p in paths.items():
        if not p.is_file():
            raise DataError(f"{p} does not exist: pass the {what} archive (data imagenet TRAIN_TAR VAL_TAR DEVKIT OUT)")
    kit = read_devkit(paths["devkit"])
    train, val = train_list(paths["train"], kit), val_list(paths["val"], kit)
    source = {k: str(p) for k, p in paths.items()}
    return pack_splits(train, val, dst, source, shard_size, workers, class_descriptions=kit.words)
