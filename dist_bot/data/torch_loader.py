"""The torch loader: PIL decoding in DataLoader workers, the plan's steps and each image's augmentation draw.

Each sample's augmentation is ``plan.draw(seed, epoch, index)``, the draw the DALI loader applies, so a batch is
the same whatever the number of workers, and a resumed run sees exactly the images it would have seen.

**Augmentation** (the paper's section 2.1). Training applies each image's ``plan.draw`` as DALI's pipeline does:
with PIL, in the DataLoader workers, the crop box resized to image_size (antialiased bilinear, or bicubic:
data.interpolation), the automatic augmentation's operations (data.auto_augment) and the flip; on the training
device, in one batched op, colour jitter with DALI's color_twist formula (brightness, contrast, saturation, then
rounded to uint8), PCA lighting (AlexNet), normalisation and random erasing (data.random_erasing). The crops are
RandomResizedCrop's (8-100 % of the area, aspect 3/4-4/3), the jitter coefficients in [1 - x, 1 + x] (x = 0.4: [0.6,
1.4]). The paper names brightness, saturation and hue; hue is an angle, not a scale, and GluonCV's ImageNet script
that trained the paper's released models jitters brightness, contrast and saturation: we do the same. Workers hand
over uint8 CHW tensors: 4x less host-to-device traffic than float, as DALI and FFCV do.

**Evaluation**: resize the shorter side to size / 0.875 (256 for 224), center crop.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from ..errors import BadImageError
from ..signals import end_with_trainer, helpers_shielded
from .loader import PlannedLoader, dataloader_workers, train_augmentation, train_sizes, val_size
from .plan import PCA_EIGVAL as PLAN_EIGVAL
from .plan import PCA_EIGVEC as PLAN_EIGVEC
from .plan import Augmentation, EpochStream, augment_param, draw, serve
from .source import ImageList, first_readable, load_rgb

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 4  # batches each DataLoader worker keeps ready


# -- the augmentation, applied with PIL and on the device ----------------------------------------------------

PCA_EIGVAL = torch.tensor(PLAN_EIGVAL, dtype=torch.float32)
PCA_EIGVEC = torch.tensor(PLAN_EIGVEC, dtype=torch.float32)


class DrawnCrop:
    """A training image's ``plan.draw`` applied with PIL: crop box resized to the epoch's size, the automatic
    augmentation's operations (data.auto_augment) and the flip, in DALI's pipeline's order; returns the uint8 CHW
    tensor with the draw's colour twist, lighting coefficients and erasing box, which the trainer's device applies to
    the batch (``color_twist``, ``pca_lighting``, ``erase``)."""

    def __init__(self, seed: int, sizes: Callable[[int], int], settings: Augmentation):
        self.seed, self.sizes, self.settings = seed, sizes, settings  # sizes: epoch -> crop size (train_sizes)

    def __call__(self, img: Image.Image, epoch: int, index: int) -> tuple[torch.Tensor, ...]:
        size = self.sizes(epoch)
        d = draw(self.seed, epoch, index, *img.size, self.settings, size)
        x, y, w, h = d.box
        resample = Image.Resampling.BICUBIC if d.bicubic else Image.Resampling.BILINEAR
        img = img.resize((size, size), resample, box=(x, y, x + w, y + h))
        for op, bin, sign in d.ops:
            img = apply_op(img, *augment_param(self.settings.auto_augment, op, bin, sign))
        if d.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img), torch.tensor(d.twist), torch.tensor(d.alpha), torch.tensor(d.erase)


# -- the automatic augmentations' operations, as DALI's nvidia.dali.auto_aug computes them --------------------------
# (uint8 arithmetic rounded to nearest and saturated as DALI's casts; geometry by PIL's bilinear affine maps, filled
# with grey 128 as DALI's suites; the loaders' equality test bounds what the two interpolations leave apart)

FILL = (128, 128, 128)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _enhance(img: Image.Image, factor: float, name: str) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    if name == "brightness":  # fn.brightness: x f
        return Image.fromarray(_u8(a * factor))
    if name == "contrast":  # PIL's: about the image's mean luma
        center = float((a.mean(axis=(0, 1)) * np.asarray(LUMA, np.float32)).sum())
        return Image.fromarray(_u8(center + (a - center) * factor))
    if name == "color":  # fn.saturation: x -> f x + (1 - f) Y
        luma = (a * np.asarray(LUMA, np.float32)).sum(axis=2, keepdims=True)
        return Image.fromarray(_u8(factor * a + (1 - factor) * luma))
    # sharpness: the 3x3 kernel f identity - (f - 1) smooth (PIL's), fn.filter's reflect-101 border
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    kernel = -(factor - 1) * smooth
    kernel[1, 1] += factor
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = a.shape[:2]
    out = sum(kernel[i, j] * p[i : i + h, j : j + w] for i in range(3) for j in range(3))
    return Image.fromarray(_u8(out))


def _equalize(a: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist per channel (fn.equalize)."""
    out = np.empty_like(a)
    for c in range(a.shape[2]):
        ch = a[..., c]
        hist = np.bincount(ch.ravel(), minlength=256)
        first = int(np.flatnonzero(hist)[0])
        total = ch.size
        if hist[first] == total:
            out[..., c] = first
            continue
        scale = 255.0 / (total - hist[first])
        lut = np.zeros(256, np.float64)
        lut[first + 1 :] = np.cumsum(hist[first + 1 :]) * scale
        out[..., c] = _u8(lut)[ch]
    return out


def apply_op(img: Image.Image, name: str, m: float) -> Image.Image:
    """Operation ``name`` of data.auto_augment at parameter ``m`` (plan.augment_param)."""
    w, h = img.size
    affine = {  # DALI's matrices map source to destination; PIL's from destination to source: their inverses
        "shear_x": (1, -m, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, -m, 1, 0),
        "translate_x": (1, 0, -m * w, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, -m * h),
    }
    if name in affine:
        return img.transform(img.size, Image.Transform.AFFINE, affine[name], Image.Resampling.BILINEAR, fillcolor=FILL)
    if name == "rotate":  # counter-clockwise for positive angles, about the centre, as fn.rotate
        return img.rotate(m, Image.Resampling.BILINEAR, fillcolor=FILL)
    if name in ("brightness", "contrast", "color", "sharpness"):
        return _enhance(img, m, name)
    a = np.asarray(img)
    if name == "posterize":  # keep round(m) bits, at least 1
        bits = min(8, max(1, int(np.round(np.float32(m)))))
        a = a & np.uint8(255 ^ (2 ** (8 - bits) - 1))
    elif name == "solarize":
        a = np.where(a < m, a, 255 - a).astype(np.uint8)
    elif name == "solarize_add":
        a = np.where(a < 128, a + np.uint8(m), a).astype(np.uint8)
    elif name == "invert":
        a = 255 - a
    elif name == "equalize":
        a = _equalize(a)
    elif name == "auto_contrast":
        lo, hi = a.min(axis=(0, 1)).astype(np.float32), a.max(axis=(0, 1)).astype(np.float32)
        scale = np.where(hi > lo, 255 / np.maximum(hi - lo, 1), 1)
        a = _u8((a - np.where(hi > lo, lo, 0)) * scale)
    elif name != "identity":
        raise ValueError(f"unknown augmentation operation {name!r}")
    return Image.fromarray(a)


# DALI's color_twist: saturation scales I and Q in YIQ, i.e. x -> s x + (1 - s) Y with Y the luma below
LUMA = (0.299, 0.587, 0.114)


def color_twist(images: torch.Tensor, twist: torch.Tensor) -> torch.Tensor:
    """DALI's ``fn.color_twist`` on uint8-valued float images (N, 3, H, W) in [0, 255]: for (brightness b,
    contrast c, saturation s) per image, b (c (s x + (1 - s) Y) + 128 (1 - c)), rounded and clamped to uint8 as
    DALI's uint8 output is."""
    b, c, s = (twist[:, k].to(images.dtype).view(-1, 1, 1, 1) for k in range(3))
    luma = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    y = (images * luma).sum(dim=1, keepdim=True)
    out = b * (c * (s * images + (1 - s) * y) + 128 * (1 - c))
    return out.round_().clamp_(0, 255)


