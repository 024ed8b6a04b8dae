"""EMA of the weights (model.ema_decay): timm's ModelEmaV3 schedule and update, per shard, saved as ema.pt,
evaluated beside the raw weights. Whole runs under every strategy: tests/system/test_strategies.py; resume there and in
tests/system/test_train.py; no host sync: tests/unit/train/test_sync_free.py."""

import json

import pytest
import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from dist_bot.checkpoint import list_checkpoints, read_model
from dist_bot.config import load_config
from dist_bot.errors import ConfigError
from dist_bot.recipe.ema import ModelEma, balanced_owners, ema_decay


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.9998])
@pytest.mark.parametrize("warmup", [True, False])
def test_decay_schedule_is_timms(decay, warmup):
    timm = ModelEmaV3(nn.Linear(1, 1), decay=decay, use_warmup=warmup)
    for step in [*range(0, 300), 1000, 10_000, 100_000, 400_000, 10**7]:
        assert ema_decay(step, decay, warmup) == timm.get_decay(step), step


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_one_update_is_the_formula_for_parameters_and_buffers_and_a_skipped_step_leaves_it():
    torch.manual_seed(0)
    model = tiny()
    ema = ModelEma(model, {}, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.ema.items()}
    model.train()
    model(torch.randn(2, 3, 8, 8))  # BN statistics and num_batches_tracked move
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}

    ema.update(7, torch.tensor(False))  # a skipped step: nothing moves (the weights did not either)
    assert all(torch.equal(ema.ema[k], before[k]) for k in before if before[k].is_floating_point())

    ema.update(7, torch.tensor(True))
    for k, v in ema.ema.items():
        if v.is_floating_point():  # weights, biases, BN gamma/beta and running mean/var alike
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * after[k], rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked is copied
            assert torch.equal(v, after[k]) and not torch.equal(v, before[k])
    assert ema.full_state().keys() == model.state_dict().keys()

    ema.update(1, torch.tensor(True))  # the first step's decay is 0: the EMA is the weights
    assert all(torch.equal(ema.ema[k], after[k].to(ema.ema[k].dtype)) for k in after)


def test_share_of_a_full_state_loads_back():
    model = tiny()
    ema = ModelEma(model, {}, decay=0.5, warmup=True)
    full = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in model.state_dict().items()}
    ema.load_share(ema.share_of(full))
    assert all(torch.equal(ema.full_state()[k], full[k]) for k in full)


def test_balanced_owners_split_the_elements_evenly():
    sizes = {f"p{i}": n for i, n in enumerate([1000, 800, 600, 400, 300, 200, 100, 50, 10, 10])}
    owners = balanced_owners(sizes, 3)
    assert owners.keys() == sizes.keys() and set(owners.values()) == {0, 1, 2}
    load = [sum(n for k, n in sizes.items() if owners[k] == r) for r in range(3)]
    assert max(load) - min(load) <= 100  # the greedy split of 3470 elements: 1160 / 1160 / 1150
    assert balanced_owners(sizes, 3) == owners  # the same on every rank


def test_ema_decay_must_lie_in_0_1():
    assert load_config(None, []).model.ema_decay == 0.0  # off by default
    with pytest.raises(ConfigError, match=r"model\.ema_decay=1\.0 is out of range"):
        load_config(None, ["model.ema_decay=1"])


