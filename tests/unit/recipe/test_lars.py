"""LARS (dist_bot/recipe/lars.py) against its formula written out by hand, against timm's Lars, and inside the
pieces it must fit: the no-bias-decay groups, fused SGD's on-device skip, fp16 unscaling, flat ZeRO partitions.
Across strategies (norms over whole parameters, not shards): tests/system/test_strategies.py."""

import pytest
import torch
from torch import nn

from dist_bot.config import load_config
from dist_bot.distributed.ddp import DDPStrategy
from dist_bot.distributed.env import DistEnv
from dist_bot.distributed.strategy import step_unless
from dist_bot.models import build_model
from dist_bot.recipe.lars import LARS, FlatPartition, make_lars, trust_ratio
from dist_bot.recipe.param_groups import param_groups
from dist_bot.recipe.sgd import make_sgd


def test_one_step_is_the_formula_written_by_hand():
    """w' = w - lr x [g' + m x v] (Nesterov, v = g' on the first step), g' = trust x (g + wd w), trust =
    eta ||w|| / (||g|| + wd ||w|| + eps); a bias in a lars=False group is plain SGD with its own decay (0)."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8))
    gw, gb = torch.randn_like(w), torch.randn_like(b)
    lr, m, wd, eta, eps = 2.5, 0.9, 5e-5, 0.001, 1e-6
    opt = LARS(
        [{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "lars": False}],
        momentum=m,
        nesterov=True,
        eta=eta,
        eps=eps,
    )
    for group in opt.param_groups:
        group["lr"] = lr
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()

    trust = eta * w0.norm() / (gw.norm() + wd * w0.norm() + eps)
    g = trust * (gw + wd * w0)
    torch.testing.assert_close(w.detach(), w0 - lr * (g + m * g))
    torch.testing.assert_close(b.detach(), b0 - lr * (gb + m * gb))  # not adapted
    assert opt.param_groups[0]["weight_decay"] == wd  # SGD's own decay is bypassed only inside the step
    assert 0.0001 < trust.item() < 0.01  # a real scaling, not 1


def test_trust_ratio_is_one_where_a_norm_is_zero():
    w, g = torch.tensor([0.0, 2.0, 2.0]), torch.tensor([1.0, 0.0, 4.0])
    torch.testing.assert_close(trust_ratio(w, g, 0.5, 0.01, 0.0), torch.tensor([1.0, 1.0, 0.01 * 2 / (4 + 1)]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_same_steps_as_timms_lars_with_a_changing_lr(nesterov):
    """timm.optim.Lars (the same variant: lr outside the momentum) on plain tensors, ten steps of warmup-like lr."""
    timm_lars = pytest.importorskip("timm.optim").Lars
    torch.manual_seed(1)
    shapes = [(16, 8, 3, 3), (10, 16), (5,)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    kw = {"momentum": 0.9, "nesterov": nesterov}
    a = LARS([{"params": ours, "weight_decay": 1e-4}], eta=0.002, eps=1e-8, **kw)
    b = timm_lars([{"params": theirs, "weight_decay": 1e-4}], lr=1.0, trust_coeff=0.002, eps=1e-8, **kw)
    for step in range(10):
        grads = [torch.randn(s) * 10 ** (step % 3 - 1) for s in shapes]
        for opt, params in ((a, ours), (b, theirs)):
            opt.param_groups[0]["lr"] = 0.5 * (step + 1)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q)


def test_groups_of_resnet_adapt_conv_and_linear_weights_only():
    """make_lars over param_groups: BN gamma/beta and biases ("no_decay") step exactly as plain SGD does."""
    torch.manual_seed(0)
    model = build_model("resnet18d", num_classes=10, zero_init_last=False)  # zero gamma: zero gradients
    twin = build_model("resnet18d", num_classes=10, zero_init_last=False)
    twin.load_state_dict(model.state_dict())
    lars = make_lars(param_groups(model, 1e-4), 0.9, True, eta=0.001, eps=0.0)
    sgd = make_sgd(param_groups(twin, 1e-4), 0.9, True)
    assert [g["lars"] for g in lars.param_groups] == [True, False]
    assert all(g["fused"] for g in lars.param_groups)  # torch's fused kernel still does the step
    x = torch.randn(4, 3, 32, 32)
    for m, opt in ((model, lars), (twin, sgd)):
        for g in opt.param_groups:
            g["lr"] = 1.0
        m(x).logsumexp(1).mean().backward()
        opt.step()
    decayed = {id(p) for p in lars.param_groups[0]["params"]}
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if id(p) in decayed:
            assert not torch.allclose(p, q), name  # trust ratio ~1e-3: far from SGD's lr 1 step
        else:
            torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("fused", [True, None])
def test_a_nonfinite_gradient_skips_the_step_on_the_device(fused):
    """step_unless: fused SGD's found_inf, or the multi-tensor form's undo, still holds after the LARS transform
    (which turns the inf into NaNs in the whole layer)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    opt = LARS([{"params": [w], "weight_decay": 1e-4}], fused=fused)
    opt.param_groups[0]["lr"] = 1.0
    opt.state[w]["momentum_buffer"] = torch.zeros_like(w)
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    w.grad[0, 0] = float("inf")
    step_unless(opt, torch.ones(()))
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["momentum_buffer"], torch.zeros_like(w))
    w.grad = torch.randn_like(w)
    step_unless(opt, torch.zeros(()))
    assert not torch.equal(w.detach(), before)


