"""The DALI loader: JPEG decoding and augmentation on the GPU ("mixed" nvJPEG decoding), or in DALI's
CPU-only mode on hosts without one (``device_id=None``, the same pipeline code).

Training: the exact sharding plan (sharding.py) picks each micro-batch's files; Python reads their bytes
and draws every image's crop, flip and colour jitter from its (seed, epoch, index) seed; DALI decodes only
the crop (``decoders.image_slice``, the fused decode + crop), resizes it, jitters, flips and normalizes.
So a batch is a pure function of (seed, epoch, step): mid-epoch resume is exact, and every process runs
the same number of steps. (DALI's own ``readers.file`` sharding was measured unfit for training here: with
``pad_last_batch`` and a partial last batch, one shard of 97 images in batches of 8 yields an EMPTY last
batch every other epoch, and shards swap halves between epochs.)

Validation: ``fn.readers.file`` sharded by GLOBAL rank (``shard_id``/``num_shards``), ``pad_last_batch``
with ``reader_name`` and a partial last batch, ``stick_to_shard``: each image exactly once over all ranks,
padding never reaches the metrics. Resize the shorter side to size / 0.875, center crop, normalize.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .folder import ImageList
from .sharding import MIN_PER_MICRO_BATCH, PlannedLoader
from .torch_loader import BadImageError, load_rgb, sample_seed
from .transforms import PCA_EIGVAL, PCA_EIGVEC, sample_resized_crop

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


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


# name -> DALI type of each per-sample input the Python side computes
TRAIN_FIELDS = {
    "jpeg": "UINT8",
    "label": "INT64",
    "anchor": "INT32",
    "shape": "INT32",
    "flip": "INT32",
    "twist": "FLOAT",
    "lighting": "FLOAT",
}


def train_fields(cfg) -> list[str]:
    """The external source's outputs; colour jitter's only when it is on (DALI warns about unused ones)."""
    return [f for f in TRAIN_FIELDS if f != "twist" or cfg.data.color_jitter > 0]


class TrainSource:
    """DALI external source: one micro-batch per call, in the order of the epoch's plan, then StopIteration."""

    def __init__(self, images: ImageList, batches: list[tuple[int, ...]], cfg, epoch: int):
        self.images, self.batches, self.cfg, self.epoch = images, batches, cfg, epoch
        self.fields = train_fields(cfg)
        self.i = 0
        self.skipped = 0  # bad images replaced by the next readable one
        self.error: BadImageError | None = None  # DALI wraps errors raised here; the loader re-raises this
        self.last_files: list[str] = []

    def __iter__(self):
        return self

    def read(self, index: int):
        """Bytes, label and the index actually used (a skipped bad image is replaced by the next one)."""
        n = len(self.images)
        for attempt in range(n):
            path, label = self.images.samples[(index + attempt) % n]
            with open(path, "rb") as f:
                data = f.read()
            try:
                return data, label, image_size_of(data, path), path
            except BadImageError as e:
                if not self.cfg.data.skip_bad_images:
                    self.error = e
                    raise
                self.skipped += 1
                log.warning("skipping: %s", e)
        raise BadImageError(f"no readable image in {self.images.root}")

    def __next__(self):
        if self.i >= len(self.batches):
            raise StopIteration
        d = self.cfg.data
        out = {k: [] for k in ("jpeg", "label", "anchor", "shape", "flip", "twist", "lighting")}
        self.last_files = []
        for index in self.batches[self.i]:
            data, label, (w, h), path = self.read(index)
            rng = np.random.default_rng(sample_seed(self.cfg.run.seed, self.epoch, index))
            x, y, cw, ch = sample_resized_crop(w, h, (d.min_crop_area, 1.0), (3 / 4, 4 / 3), rng)
            j = d.color_jitter
            out["jpeg"].append(np.frombuffer(data, dtype=np.uint8))
            out["label"].append(np.array(label, dtype=np.int64))
            out["anchor"].append(np.array([x, y], dtype=np.int32))
            out["shape"].append(np.array([cw, ch], dtype=np.int32))
            out["flip"].append(np.array(int(d.hflip and rng.random() < 0.5), dtype=np.int32))
            out["twist"].append(rng.uniform(1 - j, 1 + j, size=3).astype(np.float32))  # brightness, contrast, sat.
            out["lighting"].append(rng.standard_normal(3).astype(np.float32))
            self.last_files.append(path)
        self.i += 1
        return [out[k] for k in self.fields]