@pytest.mark.slow
def test_a_short_run_keeps_timms_ema_and_evaluates_it_each_epoch(tiny_digits, tmp_path, capsys):
    """One process (DDP's code path): the EMA saved in ema.pt equals timm's ModelEmaV3 (warmup on) updated
    after every step with the same weights; the val line carries the EMA's exact evaluation."""
    from dist_bot.distributed.env import DistEnv
    from dist_bot.train import Trainer, evaluate

    overrides = [f"data.path={tiny_digits}", "model.name=resnet10d", "data.workers=0", "data.batch_size=16"]
    overrides += ["schedule.epochs=1", "model.ema_decay=0.9998", f"run.out_dir={tmp_path}", "run.name=r"]
    trainer = Trainer(load_config("configs/demo.yaml", overrides), DistEnv())
    timm = ModelEmaV3(trainer.strategy.module, decay=0.9998, use_warmup=True)
    ours, steps = trainer.ema.update, []

    def update(step, taken):
        ours(step, taken)
        timm.update(trainer.strategy.module, step=step)
        steps.append(step)

    trainer.ema.update = update
    trainer.fit()
    assert steps == list(range(1, len(trainer.train_loader) + 1)) and len(steps) > 3
    last = list_checkpoints(tmp_path / "r" / "checkpoints")[-1]
    saved, raw = torch.load(last / "ema.pt", weights_only=True), read_model(last)
    assert saved.keys() == raw.keys() and all(saved[k].dtype == raw[k].dtype for k in raw)  # model.pt's format
    want = timm.module.state_dict()
    for k in want:
        torch.testing.assert_close(saved[k], want[k].cpu(), rtol=0, atol=1e-6)
    assert any(not torch.equal(saved[k], raw[k]) for k in raw)  # not the raw weights

    lines = map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
    (val,) = [x for x in lines if x["split"] == "val"]
    timm.module.eval()
    ref = evaluate(timm.module, trainer.val_loader, DistEnv(), "bf16")
    assert (val["ema_top1"], val["ema_top5"]) == pytest.approx((ref["top1"], ref["top5"]))
    assert val["ema_loss"] == pytest.approx(ref["loss"], rel=1e-3)
    assert f"| ema top1 {val['ema_top1']:.2f} top5 {val['ema_top5']:.2f}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_ema_never_changes_training(tiny_digits, tmp_path):
    """A run with an EMA ends with exactly the raw weights and raw val metrics of the same run without one: the
    EMA only reads the weights, so one run measures both (docs/results.md's Imagenette EMA row relies on this)."""
    from dist_bot.distributed.env import DistEnv
    from dist_bot.train import Trainer

    base = [f"data.path={tiny_digits}", "model.name=resnet10d", "data.workers=0", "data.batch_size=16"]
    base += ["schedule.epochs=1", "precision=fp32", f"run.out_dir={tmp_path}"]
    runs = {}
    for name, ema in (("raw", "0"), ("ema", "0.99")):
        Trainer(
            load_config("configs/demo.yaml", [*base, f"run.name={name}", f"model.ema_decay={ema}"]), DistEnv()
        ).fit()
        last = list_checkpoints(tmp_path / name / "checkpoints")[-1]
        lines = map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
        (val,) = [x for x in lines if x["split"] == "val"]
        runs[name] = read_model(last), val, (last / "ema.pt").exists()
    (raw, raw_val, raw_has_ema), (ema, ema_val, ema_has_ema) = runs["raw"], runs["ema"]
    assert ema_has_ema and not raw_has_ema and "ema_top1" in ema_val and "ema_top1" not in raw_val
    assert raw.keys() == ema.keys() and all(torch.equal(raw[k], ema[k]) for k in raw)
    assert {k: raw_val[k] for k in ("top1", "top5", "loss")} == {k: ema_val[k] for k in ("top1", "top5", "loss")}


def test_ema_settings_cannot_change_on_resume_and_runs_from_before_them_still_resume(tmp_path):
    """An EMA depends on every past step's decay: turning it on, off or changing it on resume would match no
    uninterrupted run. A run folder written before these settings existed resumes with their defaults."""
    import yaml

    from dist_bot.config import to_yaml
    from dist_bot.errors import RunError
    from dist_bot.train.state import check_run_dir

    cfg = load_config(None, [])
    old = yaml.safe_load(to_yaml(cfg))
    del old["model"]["ema_decay"], old["model"]["ema_warmup"], old["loss"]["distill"]["teacher_weights"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_run_dir(cfg, tmp_path)  # the defaults: the same run
    with pytest.raises(RunError, match=r"model\.ema_decay: 0\.0 -> 0\.9"):
        check_run_dir(load_config(None, ["model.ema_decay=0.9"]), tmp_path)
