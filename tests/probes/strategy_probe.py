"""Run under torchrun by tests/system/test_strategies.py: steps poisoned on ONE rank must be skipped on every rank,
and LARS's norms are those of whole parameters under every strategy.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/probes/strategy_probe.py OUT \
        CASE:STRATEGY[,STRATEGY...] [CASE:STRATEGY,...]

Every CASE runs under each of its strategies in turn, all in one process group (one start-up for all; each
strategy starts from the same seed, model and data as it would alone).

CASE ``fp16-overflow`` (an inf in rank 1's fp16 loss, then a clean step) or ``nan-data`` (fp32: a NaN pixel in rank
1's images, a clean step, then one NaN in rank 1's own gradient shard under FSDP2, then a clean step): writes
OUT/<case>-<strategy>-rank<r>.json: whether each step was taken, the loss scale after each, and whether any
parameter changed (compared in full over all ranks' shards), and whether the weights' EMA did (its shards
assembled).

CASE ``lars``: ten LARS steps (warmup-like rising lr, no-bias-decay groups) on the same data; rank 0 writes
OUT/lars-<strategy>.pt with the full parameters after them. BatchNorm normalizes with its running statistics in
these steps: with batch statistics over 4 random images the steps are chaotic (a 1e-8 difference in a norm grows
~70x per step), which would hide what is tested, the norms; the gradients still reach every parameter.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from dist_bot.config import load_config
from dist_bot.distributed import build_strategy
from dist_bot.distributed.env import init_distributed, shutdown
from dist_bot.models import build_model
from dist_bot.recipe.ema import ModelEma
from dist_bot.recipe.lars import make_lars
from dist_bot.recipe.param_groups import param_groups
from dist_bot.recipe.sgd import make_sgd

CASES = {
    "fp16-overflow": (["precision=fp16", "loss_scale.init_scale=1024"], ["inf-loss", None]),
    "nan-data": (["precision=fp32"], ["nan-image", None, "nan-grad-shard", None]),
}


def params(s) -> dict:
    """The full parameters, gathered (a collective under FSDP2)."""
    return {k: v.detach().clone() for k, v in s.eval_model().named_parameters()}


def poison_one_gradient_element(model) -> None:
    """An inf/NaN that only this rank's gradient shard holds (FSDP2 reduce-scatters before anyone looks)."""
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    local[(0,) * local.dim()] = float("nan")


# name -> overrides, for the probe and tests/system/test_strategies.py; DeepSpeed at each ZeRO stage it supports
STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "zero0": ["strategy=deepspeed", "dist.zero_stage=0"],
    "zero1": ["strategy=deepspeed", "dist.zero_stage=1"],
    "zero2": ["strategy=deepspeed", "dist.zero_stage=2"],
}


MODEL = "resnet10d"  # the strategies' tests' model (test_strategies.py too): the smallest of the family


def lars_steps(out: str, env, strategies: list[str]) -> None:
    for name in strategies:
        cfg = load_config(None, [*STRATEGIES[name], "optim.name=lars", "model.channels_last=false"])
        torch.manual_seed(0)
        model = build_model(MODEL, num_classes=10, zero_init_last=False)
        s = build_strategy(
            cfg.strategy, model, lambda m: make_lars(param_groups(m, 1e-4), 0.9, True, 0.01, 0.0), env, cfg
        )
        g = torch.Generator().manual_seed(env.rank)
        for step in range(10):
            s.set_lr(0.01 * (step + 1))
            x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
            s.model.eval()
            s.backward(torch.nn.functional.cross_entropy(s.model(x), y))
            assert bool(s.step())
        full = params(s)
        if env.rank == 0:
            torch.save(full, Path(out, f"lars-{name}.pt"))


def poison_steps(out: str, env, case: str, strategies: list[str]) -> None:
    settings, poisons = CASES[case]
    for name in strategies:
        cfg = load_config(None, [*STRATEGIES[name], *settings, "model.channels_last=false"])
        record = poisoned_steps(cfg, env, poisons)
        Path(out, f"{case}-{name}-rank{env.rank}.json").write_text(json.dumps(record))


def poisoned_steps(cfg, env, poisons: list[str | None]) -> dict:
    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=10, zero_init_last=False)
    s = build_strategy(cfg.strategy, model, lambda m: make_sgd([{"params": list(m.parameters())}], 0.9, True), env, cfg)
    s.set_lr(0.1)
    ema = ModelEma(*s.ema_source(), decay=0.5, warmup=False)
    record = {"steps": [], "scales": [], "changed": [], "ema_changed": []}
    g = torch.Generator().manual_seed(env.rank)
    for poison in poisons:
        before, ema_before = params(s), {k: v.clone() for k, v in ema.full_state().items()}
        if poison == "nan-grad-shard" and cfg.strategy != "fsdp":
            continue  # only FSDP2 shards gradients: under DDP and ZeRO every rank reduces them whole
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        if poison == "nan-image" and env.rank == 1:
            x[2, 1, 5, 5] = float("nan")
        s.model.train()
        with torch.autocast("cpu", dtype=torch.float16, enabled=cfg.precision == "fp16"):
            loss = torch.nn.functional.cross_entropy(s.model(x), y)
        if poison == "inf-loss" and env.rank == 1:  # an overflow in one rank's backward only, as fp16 overflows happen
            loss = loss * float("inf")
        s.backward(loss)
        if poison == "nan-grad-shard" and env.rank == 1:
            poison_one_gradient_element(s.model)
        taken = s.step()
        ema.update(len(record["steps"]) + 2, taken)  # decay 0.5 (the first step's would be 0)
        record["steps"].append(bool(taken))
        record["scales"].append(s.loss_scale)
        after = params(s)
        record["changed"].append(any(not torch.equal(before[k], after[k]) for k in before))
        ema_after = ema.full_state()
        record["ema_changed"].append(any(not torch.equal(ema_before[k], ema_after[k]) for k in before))
    return record


def main(out: str, *jobs: str) -> None:
    env = init_distributed("gloo")
    for job in jobs:
        case, _, names = job.partition(":")
        strategies = [n for n in names.split(",") if n]
        if case == "lars":
            lars_steps(out, env, strategies)
        else:
            poison_steps(out, env, case, strategies)
    shutdown(finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
