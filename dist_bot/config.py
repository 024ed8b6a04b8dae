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

import ast
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

Precision = Literal["fp32", "fp16", "bf16"]
Strategy = Literal["ddp", "fsdp", "deepspeed"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CompileBackend = Literal["inductor", "aot_eager", "cudagraphs"]


def param(default: Any, *, range: str | None = None, resumable: bool = False) -> Any:
    """A field's default with what the checks need to know about it, kept beside it (the trailing comment is
    the field's doc):

    - ``range``: the interval its value must lie in, written as in mathematics ("[1, inf)", "(0, 1]");
      None (the value) always passes. Checked by ``check_ranges``.
    - ``resumable``: it may differ from the run folder's config.yaml when a run is resumed (paths, workers,
      logging); every other key must match (train/state.py's resume check).

    A field without ``param`` has no range and may not change on resume. ``ranges()`` and
    ``resumable_keys()`` collect these over the schema, ``field_docs()`` the comments, and
    ``dist-bot config --explain`` shows them all.
    """
    return field(default=default, metadata={"range": range, "resumable": resumable})


@dataclass
class ModelConfig:
    name: str = "resnet50d"  # resnet{10,18,34,50,101,152}{a,b,c,d}; `dist-bot models` lists them
    num_classes: int | None = param(None, range="[1, inf)")  # None: the number of class folders in data.path (checked
    # when set)
    zero_gamma: bool = True  # last BN of every residual block starts at gamma 0 (paper 3.1)
    channels_last: bool = True  # NHWC activations: faster convolutions on tensor cores and CPU AMX
    compile: bool = param(False, resumable=True)  # torch.compile the model (slow first steps, faster after)
    compile_mode: CompileMode = param("default", resumable=True)  # torch.compile's mode (reduce-overhead: CUDA graphs;
    # max-autotune: tuned)
    compile_backend: CompileBackend = param("inductor", resumable=True)  # torch.compile's backend: inductor (generated
    # kernels; the only one with modes), cudagraphs (CUDA graphs of the traced graphs, no generated kernels),
    # aot_eager (the same tracing, forward and backward, run eagerly: for finding a compile problem, and a CPU
    # rehearsal without minutes of C++ compilation)
    cudnn_benchmark: bool = param(True, resumable=True)  # CUDA: cuDNN times its convolution algorithms on the first
    # steps, keeps the fastest
    sync_bn: bool = False  # SyncBatchNorm across processes (GPU only; the paper uses per-device BN)
    ema_decay: float = param(0.0, range="[0, 1)")  # EMA of the weights, evaluated beside them each epoch and saved as
    # ema.pt; 0: off (not resumable: an EMA is a function of every past step's decay)
    ema_warmup: bool = True  # timm's warmup of the EMA decay: 1 - (1 + step)^(-2/3), capped at ema_decay
    init_from: str | None = param(None, resumable=True)  # fine-tuning: a fresh run's weights from a dist_bot run or
    # checkpoint folder, a timm .safetensors or a torchvision .pth; the classifier is re-initialised when the class
    # count differs (a run with checkpoints resumes from them instead)
    init_from_ema: bool = param(False, resumable=True)  # init_from a dist_bot run's EMA weights (its ema.pt)
    freeze: Literal["none", "stem", "backbone"] = "none"  # no gradients and fixed BN statistics for the stem, or for
    # every layer but the classifier (backbone)


@dataclass
class ProgressiveConfig:
    min_size: int | None = param(None, range="[1, inf)")  # progressive resizing (FFCV's ResNet-50 recipe): training
    # crops grow from this to data.image_size; None: off
    start_epoch: int = param(0, range="[0, inf)")  # the last epoch at min_size (counted from 0, as metrics.jsonl's)
    end_epoch: int | None = param(None, range="[1, inf)")  # the first epoch at data.image_size; None: the last epoch
    step: int = param(32, range="[1, inf)")  # sizes in between are rounded down to a multiple of this (at least
    # min_size)


@dataclass
class DataConfig:
    path: str | None = param(None, resumable=True)  # folder holding train/ and val/ in ImageNet layout (class folders
    # of images)
    loader: Literal["auto", "dali", "torch", "synthetic"] = "auto"  # auto: dali when installed, else torch
    image_size: int = param(224, range="[1, inf)")  # training crop in pixels (and validation's, unless val_image_size)
    val_image_size: int | None = param(None, range="[1, inf)", resumable=True)  # validation's center crop; None:
    # image_size (a larger one often scores better: the train-test resolution discrepancy)
    val_resize_ratio: float = param(0.875, range="(0, 1]", resumable=True)  # validation resizes the shorter side to
    # the crop / this, then center crops
    batch_size: int = param(32, range="[1, inf)")  # images per process per step (global batch = this x world size x
    # accumulation)
    global_batch_size: int | None = param(None, range="[1, inf)")  # if set, batch_size = this / (processes x
    # accumulation), exactly
    max_batch_size: int | None = param(None, range="[1, inf)")  # with global_batch_size: most images per process per
    # micro-batch; more gradient accumulation steps are taken when the global batch would not fit (e.g. on fewer GPUs)
    val_batch_size: int | None = param(None, range="[1, inf)")  # images per process per validation step; None:
    # same as batch_size
    workers: int | None = param(None, range="[0, inf)", resumable=True)  # decoding workers per process (torch:
    # DataLoader processes; DALI: CPU threads); None: the CPUs this process may use (affinity, SLURM_CPUS_PER_TASK)
    # shared among the node's processes (torch: one fewer, left to the training thread)
    dali_hw_decoder_load: float | None = param(None, range="[0, 1]", resumable=True)  # DALI "mixed": the share of
    # images for the GPU's hardware JPEG decoder (A100, H100); None: DALI's default (0.65)
    dali_py_workers: int | None = param(None, range="[0, inf)", resumable=True)  # DALI: Python processes that read
    # files and draw each image's augmentation ahead of the training thread; None: a quarter of this process's CPUs
    # (1-8); 0: in the training thread
    min_crop_area: float = param(0.08, range="(0, 1]")  # RandomResizedCrop keeps 8-100 % of the image area (paper 2.1)
    hflip: bool = True  # random horizontal flip in training
    color_jitter: float = param(0.4, range="[0, 1]")  # brightness, contrast, saturation scaled in
    # [1 - x, 1 + x] (GluonCV); 0: off
    pca_lighting: float = param(0.1, range="[0, inf)")  # std of the AlexNet-style PCA lighting noise; 0 turns it off
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per-channel normalisation mean, RGB in [0, 1]
    std: tuple[float, ...] = (0.229, 0.224, 0.225)  # per-channel normalisation std, RGB in [0, 1]
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of stopping on the first
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"  # training's resize; random: one of the
    # two per image (timm's default)
    val_interpolation: Literal["bilinear", "bicubic"] = param("bilinear", resumable=True)  # validation's resize
    # (timm evaluates its ResNets bicubic)
    auto_augment: Literal["none", "rand", "trivial", "auto"] = "none"  # after the crop and flip: RandAugment,
    # TrivialAugment Wide, AutoAugment's ImageNet policy (DALI's auto_aug suites, on both loaders)
    auto_augment_ops: int = param(2, range="[1, inf)")  # RandAugment: operations per image (its N)
    auto_augment_magnitude: int = param(9, range="[0, 30]")  # RandAugment: the magnitude bin of 31 (its M;
    # torchvision's default 9; timm's m on its 0-10 scale is about 3 x that)
    random_erasing: float = param(0.0, range="[0, 1]")  # probability of erasing a rectangle (2-33 % of the crop) to
    # the mean, after normalisation (torchvision's RandomErasing, value 0); 0: off
    repeated_aug: int = param(1, range="[1, inf)")  # repeated augmentation: each epoch trains 1/k of the images k
    # times each, on k different processes, differently augmented (DeiT, "ResNet strikes back": 3); 1: off
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars"] = "sgd"  # sgd: the paper's (Nesterov) momentum SGD; lars: the same with LARS's
    # layer-wise trust ratio on conv/linear weights (large batches; dist_bot/recipe/lars.py)
    base_lr_per_256: float = param(0.1, range="[0, inf)")  # linear scaling: lr = base_lr_per_256 x global_batch /
    # ref_batch (3.1)
    ref_batch: int = param(256, range="[1, inf)")  # the batch size at which the learning rate equals base_lr_per_256
    momentum: float = param(0.9, range="[0, 1)")  # SGD momentum
    nesterov: bool = True  # Nesterov accelerated gradient (the paper's NAG)
    weight_decay: float = param(1e-4, range="[0, inf)")  # L2 penalty on conv and fully connected weights
    no_bias_decay: bool = True  # no weight decay on biases and BN gamma/beta (chosen by module type)
    grad_accum_steps: int = param(1, range="[1, inf)")  # micro-batches per optimizer step (counts in the global batch)
    grad_clip_norm: float | None = param(None, range="(0, inf)")  # clip the global gradient norm to this; None:
    # no clipping
    lars_eta: float = param(0.001, range="(0, inf)")  # LARS trust coefficient eta (the LARS paper and MLPerf: 0.001)
    lars_eps: float = param(0.0, range="[0, inf)")  # LARS: added to the trust ratio's denominator (MLPerf logs 0)
    backbone_lr_scale: float = param(1.0, range="[0, inf)")  # fine-tuning: every layer but the classifier trains at
    # this fraction of the lr (e.g. 0.1)


@dataclass
class ScheduleConfig:
    epochs: int = param(120, range="[1, inf)")  # training epochs (the paper: 120; 200 with mixup)
    warmup_epochs: float = param(5.0, range="[0, inf)")  # linear warmup from 0 to the peak lr, updated every iteration
    decay: Literal["cosine", "step", "poly", "constant"] = "cosine"  # lr shape after warmup, set every iteration
    step_milestones: tuple[int, ...] = (30, 60, 90)  # step decay: epochs at which lr is multiplied ...
    step_gamma: float = param(0.1, range="(0, 1]")  # ... by this factor (the paper's baseline)
    poly_power: float = param(2.0, range="(0, inf)")  # poly decay: lr = (peak - end_lr) (1 - t/T)^poly_power + end_lr
    # over the T steps after warmup (MLPerf's LARS recipe: 2)
    end_lr: float = param(0.0, range="[0, inf)")  # poly decay: the absolute lr it ends at, whatever the batch (MLPerf:
    # 1e-4); at most the peak lr (checked when the run starts)
    stepping: Literal["iteration", "epoch"] = "iteration"  # iteration: the lr changes every step (the paper); epoch:
    # once per epoch, as timm's train.py steps its schedulers (warmup from warmup_lr, the decay over all epochs)
    warmup_lr: float = param(0.0, range="[0, inf)")  # stepping=epoch: the first warmup epoch's lr (timm's 1e-5)


@dataclass
class DistillConfig:
    teacher: str | None = None  # frozen teacher: a checkpoint folder, or a run folder (its latest); None: off
    temperature: float = param(20.0, range="(0, inf)")  # softmax temperature T of the soft targets (the paper: 20)
    hard_weight: float = param(1.0, range="[0, inf)")  # weight of CE(true labels, student)
    soft_weight: float = param(1.0, range="[0, inf)")  # weight of T^2 x CE(teacher soft targets, student soft
    # predictions)
    teacher_weights: Literal["raw", "ema"] = "raw"  # the teacher's model.pt, or its EMA (ema.pt)


@dataclass
class LossConfig:
    label_smoothing: float = param(0.1, range="[0, 1)")  # eps: the true class gets 1 - eps (0 turns smoothing off)
    smoothing_form: Literal["paper", "torch"] = "paper"  # paper: eps/(K-1) per other class; torch: eps/K all
    mixup_alpha: float = param(0.0, range="[0, inf)")  # lambda ~ Beta(alpha, alpha); 0 turns mixup off (the paper: 0.2)
    mixup_pairing: Literal["flip", "permute"] = "flip"  # mix each image with the reversed or a shuffled batch
    cutmix_alpha: float = param(0.0, range="[0, inf)")  # CutMix: a box of the paired image, area 1 - lambda,
    # lambda ~ Beta(alpha, alpha); with mixup too, one of the two per batch with even odds (timm's Mixup); 0: off
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class LossScaleConfig:
    init_scale: float = param(65536.0, range="(0, inf)")  # fp16 dynamic loss scale to start from
    growth_interval: int = param(2000, range="[1, inf)")  # clean steps before the scale doubles
    backoff_factor: float = param(0.5, range="(0, 1)")  # the scale is multiplied by this on an overflow (and the step
    # skipped)
    min_scale: float = param(1.0, range="(0, inf)")  # a scale at or below this ...
    max_steps_at_min: int = param(100, range="[1, inf)")  # ... for this many steps in a row stops the run (loss-scale
    # collapse)


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL with GPUs, gloo without
    timeout_min: float = param(30.0, range="(0, inf)", resumable=True)  # collective timeout; a hung rank fails the job
    # after this
    hang_timeout_min: float = param(15.0, range="[0, inf)", resumable=True)  # no step, eval batch or checkpoint
    # for this long: every process writes its stacks to <run>/hang/ and exits with status 3 (0: off). Above the
    # slowest of these in the paper's recipe (torch.compile's first step, max-autotune included: minutes; a
    # ResNet-50 checkpoint on a slow shared file system: about one), below timeout_min: the watchdog reports a
    # hang, not NCCL's timeout
    zero_stage: int = param(1, range="[0, 3]")  # DeepSpeed ZeRO stage (0, 1 or 2) when strategy=deepspeed
    fsdp_reshard_after_forward: bool = True  # FSDP2: free gathered parameters after forward (ZeRO-3 like)


@dataclass
class RunConfig:
    out_dir: str = param("runs", resumable=True)  # parent folder of all runs (a run folder may move on resume: it is
    # found by its new place)
    name: str | None = None  # the run's folder under out_dir; None: the recipe's file name
    seed: int = 0  # seeds weights, data order (with the epoch) and augmentation
    resume: Literal["auto", "never"] = param("auto", resumable=True)  # auto: continue a run found in the folder; never:
    # refuse one
    keep_checkpoints: int = param(3, range="[1, inf)")  # how many of the latest checkpoints to keep
    checkpoint_every_epochs: int = param(1, range="[1, inf)")  # checkpoint frequency in epochs (also on preemption
    # signals)
    eval_every_epochs: int = param(1, range="[1, inf)")  # validation frequency in epochs (always after the last epoch)
    log_every_steps: int = param(50, range="[1, inf)", resumable=True)  # training metrics line frequency in optimizer
    # steps
    stop_after_steps: int | None = param(None, range="[1, inf)", resumable=True)  # checkpoint and exit for requeue
    # (status 75) after this many steps
    profile_steps: str | None = param(None, resumable=True)  # "A:B": torch.profiler traces of optimizer steps A to B-1
    # of the whole run (counted from 1, as metrics.jsonl's "step") into <run dir>/profile/; quote it in YAML ("10:15"
    # unquoted is a base-60 number there)


@dataclass
class WandbConfig:
    mode: WandbMode = param("auto", resumable=True)  # auto: online with an API key and a server that answers,
    # else offline (sync later)
    project: str = "dist_bot"  # W&B project
    entity: str | None = None  # W&B team or user; None: the key's default
    group: str | None = None  # runs grouped in the UI; None: the Slurm job id when there is one
    tags: tuple[str, ...] = param((), resumable=True)  # free-form labels
    log_model: bool = param(True, resumable=True)  # at the end of a run, upload its final weights (timm safetensors,
    # else ONNX; with the EMA) as a W&B model artifact, kept in <run dir>/export/ too


@dataclass
class TensorBoardConfig:
    enabled: bool = param(False, resumable=True)  # rank 0 also writes metrics.jsonl's scalars as TensorBoard event
    # files in <run dir>/tensorboard/ (`tensorboard --logdir runs`), beside W&B or without it


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
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)

    def __post_init__(self) -> None:
        check_ranges(self)


