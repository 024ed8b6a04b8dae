"""Fine-tuning: a fresh run's weights from another model's (``model.init_from``), parts of the model frozen
(``model.freeze``); the backbone's lr as a fraction of the classifier's is recipe/param_groups.py's.

``model.init_from`` names a dist_bot run or checkpoint folder (``model.init_from_ema``: its EMA weights), a timm
safetensors file (timm's own, or `dist-bot export --format timm`), or a torchvision state dict (.pth/.pt: its own
download, or `dist-bot export --format torchvision`). Every weight but the classifier must fit this run's model by
name and shape and is loaded exactly; the classifier too when the class count is the same, else it keeps its fresh
initialisation (logged). Anything that does not fit is one error naming the keys and shapes. It applies to a fresh
run only: a run with checkpoints resumes from them (the Trainer decides).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_meta, read_weights, resolve_checkpoint
from ..errors import ConfigError, UserError
from ..models.interop import from_timm

log = logging.getLogger(__name__)

CLASSIFIER = "fc."  # the ResNet's classifier: its keys' prefix
LISTED = 4  # keys named in an error; the count says how many more


def read_init_weights(source: str, model_name: str, ema: bool) -> tuple[dict, str]:
    """(the weights ``source`` holds under dist_bot's keys, what they are: for messages)."""
    path = Path(source).expanduser()
    if not path.is_file():
        checkpoint = resolve_checkpoint(path)  # a CheckpointError names what a folder must hold
        meta = read_meta(checkpoint)
        what = f"{checkpoint} ({meta['model_name']}, {meta['num_classes']} classes{', EMA' if ema else ''})"
        return read_weights(checkpoint, ema), what
    if ema:
        raise ConfigError(
            f"model.init_from_ema=true reads a dist_bot run's ema.pt, but {path} is a file of one set of weights: "
            "drop model.init_from_ema, or name the run folder"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {path} needs safetensors: pip install 'dist-bot[export]'") from None
        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj  # dist-bot export's
    else:
        raise ConfigError(
            f"model.init_from={source}: name a dist_bot run or checkpoint folder, a timm .safetensors file or a "
            "torchvision .pth/.pt state dict"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init_from={source} holds no state dict of tensors")
    return from_timm(state, model_name), str(path)  # timm's and torchvision's keys: the same for a ResNet


def named(keys: list[str]) -> str:
    more = f" and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def init_from(model: nn.Module, source: str, model_name: str, ema: bool = False) -> None:
    """Load ``source``'s weights into ``model`` (dist_bot's ``model_name``): see the module docstring."""
    state, what = read_init_weights(source, model_name, ema)
    own = model.state_dict()

    def body(k: str) -> bool:
        return not k.startswith(CLASSIFIER)

    # BatchNorm's num_batches_tracked is absent from older torchvision weights; BN does without it
    missing = [k for k in own if body(k) and k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} (here {list(own[k].shape)})"
        for k in own
        if body(k) and k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        found = [f"missing {named(missing)}"] if missing else []
        found += [f"not in {model_name}: {named(unexpected)}"] if unexpected else []
        found += [f"other shapes: {named(shapes)}"] if shapes else []
        raise ConfigError(
            f"model.init_from={what} does not fit {model_name} ({'; '.join(found)}): name weights of a "
            f"{model_name}, or set model.name to the architecture they are of"
        )
    head = [k for k in own if not body(k)]
    same_head = all(k in state and state[k].shape == own[k].shape for k in head)
    model.load_state_dict({k: v for k, v in state.items() if same_head or body(k)}, strict=same_head)
    if same_head:
        log.info("initialised from %s: every weight", what)
    else:
        theirs = state[CLASSIFIER + "weight"].shape[0] if CLASSIFIER + "weight" in state else "no"
        log.info(
            "initialised from %s: every weight but the classifier, re-initialised for %d classes (%s there)",
            what,
            own[CLASSIFIER + "weight"].shape[0],
            theirs,
        )


@functools.cache
def frozen_norm(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` (BatchNorm2d, SyncBatchNorm, ...) that stays in eval mode: it normalises with its running statistics
    and never updates them. The same parameters and buffers, so checkpoints and exports are unchanged."""

    def train(self, mode: bool = True):
        return cls.train(self, False)

    return type(f"Frozen{cls.__name__}", (cls,), {"train": train})


def freeze(model: nn.Module, part: str) -> None:
    """``model.freeze``: "stem", or "backbone" (every layer but the classifier): no gradients, fixed BN statistics.
    "none" leaves the model as it is."""
    if part == "none":
        return
    modules = [model.stem] if part == "stem" else [m for name, m in model.named_children() if name != "fc"]
    for module in modules:
        module.requires_grad_(False)
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.__class__ = frozen_norm(type(norm))
                norm.eval()
