"""The DALI loader: JPEG decoding and augmentation on the GPU ("mixed" nvJPEG decoding), or in DALI's
CPU-only mode on hosts without one (``device_id=None``, the same pipeline code).

Training: the plan (plan.py) picks each micro-batch's files; ``TrainFeeder`` (below) reads their bytes
(source.py) and draws every image's crop, flip, colour jitter and lighting from its (seed, epoch, index)
seed, in DALI's parallel external source workers (``data.dali_py_workers`` Python processes), ahead of the
training thread; DALI decodes only the crop (``decoders.image_slice``, the fused decode + crop), resizes it,
jitters, flips, adds the lighting and normalizes. So a batch is a pure function of (seed, epoch, step): mid-epoch
resume is exact, and every process runs the same number of steps. One pipeline, with its workers, serves
consecutive epochs, reading ahead across their ends; any other ``set_epoch`` (a resumed epoch, an abandoned one,
another order) builds a new one.
(DALI's own ``readers.file`` sharding was measured unfit for training here: with ``pad_last_batch`` and a
partial last batch, one shard of 97 images in batches of 8 yields an EMPTY last batch every other epoch, and
shards swap halves between epochs.)

Nothing here waits for the device per batch: the labels go to the GPU inside the pipeline, the lighting is part
of its normalisation, and the skipped-image flags stay on the CPU, unread until ``bad_images`` is.

Validation: ``fn.readers.file`` sharded by GLOBAL rank (``shard_id``/``num_shards``), ``pad_last_batch``
with ``reader_name`` and a partial last batch, ``stick_to_shard``: each image exactly once over all ranks,
padding never reaches the metrics. Resize the shorter side to size / 0.875, center crop, normalize. A pack
(source.py) is read by index instead (``ValFeeder``): the same contiguous shard per rank, in exact batches.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadImageError
from ..signals import helpers_shielded
from .loader import PlannedLoader, dali_py_workers, decode_workers, train_augmentation, train_sizes, val_size
from .plan import (
    AUGMENT_BINS,
    AUGMENT_SUITES,
    MIN_PER_MICRO_BATCH,
    EpochStream,
    augment_slots,
    draw,
    eval_shard,
    lighting_rgb,
    serve,
)
from .source import FileList, ImageList, load_rgb, read_image, unreadable_from

if TYPE_CHECKING:
    import torch

# No torch at import: each of DALI's Python workers imports this module (for the feeder), and starts in about a
# second instead of six. DaliLoader imports it where it runs, in the training process.

# -- what the training pipeline is fed -----------------------------------------------------------------------

# name -> DALI type of each per-sample field the feeder computes, in the order of its outputs
FIELDS = {
    "jpeg": "UINT8",  # the file's bytes (any format DALI decodes)
    "label": "INT64",
    "anchor": "INT32",  # crop corner (x, y) in pixels
    "shape": "INT32",  # crop (width, height)
    "flip": "INT32",  # 1: mirror horizontally
    "size": "FLOAT",  # the output's (width, height): the epoch's under progressive resizing (data.progressive)
    "interp": "INT32",  # the resize's DALIInterpType: 1 linear, 2 cubic (data.interpolation)
    "aa_op": "INT32",  # data.auto_augment: each slot's operation (its index in plan.AUGMENT_SUITES[suite]) ...
    "aa_bin": "INT32",  # ... magnitude bin ...
    "aa_sign": "INT32",  # ... and sign (1: negated)
    "erase_anchor": "FLOAT",  # random erasing's (y, x) in the output ...
    "erase_shape": "FLOAT",  # ... and (height, width); 0: none
    "twist": "FLOAT",  # brightness, contrast, saturation factors (colour jitter)
    "mean": "FLOAT",  # the normalisation mean, shifted by the image's PCA lighting noise (0-255 units)
    "ok": "UINT8",  # 0: the planned file was unreadable and skipped (data.skip_bad_images)
}


def feeder_fields(data) -> list[str]:
    """The fields a config needs: colour jitter's and lighting's only when they are on (DALI warns about unused
    outputs, and a constant mean is cheaper than a per-image one)."""
    aa, erase = data.auto_augment == "none", data.random_erasing <= 0
    off = {"twist": data.color_jitter <= 0, "mean": data.pca_lighting <= 0, "size": data.progressive.min_size is None}
    off |= {"interp": data.interpolation == "bilinear", "aa_op": aa, "aa_bin": aa, "aa_sign": aa}
    off |= {"erase_anchor": erase, "erase_shape": erase}
    return [f for f in FIELDS if not off.get(f, False)]


def dali_suite(name: str) -> list:
    """DALI's augmentations of data.auto_augment ``name``, in plan.AUGMENT_SUITES's order (its operation indices)."""
    from nvidia.dali.auto_aug import augmentations, auto_augment, rand_augment, trivial_augment

    if name == "rand":
        suite = rand_augment.get_rand_augment_suite(use_shape=True)
    elif name == "trivial":
        suite = trivial_augment.get_trivial_augment_wide_suite(use_shape=True)
    else:
        suite = [*auto_augment.get_image_net_policy(use_shape=True).augmentations.values(), augmentations.identity]
    by_name = {aug.name: aug for aug in suite}
    return [current_ops(by_name[op[0]]) for op in AUGMENT_SUITES[name]]


def _filter(data, kernel):
    from nvidia.dali import fn

    return fn.filter(data, kernel)


def _equalize(data, _):
    from nvidia.dali import fn

    return fn.equalize(data)


def current_ops(aug):
    """DALI 2.4's sharpness and equalize call fn.experimental.filter and fn.experimental.equalize, which warn that
    they moved (once per process, in every training log): the same augmentation on fn.filter and fn.equalize."""
    from nvidia.dali.auto_aug.core._augmentation import Augmentation

    op = {"sharpness": _filter, "equalize": _equalize}.get(aug.name)
    return aug if op is None else Augmentation(op, **(aug._get_config() | {"name": aug.name}))


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
        self.augmentation = train_augmentation(d)
        self.pca_lighting, self.mean = d.pca_lighting, np.asarray(d.mean, dtype=np.float64)
        self.fields = feeder_fields(d)
        self.sizes = train_sizes(cfg)
        self.parent_pid = os.getpid()

    def __call__(self, info) -> list:
        return self.batch(*self.stream[info.iteration])

    def batch(self, epoch: int, indices: tuple[int, ...]) -> list:
        n, size, slots = len(indices), self.sizes(epoch), augment_slots(self.augmentation)
        jpegs, labels, ok = [], np.empty(n, np.int64), np.empty(n, np.uint8)
        anchor, shape, flip = np.empty((n, 2), np.int32), np.empty((n, 2), np.int32), np.zeros(n, np.int32)
        twist, alpha, interp = np.empty((n, 3), np.float32), np.empty((n, 3)), np.empty(n, np.int32)
        ops, erase = np.zeros((n, slots, 3), np.int32), np.zeros((n, 4), np.float32)
        for k, index in enumerate(indices):
            data, labels[k], (w, h), skipped = read_image(self.files, index, self.skip_bad)
            ok[k] = skipped == 0
            # the draw of the planned index, applied to the image read (the next readable one, if skipped)
            d = draw(self.seed, epoch, index, w, h, self.augmentation, size)
            anchor[k], shape[k], flip[k], twist[k], alpha[k] = d.box[:2], d.box[2:], d.flip, d.twist, d.alpha
            interp[k], erase[k] = 2 if d.bicubic else 1, d.erase  # DALIInterpType: INTERP_CUBIC 2, INTERP_LINEAR 1
            if slots:
                ops[k] = d.ops
            jpegs.append(np.frombuffer(data, dtype=np.uint8))
        # Lighting adds rgb to [0, 1] pixels before normalisation: (x / 255 + rgb - mean) / std is normalisation
        # by a per-image mean of 255 (mean - rgb), which the pipeline's crop_mirror_normalize takes as is.
        mean = (255 * (self.mean - lighting_rgb(alpha * self.pca_lighting))).astype(np.float32)
        out = {"jpeg": jpegs, "label": labels, "anchor": anchor, "shape": shape, "flip": flip, "twist": twist}
        out |= {"mean": mean, "ok": ok, "size": np.full((n, 2), size, np.float32), "interp": interp}
        aa_op, aa_bin, aa_sign = (np.ascontiguousarray(ops[:, :, f]) for f in range(3))  # DALI takes dense arrays
        out |= {"aa_op": aa_op, "aa_bin": aa_bin, "aa_sign": aa_sign}
        anchor_yx, shape_hw = np.ascontiguousarray(erase[:, [1, 0]]), np.ascontiguousarray(erase[:, [3, 2]])
        out |= {"erase_anchor": anchor_yx, "erase_shape": shape_hw}  # (x, y, w, h) -> (y, x), (h, w)
        return [out[f] for f in self.fields]

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:  # unpickled in a DALI worker, as it starts
            die_with_parent(self.parent_pid)


# -- the pipelines and the loader ----------------------------------------------------------------------------

log = logging.getLogger(__name__)

PIPELINE_PREFETCH = 2  # pipeline iterations run ahead of the training thread
TRAIN_OUTPUTS = ["images", "labels", "ok"]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _pipelines(cfg, device_id, max_batch: int, num_threads: int, py_workers: int = 0):
    """The two pipeline definitions; imported lazily so dist_bot runs without DALI installed."""
    from nvidia.dali import fn, pipeline_def, types

    d = cfg.data
    gpu = device_id is not None
    decode_device, op_device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    out_dtype = types.FLOAT16 if cfg.precision == "fp16" else types.FLOAT
    layout = "HWC" if cfg.model.channels_last else "CHW"  # HWC batches are NHWC = channels_last in torch
    mean, std = [255 * m for m in d.mean], [255 * s for s in d.std]
    # nvJPEG's buffers preallocated for ImageNet's largest image, as NVIDIA's ResNet-50 example sets them: a
    # large image then does not reallocate (and stall) the decoder mid-run
    decoder = {}
    if gpu:
        decoder = {
            "device_memory_padding": 211025920,
            "host_memory_padding": 140544512,
            "preallocate_width_hint": 5980,
            "preallocate_height_hint": 6430,
        }
        if d.dali_hw_decoder_load is not None:
            decoder["hw_decoder_load"] = d.dali_hw_decoder_load

    # Python workers are spawned, never forked: CUDA is initialised before the pipeline on GPU hosts, and a
    # fork while gloo or OpenMP threads hold locks can deadlock the child.
    @pipeline_def(
        batch_size=max_batch,
        num_threads=num_threads,
        device_id=device_id,
        exec_dynamic=True,
        py_num_workers=max(1, py_workers),
        py_start_method="spawn",
        enable_conditionals=d.auto_augment != "none",  # select() splits the batch by each image's operation
    )
    def train_pipe(feeder: TrainFeeder):
        # Each worker computes whole micro-batches (batch mode: see TrainFeeder); one more in flight than
        # workers keeps them all busy.
        parallel = {"parallel": True, "prefetch_queue_depth": py_workers + 1} if py_workers else {}
        nodes = fn.external_source(
            source=feeder,
            num_outputs=len(feeder.fields),
            batch=True,
            batch_info=True,
            dtype=[getattr(types, FIELDS[f]) for f in feeder.fields],
            **parallel,
        )
        x = {field: nodes[k] for k, field in enumerate(feeder.fields)}  # (DALI's conditionals' zip takes no strict)
        images = fn.decoders.image_slice(
            x["jpeg"], x["anchor"], x["shape"], device=decode_device, output_type=types.RGB, axis_names="WH", **decoder
        )
        size = x.get("size", [d.image_size, d.image_size])  # per image under progressive resizing
        interp = fn.cast(x["interp"], dtype=types.INTERP_TYPE) if "interp" in x else types.INTERP_LINEAR
        images = fn.resize(images, size=size, antialias=True, interp_type=interp, device=op_device)
        if "aa_op" in x:
            images = auto_augment(images, x, d)
        if "twist" in x:
            t = x["twist"]
            images = fn.color_twist(images, brightness=t[0], contrast=t[1], saturation=t[2])
        images = fn.crop_mirror_normalize(  # a per-image mean when lighting is on (TrainFeeder.batch)
            images, dtype=out_dtype, output_layout=layout, mean=x.get("mean", mean), std=std, mirror=x["flip"]
        )
        if "erase_shape" in x:  # after normalisation: the mean, as torchvision's RandomErasing(value=0)
            images = fn.erase(images, anchor=x["erase_anchor"], shape=x["erase_shape"], axis_names="HW", fill_value=0)
        labels = x["label"].gpu() if gpu else x["label"]
        return images, labels, x["ok"]  # ok stays on the CPU: it is counted there, without waiting for the GPU

    def val_images(jpeg):
        images = fn.decoders.image(jpeg, device=decode_device, output_type=types.RGB, **decoder)
        crop = val_size(d)
        interp = types.INTERP_CUBIC if d.val_interpolation == "bicubic" else types.INTERP_LINEAR
        shorter = round(crop / d.val_resize_ratio)
        images = fn.resize(images, resize_shorter=shorter, antialias=True, interp_type=interp, device=op_device)
        return fn.crop_mirror_normalize(
            images, dtype=out_dtype, output_layout=layout, mean=mean, std=std, crop=(crop, crop)
        )

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
        return val_images(jpeg), label.gpu() if gpu else label

    @pipeline_def(batch_size=max_batch, num_threads=num_threads, device_id=device_id, exec_dynamic=True)
    def val_pack_pipe(feeder: ValFeeder):
        # a pack's images are read by index from its shards (ValFeeder): DALI's readers.webdataset shards by
        # its own rules, and its labels would be the .cls text
        jpeg, label = fn.external_source(
            source=feeder, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT64]
        )
        return val_images(jpeg), label.gpu() if gpu else label

    return train_pipe, val_pipe, val_pack_pipe


def auto_augment(images, x: dict, data):
    """data.auto_augment on the resized uint8 HWC crops: each slot applies every image's drawn operation at its
    drawn magnitude bin and sign (the feeder's aa_op, aa_bin, aa_sign: plan.draw_ops), through DALI's own
    augmentations and its select(), which splits the batch by operation (DALI's conditionals)."""
    from nvidia.dali.auto_aug.core import _select, signed_bin

    suite, shape = dali_suite(data.auto_augment), images.shape()
    for k in range(augment_slots(train_augmentation(data))):
        magnitude = signed_bin(x["aa_bin"][k], random_sign=x["aa_sign"][k])
        images = _select.select(
            suite,
            x["aa_op"][k],
            images,
            magnitude_bin=magnitude,
            num_magnitude_bins=AUGMENT_BINS[data.auto_augment],
            shape=shape,
            fill_value=128,
        )
    return images


@dataclass
class _Feed:
    """A built training pipeline, fed by one TrainFeeder's endless stream of micro-batches."""

    pipe: Any
    it: Any  # DALIGenericIterator over pipe
    feeder: TrainFeeder
    served: int = 0  # micro-batches taken from it so far


class DaliLoader(PlannedLoader):
    """The ``Loader`` contract (loader.py), served by DALI."""

    def __init__(self, images: ImageList, cfg, env, train: bool):
        import torch

        dev = env.device
        self.device_id = None  # CPU-only DALI
        if dev.type == "cuda":
            self.device_id = dev.index if dev.index is not None else torch.cuda.current_device()
        self.workers = max(1, decode_workers(cfg, env))  # DALI's CPU threads
        self.py_workers = dali_py_workers(cfg, env) if train else 0
        # batches made ahead of the training thread: the pipeline's queue, and the Python workers' one more each
        self.prefetch_batches = PIPELINE_PREFETCH + (self.py_workers + 1 if self.py_workers else 0)
        self._val_pipe = None
        self._feed: _Feed | None = None
        self._files: FileList | None = None  # the training split, compact, for the feeder
        self._epoch_batches: list[tuple[int, ...]] = []  # the micro-batches being served
        self._flags: list[torch.Tensor] = []  # "ok" outputs (CPU) not yet counted into _bad ...
        self._flagged = 0  # ... of the micro-batches from this one on
        super().__init__(images, cfg, env, train)

    @property
    def bad_images(self) -> int:
        """Unreadable images skipped so far this epoch. The feeder only flags them (``ok`` 0, an output on the CPU
        that no batch waits for): reading this counts them, and names their files in the log."""
        if self._flags:
            import torch

            flags = torch.cat(self._flags)
            batches = self._epoch_batches[self._flagged : self._flagged + len(self._flags)]
            self._flags, self._flagged = [], self._flagged + len(self._flags)
            planned = [i for b in batches for i in b]
            for pos in (flags == 0).nonzero().flatten().tolist():
                self._bad += 1
                for error in unreadable_from(self._files, planned[pos]):
                    log.warning("skipping: %s", error)
        return self._bad

    def _to_torch(self, images: torch.Tensor) -> torch.Tensor:
        """DALI's output, already on this process's device, as the model takes it."""
        if self.cfg.model.channels_last:  # NHWC from DALI: the same memory as an NCHW channels_last tensor
            images = images.permute(0, 3, 1, 2)
        return images

    def __iter__(self):
        """This epoch's steps (training) or batches. Training takes them from one pipeline fed by an endless stream
        of epochs, kept from one epoch to the next (DALI reads and decodes ahead across an epoch's end, its workers
        keep running); a new pipeline is built only for a resume, an abandoned epoch or an epoch out of order. Set
        up here, at iter(), not at the first next() (which the engine calls inside a training step)."""
        if not self.train:
            return self._iter_val()
        batches = self.train_batches()
        self._bad, self._epoch_batches, self._flags, self._flagged = 0, batches, [], 0
        if not self.stream_continues() or self._feed is None:
            self._feed = None  # the old pipeline and its workers end as it is collected, before new ones start
            self._feed = self._build_feed()
        self._token = token = object()
        return serve(self.steps[self.start_step :], self._deliver(self._feed, len(batches), token))

    def close(self) -> None:
        super().close()
        self._feed = self._val_pipe = None  # the pipelines and their workers end as they are collected

    def _deliver(self, feed: _Feed, count: int, token: object):
        if count == 0:
            self.stream_served()
        for k in range(count):
            if self._token is not token:
                raise RuntimeError("a DaliLoader iterator was resumed after a later iter(): use one at a time")
            (out,) = self._guarded(feed.it.__next__, feed.feeder.stream, feed.served)
            feed.served += 1
            self._flags.append(out["ok"].clone())  # a copy: DALI's buffer is not held until bad_images is read
            if k == count - 1:  # the engine takes exactly the plan's batches: it never asks past the last
                self.stream_served()
            yield self._to_torch(out["images"]), out["labels"].view(-1)

    def _build_feed(self) -> _Feed:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self._files is None:
            self._files = FileList.of(self.images)
        feeder = TrainFeeder(self._files, self.planner(), self.cfg, self.epoch, self.start_step)
        max_batch = self.cfg.data.batch_size + MIN_PER_MICRO_BATCH  # any epoch's largest (see plan_epoch)
        train_pipe, _, _ = _pipelines(self.cfg, self.device_id, max_batch, self.workers, self.py_workers)
        pipe = train_pipe(feeder, seed=self.cfg.run.seed, prefetch_queue_depth=PIPELINE_PREFETCH)
        if self.py_workers:
            with helpers_shielded():  # Slurm's SIGTERM to every process leaves the workers to the trainer
                pipe.start_py_workers()
        pipe.build()
        # no reader and a source without end: the iterator serves as many batches as asked for
        it = self._guarded(lambda: DALIGenericIterator([pipe], TRAIN_OUTPUTS, auto_reset=False), feeder.stream, 0)
        return _Feed(pipe, it, feeder)

    def _guarded(self, call, stream, served: int):
        """``call()``; when DALI fails in it, the error names the bad file of the micro-batches it may have been
        working on (the stream's next undelivered one and those prefetched behind it, maybe of the next epoch),
        or is re-raised if none is bad. DALI's errors name neither the file nor, prefetching, the batch; a
        worker's error even loses its type."""
        try:
            return call()
        except StopIteration:
            raise
        except Exception:
            bad = self._find_bad_file([stream[served + k][1] for k in range(PIPELINE_PREFETCH + 3)])
            if bad is None:
                raise
            raise bad from None

    def _find_bad_file(self, batches: list[tuple[int, ...]]) -> BadImageError | None:
        """The first file of ``batches`` that the feeder rejects (header) or PIL cannot decode (data)."""
        skip = self.cfg.data.skip_bad_images
        for index in (i for b in batches for i in b):
            try:
                _, _, _, skipped = read_image(self._files, index, skip)
            except BadImageError as e:
                return e
            at = (index + skipped) % len(self._files)
            path = self._files.path(at)
            try:
                load_rgb(path, self._files.read(at))
            except BadImageError as e:
                if not skip:
                    return e
                return BadImageError(  # its header reads, so it was not skipped: its data does not decode
                    f"cannot read image {path}: its data does not decode, and data.skip_bad_images skips only files "
                    "whose header is unreadable: remove or replace it (`dist-bot data check` finds all such files)"
                )
        return None

    def _iter_val(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self.images.reader is not None:
            yield from self._iter_val_pack()
            return
        if self._val_pipe is None:
            files = [p for p, _ in self.images.samples]
            labels = [lbl for _, lbl in self.images.samples]
            _, val_pipe, _ = _pipelines(self.cfg, self.device_id, self.val_batch_size, self.workers)
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
                yield self._to_torch(out["images"]), labels.long()

    def _iter_val_pack(self):
        """A pack's validation: this rank's ``eval_shard`` through a ValFeeder, exactly its batches."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        lo, hi = eval_shard(len(self.images), self.env.rank, self.env.world_size)
        if hi == lo:
            return
        if self._val_pipe is None:
            feeder = ValFeeder(FileList.of(self.images), lo, hi, self.val_batch_size)
            _, _, val_pack_pipe = _pipelines(self.cfg, self.device_id, self.val_batch_size, self.workers)
            pipe = val_pack_pipe(feeder, seed=self.cfg.run.seed, prefetch_queue_depth=PIPELINE_PREFETCH)
            pipe.build()
            self._val_pipe = (DALIGenericIterator([pipe], ["images", "labels"], auto_reset=False), feeder.batches)
        it, batches = self._val_pipe
        for _ in range(batches):
            (out,) = next(it)
            yield self._to_torch(out["images"]), out["labels"].view(-1).long()