class CenterCrop:
    """Center crop whose offset rounds half up, (L - size + 1) // 2, as DALI's crop_pos 0.5 does;
    torchvision's CenterCrop rounds half to even, one pixel off on odd margins (73 - 64 = 9 -> 4, not 5)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        left, top = (w - self.size + 1) // 2, (h - self.size + 1) // 2
        return img.crop((left, top, left + self.size, top + self.size))


def eval_transform(image_size: int, resize_ratio: float, interpolation: str = "bilinear") -> T.Compose:
    mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose(
        [
            T.Resize(round(image_size / resize_ratio), interpolation=mode, antialias=True),
            CenterCrop(image_size),
            T.PILToTensor(),
        ]
    )


def pca_lighting(
    images: torch.Tensor, alpha: torch.Tensor, eigval: torch.Tensor = PCA_EIGVAL, eigvec: torch.Tensor = PCA_EIGVEC
) -> torch.Tensor:
    """Add sum_k alpha_k lambda_k v_k to every pixel of each image (float images in [0, 1]); ``alpha`` is
    (N, 3), drawn per image from N(0, std) (std 0.1 in the paper). On a GPU pass ``alpha`` and the PCA
    constants on the device (made once): a copy from pageable CPU memory would wait for the device."""
    rgb = (alpha.float() * eigval) @ eigvec.T  # (N, 3)
    return images + rgb.to(images.device, images.dtype).view(-1, 3, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(images - mean) / std per channel; ``mean`` and ``std`` are sequences, or tensors already on the device
    (made once: building them per batch would copy them to the device, and wait for it, every time)."""
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Random erasing: each image's box (x, y, width, height; width 0: none) set to 0, the mean after normalisation,
    by one mask over the batch (no per-image launches, nothing read back from the device)."""
    n, _, h, w = images.shape
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    x0, y0, bw, bh = (boxes[:, k].view(n, 1, 1) for k in range(4))
    inside = (rows >= y0) & (rows < y0 + bh) & (cols >= x0) & (cols < x0 + bw)
    return images.masked_fill(inside.unsqueeze(1), 0)


# -- the loader ----------------------------------------------------------------------------------------------

NO_TWIST, NO_LIGHTING, NO_ERASE = torch.ones(3), torch.zeros(3), torch.zeros(4, dtype=torch.int64)  # evaluation's


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 CHW image, label, ok, colour twist, lighting alpha) for a key (index, epoch); ``ok`` is 0 for a
    skipped bad image. Training (epoch not None) applies the image's ``plan.draw`` (``crop``); evaluation the
    deterministic ``transform``, with a neutral twist and no lighting. An image that cannot be read (and is not
    to be skipped) gives its BadImageError instead, which ``collate`` hands to the trainer as the batch: raised in
    a worker, the DataLoader would re-raise it wrapped in the worker's traceback, and the one-line error would
    become twenty."""

    def __init__(self, images: ImageList, skip_bad: bool, crop: DrawnCrop | None = None, transform=None):
        self.images, self.skip_bad, self.crop, self.transform = images, skip_bad, crop, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int | None]):
        index, epoch = key
        images = self.images
        try:
            at, img, skipped = first_readable(len(images), index, self.decode, self.skip_bad)
        except BadImageError as e:
            return e
        for error in skipped:
            log.warning("skipping: %s", error)
        if epoch is None:
            x, twist, alpha, erase = self.transform(img), NO_TWIST, NO_LIGHTING, NO_ERASE
        else:  # the draw of the planned index, applied to the image read (the next readable one, if skipped)
            x, twist, alpha, erase = self.crop(img, epoch, index)
        # A skipped bad image is replaced by the next readable one: counted, not silently used.
        return x, images.samples[at][1], int(not skipped), twist, alpha, erase

    def decode(self, i: int):
        return load_rgb(self.images.samples[i][0], self.images.read(i))


def collate(samples: list):
    """A batch of samples, or the first BadImageError among them (raised by the trainer, see ImageDataset)."""
    bad = next((s for s in samples if isinstance(s, BadImageError)), None)
    return bad if bad is not None else torch.utils.data.default_collate(samples)


def init_worker(trainer_pid: int, worker_id: int) -> None:
    """First thing in each worker: it blocks SIGTERM and is a child of the forkserver, so torch's own ways of
    ending it when the trainer ends or fails do not work (see end_with_trainer)."""
    end_with_trainer(trainer_pid)


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "PIL.Image", __name__])  # workers start in ms
    # The forkserver, and so every worker forked from it, never sees Slurm's preemption signals: the step
    # and evaluation that finish a preempted run still get their batches (see dist_bot/signals.py).
    with helpers_shielded():
        multiprocessing.forkserver.ensure_running()
    return ctx


