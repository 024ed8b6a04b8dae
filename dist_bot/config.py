"""Every setting of dist_bot, its default and what it means, in one place.

A recipe (``configs/*.yaml``) holds only the differences from these defaults and may name a ``base``
recipe (a path relative to itself) whose values it overrides. On the command line, ``key=value``
pairs override both, with dotted keys: ``optim.base_lr_per_256=0.2 data.batch_size=64``.

    cfg = load_config("configs/resnet50d_bs1024.yaml", ["schedule.epochs=90"])
    print(to_yaml(cfg))  # the resolved config, as written to <run.out_dir>/<run.name>/config.yaml

Recipes are data, never code: they are read with ``yaml.safe_load``, and every value is checked
against the type annotated here (``Literal`` fields against their choices). A key that does not exist
is an error naming the closest valid keys.

Why a small loader here instead of OmegaConf: OmegaConf 2.3 has no ``Literal`` types, its unknown-key
errors suggest nothing, and its interpolation/resolvers are more than a recipe needs. This module is
the whole contract: dataclasses -> checked values -> dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

Precision = Literal["fp32", "fp16", "bf16"]
Strategy = Literal["ddp", "fsdp", "deepspeed"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class UserError(Exception):
    """Bad input or a run that cannot go on: the message names the problem and the fix. The CLI prints it as
    one line without a traceback; every such error in dist_bot derives from this class."""


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the schema; the message says which key and how to fix it."""


@dataclass
class ModelConfig:
    name: str = "resnet50d"  # resnet{18,34,50,101,152}{a,b,c,d}; `dist-bot models` lists them
    num_classes: int | None = None  # None: the number of class folders in data.path (checked when set)
    zero_gamma: bool = True  # last BN of every residual block starts at gamma 0 (paper 3.1)
    channels_last: bool = True  # NHWC activations: faster convolutions on tensor cores and CPU AMX
    compile: bool = False  # torch.compile the model (slow first steps, faster after)
    compile_mode: CompileMode = "default"  # torch.compile's mode (reduce-overhead: CUDA graphs; max-autotune: tuned)
    cudnn_benchmark: bool = True  # CUDA: cuDNN times its convolution algorithms on the first steps, keeps the fastest
    sync_bn: bool = False  # SyncBatchNorm across processes (GPU only; the paper uses per-device BN)
    ema_decay: float = 0.0  # EMA of the weights, evaluated beside them each epoch and saved as ema.pt; 0: off
    ema_warmup: bool = True  # timm's warmup of the EMA decay: 1 - (1 + step)^(-2/3), capped at ema_decay


@dataclass
class DataConfig:
    path: str | None = None  # folder holding train/ and val/ in ImageNet layout (class folders of images)
    loader: Literal["auto", "dali", "torch", "synthetic"] = "auto"  # auto: dali when installed, else torch
    image_size: int = 224  # training crop in pixels (validation center crop too)
    val_resize_ratio: float = 0.875  # validation resizes the shorter side to image_size / this, then crops
    batch_size: int = 32  # images per process per step (global batch = this x world size x accumulation)
    global_batch_size: int | None = None  # if set, batch_size = this / (processes x accumulation), exactly
    max_batch_size: int | None = None  # with global_batch_size: most images per process per micro-batch; more
    # gradient accumulation steps are taken when the global batch would not fit (e.g. on fewer GPUs)
    val_batch_size: int | None = None  # images per process per validation step; None: same as batch_size
    workers: int | None = None  # decoding workers per process (torch: DataLoader processes; DALI: CPU threads);
    # None: the CPUs this process may use (affinity, SLURM_CPUS_PER_TASK) shared among the node's processes (torch:
    # one fewer, left to the training thread)
    dali_py_workers: int | None = None  # DALI: Python processes that read files and draw each image's augmentation
    # ahead of the training thread; None: a quarter of this process's CPUs (1-8); 0: in the training thread
    min_crop_area: float = 0.08  # RandomResizedCrop keeps 8-100 % of the image area (paper 2.1)
    hflip: bool = True  # random horizontal flip in training
    color_jitter: float = 0.4  # brightness, contrast, saturation scaled in [1 - x, 1 + x] (GluonCV); 0: off
    pca_lighting: float = 0.1  # std of the AlexNet-style PCA lighting noise; 0 turns it off
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per-channel normalisation mean, RGB in [0, 1]
    std: tuple[float, ...] = (0.229, 0.224, 0.225)  # per-channel normalisation std, RGB in [0, 1]
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of stopping on the first


