"""What the DALI training pipeline is fed: each micro-batch's file bytes, labels and augmentation parameters.

``TrainFeeder`` is a pure function of DALI's iteration -> that micro-batch of the exact plan (plan.py,
epoch after epoch): it looks the micro-batch up, reads its files, parses their headers and draws every image's crop,
flip, colour jitter and lighting from the image's own seed (``plan.draw``). DALI runs it ahead of the training
thread in its parallel external source workers (``data.dali_py_workers`` processes), or in the training thread
itself when that is 0. The result is the same either way, and whatever the number of workers.

No torch here: each worker imports this module, and starts in about a second instead of six.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import BadImageError
from .folder import ImageList, SampleReader, first_readable, image_size_of, read_sample
from .plan import EpochStream, draw, lighting_rgb

# name -> DALI type of each per-sample field the feeder computes, in the order of its outputs
FIELDS = {
    "jpeg": "UINT8",  # the file's bytes (any format DALI decodes)
    "label": "INT64",
    "anchor": "INT32",  # crop corner (x, y) in pixels
    "shape": "INT32",  # crop (width, height)
    "flip": "INT32",  # 1: mirror horizontally
    "twist": "FLOAT",  # brightness, contrast, saturation factors (colour jitter)
    "mean": "FLOAT",  # the normalisation mean, shifted by the image's PCA lighting noise (0-255 units)
    "ok": "UINT8",  # 0: the planned file was unreadable and skipped (data.skip_bad_images)
}


def feeder_fields(data) -> list[str]:
    """The fields a config needs: colour jitter's and lighting's only when they are on (DALI warns about unused
    outputs, and a constant mean is cheaper than a per-image one)."""
    off = {"twist": data.color_jitter <= 0, "mean": data.pca_lighting <= 0}
    return [f for f in FIELDS if not off.get(f, False)]


@dataclass(frozen=True)
class FileList:
    """A split's files as a few flat arrays, pickled to every DALI worker: ImageNet's 1.28 M files take about 60 MB
    and 0.1 s to pickle and load (measured), where the tuple of 1.28 M (path, label) tuples takes 1.8 s."""

    root: str
    names: bytes  # the paths relative to root, file-system encoded, concatenated
    offsets: np.ndarray  # int64 (n + 1,): path i is names[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64 (n,)
    reader: SampleReader | None = None  # a pack's (shards.py): the bytes come from its shards, paths name them

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


class ValFeeder:
    """DALI's external source for validating a pack: ``BatchInfo(iteration)`` -> (bytes, labels) of batch
    ``iteration % batches`` of the rank's contiguous shard [lo, hi) in batches of ``batch``, the shard of the folder
    path's ``readers.file`` (each image exactly once over all ranks, no padding). Cycling, the pipeline reads
    ahead into the next pass as a reader would."""

    def __init__(self, files: FileList, lo: int, hi: int, batch: int):
        self.files, self.lo, self.hi, self.batch = files, lo, hi, batch
        self.batches = -(-(hi - lo) // batch)

    def __call__(self, info) -> list:
        first = self.lo + (info.iteration % self.batches) * self.batch
        indices = range(first, min(self.hi, first + self.batch))
        jpegs = [np.frombuffer(self.files.read(i), dtype=np.uint8) for i in indices]
        return [jpegs, self.files.labels[first : first + len(indices)]]


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent dies. A DALI worker otherwise outlives a training process
    killed with SIGKILL (the OOM killer, a node's cleanup), forever: nothing in it watches its parent, and its
    blocked SIGTERM (preemption_signals_blocked) leaves only SIGKILL to end it. Linux sends it when the THREAD
    that started the worker ends: the training thread, which builds the pipeline and lives as long as the run."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request: nobody will send the signal
        os._exit(1)


class TrainFeeder:
    """DALI's external source for training: ``BatchInfo(iteration, epoch_idx)`` -> the fields of micro-batch
    ``iteration`` of an EpochStream (plan.py): the epoch ``first_epoch`` from ``first_step``, then every
    following epoch, without end, so DALI reads ahead across an epoch's end (the loader takes each epoch's
    micro-batches from it, one epoch after another).

    Batch mode, because per-sample mode (``batch=False``) cannot feed the plan: the pipeline's batch size is fixed
    there, and the plan's micro-batches vary in size (an epoch's last step is shorter, or folded into the one
    before it)."""

    def __init__(self, files: FileList, planner, cfg, first_epoch: int, first_step: int):
        d = cfg.data
        self.files = files
        self.stream = EpochStream(planner, first_epoch, first_step)  # planner(epoch=e) -> epoch e's steps
        self.seed, self.skip_bad = cfg.run.seed, d.skip_bad_images
        self.min_crop_area, self.hflip, self.color_jitter = d.min_crop_area, d.hflip, d.color_jitter
        self.pca_lighting, self.mean = d.pca_lighting, np.asarray(d.mean, dtype=np.float64)
        self.fields = feeder_fields(d)
        self.parent_pid = os.getpid()

    def __call__(self, info) -> list:
        return self.batch(*self.stream[info.iteration])

    def batch(self, epoch: int, indices: tuple[int, ...]) -> list:
        n, j = len(indices), self.color_jitter
        jpegs, labels, ok = [], np.empty(n, np.int64), np.empty(n, np.uint8)
        anchor, shape, flip = np.empty((n, 2), np.int32), np.empty((n, 2), np.int32), np.zeros(n, np.int32)
        twist, alpha = np.empty((n, 3), np.float32), np.empty((n, 3))
        for k, index in enumerate(indices):
            data, labels[k], (w, h), skipped = read_image(self.files, index, self.skip_bad)
            ok[k] = skipped == 0
            # the draw of the planned index, applied to the image read (the next readable one, if skipped)
            d = draw(self.seed, epoch, index, w, h, self.min_crop_area, self.hflip, j)
            anchor[k], shape[k], flip[k], twist[k], alpha[k] = d.box[:2], d.box[2:], d.flip, d.twist, d.alpha
            jpegs.append(np.frombuffer(data, dtype=np.uint8))
        # Lighting adds rgb to [0, 1] pixels before normalisation: (x / 255 + rgb - mean) / std is normalisation
        # by a per-image mean of 255 (mean - rgb), which the pipeline's crop_mirror_normalize takes as is.
        mean = (255 * (self.mean - lighting_rgb(alpha * self.pca_lighting))).astype(np.float32)
        out = {"jpeg": jpegs, "label": labels, "anchor": anchor, "shape": shape, "flip": flip, "twist": twist}
        out |= {"mean": mean, "ok": ok}
        return [out[f] for f in self.fields]

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:  # unpickled in a DALI worker, as it starts
            die_with_parent(self.parent_pid)
