"""What a run is built from, one ``create_*`` each, in the order the Trainer calls them: the batch layout, the model
under its strategy with its optimizer, the EMA, the loss, the teacher."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import EMA_FILE, load_checkpoint, read_file, resolve_checkpoint
from ..config import Config, compile_options, from_dict
from ..distributed import build_strategy
from ..distributed.env import DistEnv
from ..distributed.strategy import LossScaleGuard, Strategy
from ..errors import DataError, RunError, UserError
from ..models import build_model
from ..recipe.ema import ModelEma
from ..recipe.lars import make_lars
from ..recipe.losses import make_loss
from ..recipe.lr import LRSchedule, build_schedule
from ..recipe.param_groups import param_groups
from ..recipe.sgd import make_sgd
from .finetune import freeze, init_from
from .state import Layout, ProcessRng, RunState, run_identity

log = logging.getLogger(__name__)


def split_global_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(images per process per micro-batch, accumulation steps) for this world size.

    With data.global_batch_size the global batch stays fixed whatever the number of processes: it is split
    exactly over processes x optim.grad_accum_steps, and when data.max_batch_size is set the accumulation
    grows to the smallest count whose micro-batch fits (1024 on 4 GPUs with max 128: 2 steps of 128).
    """
    g, accum, cap = cfg.data.global_batch_size, cfg.optim.grad_accum_steps, cfg.data.max_batch_size
    if g is None:
        return cfg.data.batch_size, accum
    if cap is not None:
        n = world_size
        fits = [a for a in range(accum, g // n + 1) if g % (n * a) == 0 and g // (n * a) <= cap]
        if not fits:
            raise UserError(
                f"data.global_batch_size={g} cannot be split over {world_size} processes into micro-batches of at "
                f"most data.max_batch_size={cap}: choose a global batch that is a multiple of {world_size}"
            )
        accum = fits[0]
    if g % (world_size * accum):
        raise UserError(
            f"data.global_batch_size={g} does not split evenly over {world_size} processes x {accum} "
            f"accumulation steps: choose a multiple of {world_size * accum}, or set optim.grad_accum_steps"
        )
    return g // (world_size * accum), accum


def create_config(cfg: Config, world_size: int) -> Config:
    """The run's config: a copy of ``cfg`` whose data.batch_size and optim.grad_accum_steps are what this world size
    makes of them (``split_global_batch``), which the loaders, the schedule and the checkpoints read. The caller's
    config is left as it was."""
    run = copy.deepcopy(cfg)
    run.data.batch_size, run.optim.grad_accum_steps = split_global_batch(cfg, world_size)
    return run


def create_layout(cfg: Config, env: DistEnv, steps_per_epoch: int) -> Layout:
    d, accum = cfg.data, cfg.optim.grad_accum_steps
    return Layout(env.world_size, d.batch_size * env.world_size * accum, d.batch_size, accum, steps_per_epoch)


def create_state(cfg: Config, env: DistEnv, layout: Layout, model: Model) -> RunState:
    """A fresh run's state (RunCheckpoint.resume then restores a checkpoint's into it)."""
    guard = LossScaleGuard(cfg.loss_scale.min_scale, cfg.loss_scale.max_steps_at_min)
    return RunState(layout, guard, ProcessRng(env), run_identity(cfg, model))


def create_schedule(cfg: Config, layout: Layout) -> LRSchedule:
    """The lr of every step: linearly scaled from the global batch, warmup, then the decay (recipe/lr.py)."""
    o = cfg.optim
    return build_schedule(cfg.schedule, o.base_lr_per_256, o.ref_batch, layout.global_batch, layout.steps_per_epoch)


@dataclass
class Model:
    """What trains and is checkpointed: the model under its strategy (with the optimizer), this process's share of
    the weights' EMA with a plain model to evaluate it in, and the classes it predicts."""

    strategy: Strategy
    ema: ModelEma | None
    ema_module: torch.nn.Module | None
    num_classes: int
    class_names: list[str]
    class_descriptions: dict[str, str] | None


def check_num_classes(cfg: Config, found: int) -> int:
    if cfg.model.num_classes not in (None, found):
        raise DataError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.path}/train has {found} "
            "class folders: fix the data or drop model.num_classes (it defaults to the data's)"
        )
    return found


