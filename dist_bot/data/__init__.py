"""One data interface, several loaders: ``make_loaders(cfg, env) -> (train, val)``.

Iterating a loader yields ``(images, labels)`` on the device, float, normalized, in the model's memory
format. ``len(train)`` is optimizer steps per epoch, the same on every process; ``train.steps[i]`` lists
this process's micro-batches of step i and the step's global size. ``set_epoch(e, start_step)`` fixes the
order from (seed, epoch) and resumes inside an epoch. ``val.samples`` is the number of real images this
process evaluates (no padding). The same contract holds for every loader.
"""

from __future__ import annotations

from .folder import DataError, scan_dataset
from .torch_loader import BadImageError, TorchLoader
from .transforms import eval_transform, train_transform


def make_loaders(cfg, env):
    if cfg.data.loader != "torch":
        raise NotImplementedError(
            f"data.loader={cfg.data.loader!r} is not available in this version: use data.loader=torch "
            "(DALI and synthetic data: issue 4)"
        )
    train_list, val_list = scan_dataset(cfg.data.path)
    d = cfg.data
    train = TorchLoader(
        train_list,
        train_transform(d.image_size, d.min_crop_area, d.hflip, d.color_jitter),
        cfg,
        env,
        train=True,
    )
    val = TorchLoader(val_list, eval_transform(d.image_size, d.val_resize_ratio), cfg, env, train=False)
    return train, val


__all__ = ["BadImageError", "DataError", "make_loaders"]