# --------------------------------------------------------------------------------------------------
# Checks that types alone do not express.


def _in_interval(value: float, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def check_ranges(cfg: Config) -> None:
    for key, interval in ranges().items():
        value = get_key(cfg, key)
        if value is not None and not _in_interval(value, interval):
            raise ConfigError(f"{key}={value} is out of range: it must lie in {interval}")
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs={cfg.schedule.warmup_epochs} exceeds schedule.epochs="
            f"{cfg.schedule.epochs}: shorten the warmup or train longer"
        )
    profile_window(cfg.run.profile_steps)
    if cfg.dist.hang_timeout_min and cfg.dist.hang_timeout_min >= cfg.dist.timeout_min:
        raise ConfigError(
            f"dist.hang_timeout_min={cfg.dist.hang_timeout_min} is not below dist.timeout_min={cfg.dist.timeout_min}: "
            "the collectives' timeout would end a hang before the watchdog reports it; lower the first (0: off) "
            "or raise the second"
        )
    check_progressive(cfg)
    if cfg.model.compile_mode != "default" and cfg.model.compile_backend != "inductor":
        raise ConfigError(
            f"model.compile_mode={cfg.model.compile_mode} is one of inductor's modes, but model.compile_backend="
            f"{cfg.model.compile_backend}: set model.compile_backend=inductor, or model.compile_mode=default"
        )
    if cfg.model.init_from_ema and not cfg.model.init_from:
        raise ConfigError("model.init_from_ema=true needs model.init_from (a dist_bot run or checkpoint folder)")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("data.mean and data.std need one value per RGB channel, e.g. data.std=[0.229,0.224,0.225]")


def check_progressive(cfg: Config) -> None:
    """A progressive resizing schedule that fits the image size and the epochs."""
    p, size, epochs = cfg.data.progressive, cfg.data.image_size, cfg.schedule.epochs
    if p.min_size is None:
        return
    end = epochs - 1 if p.end_epoch is None else p.end_epoch
    problem = None
    if p.min_size > size:
        problem = f"data.progressive.min_size={p.min_size} is above data.image_size={size}: it grows up to the latter"
    elif end >= epochs:
        problem = (
            f"data.progressive.end_epoch={end} is past the last epoch ({epochs - 1}; epochs are counted from 0): end "
            "the ramp earlier or train longer"
        )
    elif p.start_epoch >= end:
        problem = (
            f"data.progressive.start_epoch={p.start_epoch} is not before end_epoch={end}: the size ramps between the "
            "two (epochs counted from 0)"
        )
    if problem:
        raise ConfigError(problem)


def compile_options(m: ModelConfig) -> dict[str, str]:
    """torch.compile's keyword arguments for ``m`` (the model, its loss, a teacher, the bench's loops alike)."""
    if m.compile_backend != "inductor":
        return {"backend": m.compile_backend}  # modes are inductor's (another backend would ignore one, warning)
    return {"backend": m.compile_backend, "mode": m.compile_mode}