def create_model(
    cfg: Config,
    env: DistEnv,
    class_names: list[str],
    class_descriptions: dict[str, str] | None = None,
    fresh: bool = True,
) -> Model:
    """``fresh``: no checkpoint to resume from, so model.init_from applies."""
    num_classes = check_num_classes(cfg, len(class_names))
    strategy = create_strategy(cfg, env, num_classes, fresh)  # model (init, frozen, channels_last, compiled), optimizer
    ema, ema_module = create_ema(cfg, env, strategy, num_classes)
    return Model(strategy, ema, ema_module, num_classes, list(class_names), class_descriptions)


def create_strategy(cfg: Config, env: DistEnv, num_classes: int, fresh: bool = True) -> Strategy:
    m, o = cfg.model, cfg.optim
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = m.cudnn_benchmark  # time conv algorithms once, keep the fastest
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every process
    model = build_model(m.name, num_classes, zero_init_last=m.zero_gamma)
    if m.init_from and fresh:
        init_from(model, m.init_from, m.name, m.init_from_ema)
    elif m.init_from:
        log.info("model.init_from is not applied: the run resumes from its checkpoint")
    model = model.to(env.device)
    if m.sync_bn and env.device.type == "cuda" and env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    freeze(model, m.freeze)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if m.compile:
        model.compile(**compile_options(m))  # in place: state_dict keys stay those of the plain model

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:  # the lr is set before every step
        groups = param_groups(module, o.weight_decay, o.no_bias_decay, o.backbone_lr_scale, module.fc)
        if o.name == "lars":
            return make_lars(groups, o.momentum, o.nesterov, o.lars_eta, o.lars_eps)
        return make_sgd(groups, o.momentum, o.nesterov)

    return build_strategy(cfg.strategy, model, make_optimizer, env, cfg)


def create_ema(
    cfg: Config, env: DistEnv, strategy: Strategy, num_classes: int
) -> tuple[ModelEma | None, torch.nn.Module | None]:
    """The EMA's share on this process, and a plain model (no wrapper, not compiled) to evaluate it in."""
    m = cfg.model
    if not m.ema_decay:
        return None, None
    module, owners = strategy.ema_source()
    with torch.random.fork_rng(devices=[]):  # its random init must not move the run's RNG stream
        plain = build_model(m.name, num_classes).to(env.device)
    plain = plain.to(memory_format=torch.channels_last) if m.channels_last else plain
    return ModelEma(module, owners, m.ema_decay, m.ema_warmup), plain.requires_grad_(False)


def create_loss(cfg: Config):
    """The loss on (logits, soft targets[, teacher logits]): compiled with the model when model.compile is on."""
    loss = make_loss(cfg.loss.distill)
    return torch.compile(loss, **compile_options(cfg.model)) if cfg.model.compile else loss


def create_teacher(cfg: Config, env: DistEnv, num_classes: int) -> torch.nn.Module | None:
    d, m = cfg.loss.distill, cfg.model
    if not d.teacher:
        return None
    teacher = load_teacher(d.teacher, num_classes, env, m.channels_last, d.teacher_weights)
    if m.compile:
        teacher.compile(**compile_options(m))
    return teacher


def load_teacher(
    path: str, num_classes: int, env: DistEnv, channels_last: bool, weights: str = "raw"
) -> torch.nn.Module:
    """A frozen teacher from a dist_bot checkpoint folder, or from a run folder (its latest good checkpoint);
    the architecture is read from the config saved inside. ``weights``: "raw" (model.pt) or "ema" (ema.pt)."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    tcfg = from_dict(state["config"])
    if state["num_classes"] != num_classes:
        raise RunError(f"teacher {path} predicts {state['num_classes']} classes, the data has {num_classes}")
    if weights == "ema":
        if not (Path(path) / EMA_FILE).is_file():
            raise RunError(
                f"teacher {path} has no {EMA_FILE} (its run trained without model.ema_decay): "
                "set loss.distill.teacher_weights=raw, or name a teacher trained with an EMA"
            )
        state["model"] = read_file(Path(path) / EMA_FILE)
    teacher = build_model(tcfg.model.name, num_classes=num_classes)
    teacher.load_state_dict(state["model"])
    teacher.requires_grad_(False).eval().to(env.device)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher
