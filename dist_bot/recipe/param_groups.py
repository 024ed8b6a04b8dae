"""No bias decay (3.1): weight decay only on the weights of convolutions and fully connected layers.

Chosen by module TYPE, not by parameter name, so a renamed layer cannot slip into the wrong group.
"""

from __future__ import annotations

from torch import nn

DECAYED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_bias_decay: bool = True,
    backbone_lr_scale: float = 1.0,
    classifier: nn.Module | None = None,
) -> list[dict]:
    """Two optimizer groups: conv/linear weights with ``weight_decay``; everything else (biases, BN gamma and
    beta) with none. ``no_bias_decay=False`` gives the baseline: one group, every parameter decayed. Frozen
    parameters (requires_grad False) are in none. With ``backbone_lr_scale`` other than 1 (fine-tuning), each group
    splits into the ``classifier``'s parameters and the rest, whose "lr_scale" the lr is multiplied by."""
    groups = _decay_groups(model, weight_decay, no_bias_decay)
    if backbone_lr_scale == 1.0:
        return groups  # the same groups as ever: checkpoints of earlier runs resume
    head = {id(p) for p in classifier.parameters()}
    split = []
    for g in groups:
        for part, scale in (("backbone", backbone_lr_scale), ("classifier", 1.0)):
            params = [p for p in g["params"] if (id(p) in head) == (part == "classifier")]
            if params:
                split.append(g | {"params": params, "name": f"{g['name']}_{part}", "lr_scale": scale})
    return split


def _decay_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_bias_decay:
        return [{"params": params, "weight_decay": weight_decay, "name": "all"}]
    decay, no_decay = [], []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if isinstance(module, DECAYED) and pname == "weight" else no_decay).append(p)
    if len(decay) + len(no_decay) != len(params):  # a parameter shared between modules, or one owned by none
        raise ValueError("param_groups: every trainable parameter must belong to exactly one module")
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
