"""One data interface, several loaders: ``make_loaders(cfg, env) -> (train, val)``.

Every loader meets ``loader.Loader``: training yields the plan's ``Step``s (plan.py), each yielding its
``MicroBatch``es with images on the device, float, normalized, in the model's memory format; evaluation yields
(images, labels) batches of this process's exact shard. ``set_epoch(e, start_step)`` fixes the order from
(seed, epoch) and resumes inside an epoch.
``data.path`` is an ImageNet-layout folder or a pack of it (``dist-bot data pack``): either way the loaders
read sample i by its index (source.py), so plans, augmentation and resume are the same.
The same contract holds for every loader: ``torch`` (torchvision, DataLoader workers), ``dali`` (GPU
decoding, or DALI's CPU-only mode), ``synthetic`` (random tensors made once on the device).
"""

from .loader import make_loaders

__all__ = ["make_loaders"]