@dataclass
class OptimConfig:
    name: Literal["sgd"] = "sgd"  # the paper's SGD (Nesterov momentum below); LARS is not implemented yet
    base_lr_per_256: float = 0.1  # linear scaling: lr = base_lr_per_256 x global_batch / ref_batch (3.1)
    ref_batch: int = 256  # the batch size at which the learning rate equals base_lr_per_256
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov accelerated gradient (the paper's NAG)
    weight_decay: float = 1e-4  # L2 penalty on conv and fully connected weights
    no_bias_decay: bool = True  # no weight decay on biases and BN gamma/beta (chosen by module type)
    grad_accum_steps: int = 1  # micro-batches per optimizer step (counts in the global batch)
    grad_clip_norm: float | None = None  # clip the global gradient norm to this; None: no clipping


@dataclass
class ScheduleConfig:
    epochs: int = 120  # training epochs (the paper: 120; 200 with mixup)
    warmup_epochs: float = 5.0  # linear warmup from 0 to the peak lr, updated every iteration
    decay: Literal["cosine", "step", "constant"] = "cosine"  # lr shape after warmup, set every iteration
    step_milestones: tuple[int, ...] = (30, 60, 90)  # step decay: epochs at which lr is multiplied ...
    step_gamma: float = 0.1  # ... by this factor (the paper's baseline)


@dataclass
class DistillConfig:
    teacher: str | None = None  # frozen teacher: a checkpoint folder, or a run folder (its latest); None: off
    temperature: float = 20.0  # softmax temperature T of the soft targets (the paper: 20)
    hard_weight: float = 1.0  # weight of CE(true labels, student)
    soft_weight: float = 1.0  # weight of T^2 x CE(teacher soft targets, student soft predictions)
    teacher_weights: Literal["raw", "ema"] = "raw"  # the teacher's model.pt, or its EMA (ema.pt)


@dataclass
class LossConfig:
    label_smoothing: float = 0.1  # eps: the true class gets 1 - eps (0 turns smoothing off)
    smoothing_form: Literal["paper", "torch"] = "paper"  # paper: eps/(K-1) per other class; torch: eps/K all
    mixup_alpha: float = 0.0  # lambda ~ Beta(alpha, alpha); 0 turns mixup off (the paper: 0.2)
    mixup_pairing: Literal["flip", "permute"] = "flip"  # mix each image with the reversed or a shuffled batch
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class LossScaleConfig:
    init_scale: float = 65536.0  # fp16 dynamic loss scale to start from
    growth_interval: int = 2000  # clean steps before the scale doubles
    backoff_factor: float = 0.5  # the scale is multiplied by this on an overflow (and the step skipped)
    min_scale: float = 1.0  # a scale at or below this ...
    max_steps_at_min: int = 100  # ... for this many steps in a row stops the run (loss-scale collapse)


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL with GPUs, gloo without
    timeout_min: float = 30.0  # collective timeout; a hung rank fails the job after this
    zero_stage: int = 1  # DeepSpeed ZeRO stage (0, 1 or 2) when strategy=deepspeed
    fsdp_reshard_after_forward: bool = True  # FSDP2: free gathered parameters after forward (ZeRO-3 like)


@dataclass
class RunConfig:
    out_dir: str = "runs"  # parent folder of all runs
    name: str | None = None  # the run's folder under out_dir; None: the recipe's file name
    seed: int = 0  # seeds weights, data order (with the epoch) and augmentation
    resume: Literal["auto", "never"] = "auto"  # auto: continue a run found in the folder; never: refuse one
    keep_checkpoints: int = 3  # how many of the latest checkpoints to keep
    checkpoint_every_epochs: int = 1  # checkpoint frequency in epochs (also on preemption signals)
    eval_every_epochs: int = 1  # validation frequency in epochs (always after the last epoch)
    log_every_steps: int = 50  # training metrics line frequency in optimizer steps
    stop_after_steps: int | None = None  # checkpoint and exit for requeue (status 75) after this many steps


@dataclass
class WandbConfig:
    mode: WandbMode = "auto"  # auto: online with an API key and a server that answers, else offline (sync later)
    project: str = "dist_bot"  # W&B project
    entity: str | None = None  # W&B team or user; None: the key's default
    group: str | None = None  # runs grouped in the UI; None: the Slurm job id when there is one
    tags: tuple[str, ...] = ()  # free-form labels


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    precision: Precision = "fp32"  # fp32 | fp16 (with dynamic loss scaling) | bf16 (no scaling needed)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    strategy: Strategy = "ddp"  # how the model is distributed: ddp | fsdp (FSDP2) | deepspeed (ZeRO)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        check_ranges(self)


# --------------------------------------------------------------------------------------------------
# Checks that types alone do not express.

# dotted key -> the interval its value must lie in, written as in mathematics ("[0, 1)" etc.)
_RANGES: dict[str, str] = {
    "model.num_classes": "[1, inf)",
    "model.ema_decay": "[0, 1)",
    "data.image_size": "[1, inf)",
    "data.val_resize_ratio": "(0, 1]",
    "data.batch_size": "[1, inf)",
    "data.val_batch_size": "[1, inf)",
    "data.global_batch_size": "[1, inf)",
    "data.max_batch_size": "[1, inf)",
    "data.workers": "[0, inf)",
    "data.dali_py_workers": "[0, inf)",
    "data.min_crop_area": "(0, 1]",
    "data.color_jitter": "[0, 1]",
    "data.pca_lighting": "[0, inf)",
    "optim.base_lr_per_256": "[0, inf)",
    "optim.ref_batch": "[1, inf)",
    "optim.momentum": "[0, 1)",
    "optim.weight_decay": "[0, inf)",
    "optim.grad_accum_steps": "[1, inf)",
    "optim.grad_clip_norm": "(0, inf)",
    "schedule.epochs": "[1, inf)",
    "schedule.warmup_epochs": "[0, inf)",
    "schedule.step_gamma": "(0, 1]",
    "loss.label_smoothing": "[0, 1)",
    "loss.mixup_alpha": "[0, inf)",
    "loss.distill.temperature": "(0, inf)",
    "loss.distill.hard_weight": "[0, inf)",
    "loss.distill.soft_weight": "[0, inf)",
    "loss_scale.init_scale": "(0, inf)",
    "loss_scale.growth_interval": "[1, inf)",
    "loss_scale.backoff_factor": "(0, 1)",
    "loss_scale.min_scale": "(0, inf)",
    "loss_scale.max_steps_at_min": "[1, inf)",
    "dist.timeout_min": "(0, inf)",
    "dist.zero_stage": "[0, 3]",
    "run.keep_checkpoints": "[1, inf)",
    "run.checkpoint_every_epochs": "[1, inf)",
    "run.eval_every_epochs": "[1, inf)",
    "run.log_every_steps": "[1, inf)",
    "run.stop_after_steps": "[1, inf)",
}


def _in_interval(value: float, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def check_ranges(cfg: Config) -> None:
    for key, interval in _RANGES.items():
        value = get_key(cfg, key)
        if value is not None and not _in_interval(value, interval):
            raise ConfigError(f"{key}={value} is out of range: it must lie in {interval}")
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs={cfg.schedule.warmup_epochs} exceeds schedule.epochs="
            f"{cfg.schedule.epochs}: shorten the warmup or train longer"
        )
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("data.mean and data.std need one value per RGB channel, e.g. data.std=[0.229,0.224,0.225]")


# --------------------------------------------------------------------------------------------------
# The schema, read off the dataclasses above.


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``optim.base_lr_per_256``."""
    keys = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str, section: type, prefix: str) -> ConfigError:
    valid = all_keys(Config)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]  # optim.epochs -> schedule.epochs
    similar = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    close = same_leaf or similar
    section_keys = ", ".join(f.name for f in dataclasses.fields(section))
    hint = f"Did you mean {' or '.join(close)}? " if close else ""
    where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
    return ConfigError(f"unknown config key '{key}'. {hint}Valid keys at {where}: {section_keys}")


def _describe(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(t))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(t)[0])}"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
    }.get(t, str(t))


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``t``; return it in the annotated type or raise ConfigError."""
    origin = typing.get_origin(t)
    bad = ConfigError(f"config key '{key}' expects {_describe(t)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(t)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}.{hint}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad
        (item_t, _ellipsis) = typing.get_args(t)
        return tuple(_coerce(v, item_t, f"{key}[{i}]") for i, v in enumerate(value))
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if t is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported annotation {t!r} for config key '{key}'")  # a bug in the schema, not input


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from plain data, checking every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key, cls, prefix)
        t = hints[k]
        kwargs[k] = from_dict(v, t, key + ".") if dataclasses.is_dataclass(t) else _coerce(v, t, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (tuples as lists) that ``yaml.safe_dump`` writes and ``from_dict`` reads back."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, short lists inline: ``mean: [0.485, 0.456, 0.406]``."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def to_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --------------------------------------------------------------------------------------------------
# Recipes and overrides.


def _deep_merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line, with the place in the file ("line 4, column 15: expected ',' or ']'")."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(e).split())
    context = getattr(e, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's values merged over its ``base`` chain (plain data, not yet checked)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"recipe bases form a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist (recipes live in configs/, e.g. configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of config keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: 'base' must be a path to another recipe, got {base!r}")
    return _deep_merge(read_recipe(path.parent / base, (*_chain, path)), data)


def _leaf_type(key: str) -> Any:
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in fields:
            prefix = "".join(p + "." for p in parts[:i])
            raise _unknown_key(key, cls if dataclasses.is_dataclass(cls) else Config, prefix)
        cls = _hints(cls)[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"'{key}' is a section, not a value: set one of its keys, e.g. {all_keys(cls, key + '.')[0]}")
    return cls


def _accepts_str(t: Any) -> bool:
    if t is str:
        return True
    origin = typing.get_origin(t)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(t))
    if origin in (Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(t))
    return False


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.base_lr_per_256=0.2"`` -> ``("optim.base_lr_per_256", 0.2)``, typed by the schema."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (for example schedule.epochs=90)")
    t = _leaf_type(key)
    if _accepts_str(t) and raw.lower() not in ("null", "none", "~"):
        # Strings stay verbatim: run.name=007 must not become the integer 7.
        return key, raw
    if raw.lower() in ("null", "none", "~"):
        return key, None
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: cannot read {raw!r} as {_describe(t)}") from None


def _nest(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- recipe (with its base chain) <- ``key=value`` overrides, checked into a Config."""
    data: dict[str, Any] = read_recipe(recipe) if recipe is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        data = _deep_merge(data, _nest(key, value))
    cfg = from_dict(data)
    if cfg.run.name is None and recipe is not None:
        cfg.run.name = Path(recipe).stem
    return cfg