def profile_window(value: str | None) -> tuple[int, int] | None:
    """run.profile_steps "A:B" -> (A, B): optimizer steps A, A+1, ..., B-1 (like a Python slice), counted from 1."""
    if value is None:
        return None
    first, sep, end = value.partition(":")
    try:
        window = (int(first), int(end)) if sep else None
    except ValueError:
        window = None
    if window is None or not 1 <= window[0] < window[1]:
        raise ConfigError(
            f"run.profile_steps={value!r} is not a window of optimizer steps: write A:B with 1 <= A < B, e.g. "
            "run.profile_steps=10:15 profiles steps 10 to 14 (counted from 1 over the whole run)"
        )
    return window


# --------------------------------------------------------------------------------------------------
# The schema, read off the dataclasses above.


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``optim.base_lr_per_256``."""
    return [key for key, _ in _leaf_fields(cls, prefix)]


@functools.cache  # the schema is fixed; every Config() checks its ranges, and type hints are slow to resolve
def _leaf_fields(cls: type = Config, prefix: str = "") -> tuple[tuple[str, dataclasses.Field], ...]:
    out: tuple[tuple[str, dataclasses.Field], ...] = ()
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        out += _leaf_fields(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else ((prefix + f.name, f),)
    return out


def ranges() -> dict[str, str]:
    """dotted key -> the interval its value must lie in, from the fields' ``param(range=...)``."""
    return {key: f.metadata["range"] for key, f in _leaf_fields() if f.metadata.get("range")}


