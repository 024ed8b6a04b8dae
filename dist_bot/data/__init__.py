"""One data interface, several loaders: ``make_loaders(cfg, env) -> (train, val)``.

Every loader meets ``loader.Loader``: training yields the plan's ``Step``s (plan.py), each yielding its
``MicroBatch``es with images on the device, float, normalized, in the model's memory format; evaluation yields
(images, labels) batches of this process's exact shard. ``set_epoch(e, start_step)`` fixes the order from
(seed, epoch) and resumes inside an epoch.
``data.path`` is an ImageNet-layout folder or a pack of it (``dist-bot data pack``): either way the loaders
read sample i by its index (``ImageList.read``), so plans, augmentation and resume are the same.
The same contract holds for every loader: ``torch`` (torchvision, DataLoader workers), ``dali`` (GPU
decoding, or DALI's CPU-only mode), ``synthetic`` (random tensors made once on the device).
"""

from __future__ import annotations

from ..errors import DataError
from .shards import open_dataset


def make_loaders(cfg, env):
    loader = cfg.data.loader
    if loader == "auto":
        from .dali_loader import dali_available

        loader = "dali" if dali_available() else "torch"
    if loader == "synthetic":
        from .synthetic import synthetic_loaders

        return synthetic_loaders(cfg, env)
    train_list, val_list = open_dataset(cfg.data.path)  # a folder or a pack
    if loader == "dali":
        from .dali_loader import DaliLoader, dali_available

        if not dali_available():
            raise DataError(
                "data.loader=dali but DALI is not installed: pip install 'dist-bot[dali]', or data.loader=torch"
            )
        return DaliLoader(train_list, cfg, env, train=True), DaliLoader(val_list, cfg, env, train=False)
    # imported here, not above: DALI's Python workers import this package and should not pay for torch
    from .torch_loader import TorchLoader

    return TorchLoader(train_list, cfg, env, train=True), TorchLoader(val_list, cfg, env, train=False)


__all__ = ["make_loaders"]