def test_a_flat_partition_is_normed_per_parameter_not_as_a_whole():
    """A ZeRO-like flat tensor (two parameters with alignment padding between and after them): each piece gets
    its own parameter's trust ratio, exactly as the same parameters held separately."""
    torch.manual_seed(0)
    a, b = torch.randn(7), torch.randn(12)
    ga, gb = torch.randn(7), torch.randn(12) * 50
    flat = nn.Parameter(torch.cat([a, torch.zeros(1), b, torch.zeros(4)]))
    flat.grad = torch.cat([ga, torch.zeros(1), gb, torch.zeros(4)])
    opt = LARS([{"params": [flat], "weight_decay": 1e-3}], eta=0.01)
    opt.set_flat_partition(flat, FlatPartition((7, 1, 12, 4), (0, None, 1, None), num_params=2))
    pa, pb = nn.Parameter(a.clone()), nn.Parameter(b.clone())
    pa.grad, pb.grad = ga.clone(), gb.clone()
    ref = LARS([{"params": [pa, pb], "weight_decay": 1e-3}], eta=0.01)
    for opt_ in (opt, ref):
        opt_.param_groups[0]["lr"] = 3.0
        opt_.step()
    torch.testing.assert_close(flat.detach()[:7], pa.detach())
    torch.testing.assert_close(flat.detach()[8:20], pb.detach())
    with pytest.raises(ValueError, match="described as 20"):
        opt.set_flat_partition(flat, FlatPartition((7, 1, 12), (0, None, 1), num_params=2))


def test_fp16_gradients_are_unscaled_before_the_norms():
    """Under fp16 the loss (so the gradient) is multiplied by the loss scale 1024. Unscaled first, the trust
    ratio sees the true gradient norm: the same weights as fp32 (scaled, ||g|| would be 1024x, and the wd term
    of the denominator and the added decay would shrink relative to it, changing the step)."""

    def run(precision):
        torch.manual_seed(0)
        cfg = load_config(None, [f"precision={precision}", "loss_scale.init_scale=1024", "optim.name=lars"])
        model = nn.Linear(4, 3)
        groups = [
            {"params": [model.weight], "weight_decay": 0.05, "name": "decay"},
            {"params": [model.bias], "weight_decay": 0.0, "name": "no_decay"},
        ]
        s = DDPStrategy(model, lambda m: make_lars(groups, 0.9, True, eta=0.01, eps=0.0), DistEnv(), cfg)
        s.set_lr(5.0)
        torch.manual_seed(1)
        for _ in range(3):
            s.backward(model(torch.randn(5, 4)).square().mean())
            s.step()
        return model.weight.detach()

    torch.testing.assert_close(run("fp16"), run("fp32"))


@pytest.mark.slow
def test_a_run_trains_with_lars_and_poly_decay(tiny_digits, tmp_path):
    """`optim.name=lars schedule.decay=poly` through the CLI: the engine builds LARS over the no-bias-decay groups
    (checkpointed with them) and sets the poly lr of every step."""
    import json

    from dist_bot.checkpoint import list_checkpoints, read_file
    from dist_bot.cli import main

    args = ["train", "configs/demo.yaml", f"data.path={tiny_digits}", "model.name=resnet10d", "data.workers=1"]
    args += [
        "wandb.mode=disabled",
        "precision=fp32",
        "optim.name=lars",
        "optim.base_lr_per_256=4.0",
        "data.batch_size=16",
    ]
    args += ["schedule.decay=poly", "schedule.end_lr=0.01", "schedule.epochs=1", "schedule.warmup_epochs=0"]
    assert main([*args, "run.log_every_steps=1", f"run.out_dir={tmp_path}", "run.name=lars"]) == 0
    steps = [json.loads(x) for x in (tmp_path / "lars" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if x["split"] == "train"]
    peak, T = 4.0 * 16 / 256, len(steps)  # one process x 16 images
    assert T >= 6 and all(x["loss"] < 10 for x in steps)
    for t, x in enumerate(steps):
        assert x["lr"] == pytest.approx((peak - 0.01) * (1 - t / T) ** 2 + 0.01)
    saved = read_file(list_checkpoints(tmp_path / "lars" / "checkpoints")[-1] / "train_state.pt")
    groups = saved["optimizer"]["param_groups"]
    assert [(g["name"], g["lars"]) for g in groups] == [("decay", True), ("no_decay", False)]