def _pipelines(cfg, device_id, max_batch: int, num_threads: int):
    """The two pipeline definitions; imported lazily so dist_bot runs without DALI installed."""
    from nvidia.dali import fn, pipeline_def, types

    d = cfg.data
    gpu = device_id is not None
    decode_device, op_device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    out_dtype = types.FLOAT16 if cfg.precision == "fp16" else types.FLOAT
    layout = "HWC" if cfg.model.channels_last else "CHW"  # HWC batches are NHWC = channels_last in torch
    mean, std = [255 * m for m in d.mean], [255 * s for s in d.std]

    @pipeline_def(batch_size=max_batch, num_threads=num_threads, device_id=device_id, exec_dynamic=True)
    def train_pipe(source):
        fields = train_fields(cfg)
        nodes = fn.external_source(
            source=source,
            num_outputs=len(fields),
            batch=True,
            cycle="raise",
            dtype=[getattr(types, TRAIN_FIELDS[f]) for f in fields],
        )
        x = dict(zip(fields, nodes, strict=True))
        images = fn.decoders.image_slice(
            x["jpeg"], x["anchor"], x["shape"], device=decode_device, output_type=types.RGB, axis_names="WH"
        )
        images = fn.resize(images, size=[d.image_size, d.image_size], antialias=True, device=op_device)
        if d.color_jitter > 0:
            t = x["twist"]
            images = fn.color_twist(images, brightness=t[0], contrast=t[1], saturation=t[2])
        images = fn.crop_mirror_normalize(
            images, dtype=out_dtype, output_layout=layout, mean=mean, std=std, mirror=x["flip"]
        )
        return images, x["label"], x["lighting"]

    @pipeline_def(batch_size=max_batch, num_threads=num_threads, device_id=device_id, exec_dynamic=True)
    def val_pipe(files, labels, shard_id, num_shards):
        jpeg, label = fn.readers.file(
            files=files,
            labels=labels,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            pad_last_batch=True,
            stick_to_shard=True,
            name="val_reader",
        )
        images = fn.decoders.image(jpeg, device=decode_device, output_type=types.RGB)
        images = fn.resize(
            images, resize_shorter=round(d.image_size / d.val_resize_ratio), antialias=True, device=op_device
        )
        images = fn.crop_mirror_normalize(
            images, dtype=out_dtype, output_layout=layout, mean=mean, std=std, crop=(d.image_size, d.image_size)
        )
        return images, label

    return train_pipe, val_pipe


class DaliLoader(PlannedLoader):
    """The data interface of dist_bot/data/__init__.py, served by DALI."""

    def __init__(self, images: ImageList, cfg, env, train: bool):
        self.device_id = env.device.index if env.device.type == "cuda" else None  # None: CPU-only DALI
        self.num_threads = max(1, cfg.data.workers)
        self._val_pipe = None
        super().__init__(images, cfg, env, train)

    def _val_shard(self) -> tuple[int, int]:
        """DALI's contiguous shard of this rank: [floor(N r / W), floor(N (r + 1) / W))."""
        n, r, w = len(self.images), self.env.rank, self.env.world_size
        return n * r // w, n * (r + 1) // w

    def __len__(self) -> int:
        if self.train:
            return len(self.steps)
        lo, hi = self._val_shard()
        return -(-(hi - lo) // self._val_batch())

    def _val_batch(self) -> int:
        return self.cfg.data.val_batch_size or self.cfg.data.batch_size

    @property
    def samples(self) -> int:
        if self.train:
            return sum(map(len, self.train_batches()))
        lo, hi = self._val_shard()
        return hi - lo

    def _to_torch(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.model.channels_last:  # NHWC from DALI: the same memory as an NCHW channels_last tensor
            images = images.permute(0, 3, 1, 2)
        return images.to(self.device, non_blocking=True)

    def __iter__(self):
        return self._iter_train() if self.train else self._iter_val()

    def _iter_train(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        batches = self.train_batches()
        max_batch = max((len(b) for b in batches), default=1) + MIN_PER_MICRO_BATCH
        source = TrainSource(self.images, batches, self.cfg, self.epoch)
        train_pipe, _ = _pipelines(self.cfg, self.device_id, max_batch, self.num_threads)
        pipe = train_pipe(source, seed=self.cfg.run.seed, prefetch_queue_depth=2)
        pipe.build()
        it = DALIGenericIterator([pipe], ["images", "labels", "lighting"], auto_reset=False)
        std = torch.tensor(self.cfg.data.std).view(1, 3, 1, 1)
        self.bad_images = 0
        while True:
            try:
                (out,) = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                raise source.error or self._name_bad_file(source.last_files, e) from None
            self.bad_images = source.skipped  # complete once the epoch's last batch is out
            x = self._to_torch(out["images"])
            if self.cfg.data.pca_lighting > 0:
                # lighting is added to [0, 1] pixels before normalisation, so shift by rgb / std here
                rgb = (out["lighting"].cpu() * self.cfg.data.pca_lighting * PCA_EIGVAL) @ PCA_EIGVEC.T
                x = x + (rgb.view(-1, 3, 1, 1) / std).to(x.device, x.dtype)
            yield x, out["labels"].view(-1).long().to(self.device, non_blocking=True)

    def _name_bad_file(self, files: list[str], error: Exception) -> Exception:
        """A file whose header reads but whose data DALI cannot decode; skip_bad_images cannot skip it
        (the batch is already in DALI): `dist-bot data check` finds such files before a run."""
        for path in files:  # DALI's error does not say which sample: decode the batch's files to find it
            try:
                load_rgb(path)
            except BadImageError as e:
                return e
        return RuntimeError(f"DALI failed on a batch of {len(files)} images ({files[:3]}...): {error}")

    def _iter_val(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._val_pipe is None:
            files = [p for p, _ in self.images.samples]
            labels = [lbl for _, lbl in self.images.samples]
            _, val_pipe = _pipelines(self.cfg, self.device_id, self._val_batch(), self.num_threads)
            pipe = val_pipe(files, labels, self.env.rank, self.env.world_size, seed=self.cfg.run.seed)
            pipe.build()
            self._val_pipe = DALIGenericIterator(
                [pipe],
                ["images", "labels"],
                reader_name="val_reader",
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=True,
            )
        for (out,) in self._val_pipe:
            labels = out["labels"].view(-1)
            if labels.numel():  # a shard one image shorter ends on an empty (all-padding) batch
                yield self._to_torch(out["images"]), labels.long().to(self.device, non_blocking=True)