def resumable_keys() -> frozenset[str]:
    """The keys that may change when a run is resumed, from the fields' ``param(resumable=True)``."""
    return frozenset(key for key, f in _leaf_fields() if f.metadata.get("resumable"))


def _section_prefixes(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """class name -> the dotted prefix of its keys: ``{"Config": "", "DistillConfig": "loss.distill.", ...}``."""
    out = {cls.__name__: prefix}
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out |= _section_prefixes(t, f"{prefix}{f.name}.")
    return out


def field_docs() -> dict[str, str]:
    """dotted key -> its doc: the comment beside the field in this file, with the comment lines that continue it."""
    lines = Path(__file__).read_text().splitlines()
    prefixes = _section_prefixes()
    docs = {}
    for node in ast.parse("\n".join(lines)).body:
        if not isinstance(node, ast.ClassDef) or node.name not in prefixes:
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = lines[stmt.lineno - 1].partition("  # ")[2]
                for line in lines[stmt.end_lineno :]:
                    if not line.strip().startswith("# "):
                        break
                    doc += " " + line.strip()[2:]
                docs[prefixes[node.name] + stmt.target.id] = doc
    return docs


def show(value: Any) -> str:
    """A value as a recipe writes it (YAML flow style): ``explain``'s cells, and docs/configuration.md's."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True).split("\n")[0]


def explain(cfg: Config) -> str:
    """A table of every key: its value in ``cfg``, default, range, whether it may change on resume, and its doc."""
    docs, defaults, interval, resumable = field_docs(), Config(), ranges(), resumable_keys()
    rows = [("key", "value", "default", "range", "on resume", "meaning")]
    for key in all_keys():
        may_change = "may change" if key in resumable else "fixed"
        value, default = show(get_key(cfg, key)), show(get_key(defaults, key))
        rows.append((key, value, default, interval.get(key, ""), may_change, docs.get(key, "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows)


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


def _bundled_recipe_dirs() -> list[Path]:
    package = Path(__file__).resolve().parent
    # a wheel ships the repository's configs/ as dist_bot/configs/; a source checkout has it beside dist_bot/
    candidates = [package / "configs"]
    if (package.parent / "pyproject.toml").is_file():
        candidates.append(package.parent / "configs")
    return [d for d in candidates if d.is_dir()]


def find_recipe(recipe: str | Path) -> Path:
    """The recipe's file: the path as given when it exists, else the recipe of that name that comes with dist_bot,
    so that ``resnet50d_bs1024``, ``paper_ladder/3_cosine`` or ``configs/demo.yaml`` work from any folder after
    ``pip install dist-bot``. A name found nowhere comes back as given (``read_recipe`` says it is missing)."""
    path = Path(recipe)
    if path.is_file() or path.is_absolute():
        return path
    name = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
    if name.suffix != ".yaml":
        name = name.with_name(name.name + ".yaml")
    for folder in _bundled_recipe_dirs():
        if (folder / name).is_file():
            return folder / name
    return path


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's values merged over its ``base`` chain (plain data, not yet checked)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"recipe bases form a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(
            f"recipe {path} does not exist (recipes live in configs/, e.g. configs/demo.yaml; those that come with "
            "dist_bot may be named alone, e.g. resnet50d_bs1024)"
        )
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
    data: dict[str, Any] = read_recipe(find_recipe(recipe)) if recipe is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        data = _deep_merge(data, _nest(key, value))
    cfg = from_dict(data)
    if cfg.run.name is None and recipe is not None:
        cfg.run.name = Path(recipe).stem
    return cfg