class TorchLoader(PlannedLoader):
    """The ``Loader`` contract (loader.py) over DataLoader workers: training yields the plan's steps, validation
    (images, labels) batches of this process's exact shard; images on the device, float, normalized, in the
    model's memory format."""

    def __init__(self, images: ImageList, cfg, env, train: bool):
        d = cfg.data
        if train:
            crop = DrawnCrop(cfg.run.seed, train_sizes(cfg), train_augmentation(d))
            self.dataset = ImageDataset(images, d.skip_bad_images, crop=crop)
        else:
            transform = eval_transform(val_size(d), d.val_resize_ratio, d.val_interpolation)
            self.dataset = ImageDataset(images, d.skip_bad_images, transform=transform)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.dtype = torch.float16 if cfg.precision == "fp16" else torch.float32  # as DALI emits: half the bytes
        self.workers = dataloader_workers(cfg, env)
        self.prefetch_batches = PREFETCH_FACTOR * self.workers  # batches made ahead of the training thread
        if self.workers > 0:  # start the forkserver now: its imports overlap the model's build, not the first step
            worker_context()
        # Constants on the device once: made per batch, each would be a copy from pageable memory that waits.
        dev = env.device
        self.pca = (PCA_EIGVAL.to(dev), PCA_EIGVEC.to(dev))
        self.mean = torch.tensor(d.mean, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(d.std, device=dev).view(1, 3, 1, 1)
        self._stream = None  # training: the DataLoader iterator over an EpochStream, kept across epochs
        self._val_stream = None  # validation: the DataLoader iterator of the pass under way
        super().__init__(images, cfg, env, train)

    def _dataloader(self, batches) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            # Workers start from a clean forkserver, not by forking this process: a fork while gloo/NCCL or
            # OpenMP threads hold locks deadlocks the child now and then (seen here in evaluation).
            multiprocessing_context=worker_context() if self.workers > 0 else None,
            prefetch_factor=PREFETCH_FACTOR if self.workers > 0 else None,
            collate_fn=collate,
            worker_init_fn=functools.partial(init_worker, os.getpid()) if self.workers > 0 else None,
        )

    def close(self) -> None:
        """End the workers now. Call it when the run ends, however it ends: left to the garbage collector, a
        DataLoader kept alive by a reference cycle (an error's traceback, the trainer's) keeps its workers until
        the interpreter's exit, where only multiprocessing's terminate() ends them (see end_with_trainer)."""
        super().close()
        streams, self._stream, self._val_stream = (self._stream, self._val_stream), None, None
        for it in streams:
            if hasattr(it, "_shutdown_workers"):  # a multi-process DataLoader iterator
                it._shutdown_workers()

    def __iter__(self):
        """This epoch's steps (training) or batches. Training reads them from one DataLoader over an endless stream
        of epochs, kept from one epoch to the next, so its workers decode the next epoch's first batches while this
        one's last train; a new one starts only for a resume, an abandoned epoch or an epoch out of order. Set up
        here, at iter(), not at the first next() (which the engine calls inside a training step)."""
        if not self.train:
            batches = [[(i, None) for i in b] for b in self.eval_batches()]
            self._val_stream = iter(self._dataloader(batches))
            return self._deliver(self._val_stream, None)
        if not self.stream_continues():
            self._stream = None  # the old DataLoader's workers end before new ones start
            stream = EpochStream(self.planner(), self.epoch, self.start_step)
            self._stream = iter(self._dataloader(KeyedBatches(stream)))
        return serve(self.steps[self.start_step :], self._deliver(self._stream, len(self.train_batches())))

    def _deliver(self, batches, count: int | None):
        """``count`` batches of ``batches`` (all, for None), on the device. Nothing here waits for the device: the
        batch is pinned (copies are asynchronous), the bad-image count stays a CPU tensor until bad_images is
        read, and the constants are already on the device."""
        self._bad = torch.zeros((), dtype=torch.int64)
        d = self.cfg.data
        lighting_std, jitter, erasing = d.pca_lighting, d.color_jitter, d.random_erasing
        if count == 0:
            self.stream_served()
        for k in itertools.count() if count is None else range(count):
            batch = next(batches, None)
            if batch is None:
                self._val_stream = None  # a validation pass's workers end now
                return
            if isinstance(batch, BadImageError):
                raise batch
            if count is not None and k == count - 1:  # the engine never asks past the last batch
                self.stream_served()
            images, labels, ok, twist, alpha, boxes = batch
            self._bad += (ok == 0).sum()
            x = images.to(self.device, non_blocking=True).float()
            if self.train and jitter > 0:
                x = color_twist(x, twist.to(self.device, non_blocking=True))
            x = x.div_(255)
            if self.train and lighting_std > 0:
                x = pca_lighting(x, alpha.to(self.device, non_blocking=True) * lighting_std, *self.pca)
            x = normalize(x, self.mean, self.std)
            if self.train and erasing:
                x = erase(x, boxes.to(self.device, non_blocking=True))
            x = x.to(self.dtype)
            x = x.contiguous(memory_format=self.memory_format)
            yield x, labels.to(self.device, non_blocking=True)


class KeyedBatches:
    """A DataLoader's batch sampler over an EpochStream: each sample's key is (index, epoch), its draw's."""

    def __init__(self, stream: EpochStream):
        self.stream = stream

    def __iter__(self):
        for epoch, indices in self.stream:
            yield [(i, epoch) for i in indices]
