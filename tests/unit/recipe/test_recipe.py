"""Each recipe piece against the paper's formula (SPEC.md, "The recipe, exactly")."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dist_bot.config import load_config
from dist_bot.distributed.ddp import DDPStrategy
from dist_bot.distributed.env import DistEnv
from dist_bot.distributed.strategy import LossScaleGuard
from dist_bot.errors import ConfigError, LossScaleCollapse
from dist_bot.models import build_model
from dist_bot.recipe.losses import distillation_loss, mix_pairs, mixup, smooth_targets, soft_cross_entropy
from dist_bot.recipe.lr import LRSchedule, build_schedule, scaled_lr
from dist_bot.recipe.param_groups import param_groups

# -- learning rate --------------------------------------------------------------------------------


def test_linear_scaling_uses_the_global_batch():
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    # per-process batch 64 x 8 processes x 2 accumulation steps = 1024
    cfg = load_config(None, ["optim.grad_accum_steps=2"])
    sched = build_schedule(cfg.schedule, 0.1, 256, global_batch=64 * 8 * 2, steps_per_epoch=100)
    assert sched.peak_lr == pytest.approx(0.4)


def test_warmup_is_linear_per_iteration_and_reaches_the_peak():
    s = LRSchedule(peak_lr=0.4, total_steps=1000, warmup_steps=100, decay="cosine")
    # the paper's i-th batch (1-based) gets i * eta / m
    assert s(0) == pytest.approx(0.4 / 100)
    assert s(49) == pytest.approx(50 * 0.4 / 100)
    assert s(99) == pytest.approx(0.4)
    assert all(s(i) < s(i + 1) for i in range(99))  # rises every iteration, not every epoch


def test_cosine_decay_after_warmup():
    s = LRSchedule(peak_lr=0.4, total_steps=1100, warmup_steps=100, decay="cosine")
    T = 1000
    for t in (0, 1, 250, 500, 750, 999):
        assert s(100 + t) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / T)) * 0.4)
    assert s(600) == pytest.approx(0.2)
    assert s(1100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("epochs", "warmup", "decay"), [(5, 1, "cosine"), (12, 3, "cosine"), (12, 0, "cosine")])
def test_stepping_per_epoch_is_timms_train_py_schedule(epochs, warmup, decay):
    """schedule.stepping=epoch reproduces timm's cosine schedule as train.py drives it (create_scheduler_v2,
    step(epoch) at every epoch's start, warmup_prefix False, warmup from warmup_lr): one lr per epoch, held over
    its steps. (Step decay stays at its milestones: timm's multistep decays one epoch before them.)"""
    timm_scheduler = pytest.importorskip("timm.scheduler", reason="timm is not installed (pip install -e '.[dev]')")
    over = [f"schedule.epochs={epochs}", f"schedule.warmup_epochs={warmup}", "schedule.stepping=epoch"]
    over += ["schedule.warmup_lr=1e-5", "schedule.step_milestones=[4,8]"]
    cfg = load_config(None, over)
    ours = build_schedule(cfg.schedule, 0.1, 256, global_batch=64, steps_per_epoch=7)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.025)
    theirs, _ = timm_scheduler.create_scheduler_v2(
        opt, sched=decay, num_epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-5, decay_milestones=[4, 8]
    )
    for epoch in range(epochs):
        theirs.step(epoch)
        want = opt.param_groups[0]["lr"]
        assert [ours(epoch * 7 + k) for k in (0, 3, 6)] == pytest.approx([want] * 3, rel=1e-9, abs=1e-12), epoch


def test_step_decay_of_the_baseline():
    cfg = load_config(None, ["schedule.decay=step", "schedule.warmup_epochs=0", "schedule.epochs=120"])
    s = build_schedule(cfg.schedule, 0.1, 256, global_batch=256, steps_per_epoch=10)
    assert s(0) == pytest.approx(0.1) and s(299) == pytest.approx(0.1)
    assert s(300) == pytest.approx(0.01) and s(600) == pytest.approx(0.001) and s(900) == pytest.approx(1e-4)


def test_poly_decay_after_warmup_is_the_formula():
    """lr = (peak - end) (1 - t/T)^power + end, t the step after warmup, T the steps after warmup (LARS recipes)."""
    cfg = load_config(
        None,
        ["schedule.decay=poly", "schedule.poly_power=2", "schedule.end_lr=0.0001", "schedule.warmup_epochs=5"],
    )
    s = build_schedule(cfg.schedule, 0.3125, 256, global_batch=8192, steps_per_epoch=10)  # peak 10.0 (MLPerf, 8k)
    peak, end, T = 10.0, 1e-4, (120 - 5) * 10
    assert s(0) == pytest.approx(peak / 50) and s(49) == pytest.approx(peak)  # the same linear warmup
    for t in (0, 1, 100, T // 2, T - 1):
        assert s(50 + t) == pytest.approx((peak - end) * (1 - t / T) ** 2 + end)
    assert s(50 + T) == pytest.approx(end) and s(50 + T + 7) == pytest.approx(end)  # stays at the end lr
    cubic = LRSchedule(peak_lr=1.0, total_steps=100, decay="poly", power=3.0)
    assert cubic(50) == pytest.approx(0.5**3) and all(cubic(i) > cubic(i + 1) for i in range(99))


def test_poly_end_lr_above_the_peak_is_an_error():
    cfg = load_config(None, ["schedule.decay=poly", "schedule.end_lr=1.0"])
    with pytest.raises(ConfigError, match=r"schedule\.end_lr=1 is above the peak lr 0\.4"):
        build_schedule(cfg.schedule, 0.1, 256, global_batch=1024, steps_per_epoch=10)


# -- no bias decay --------------------------------------------------------------------------------


def test_no_bias_decay_groups_of_resnet50d_by_module_type():
    model = build_model("resnet50d")
    decay, no_decay = param_groups(model, 1e-4, no_bias_decay=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    n_decay = sum(p.numel() for p in decay["params"])
    n_no_decay = sum(p.numel() for p in no_decay["params"])
    assert n_decay == sum(m.weight.numel() for m in convs) + model.fc.weight.numel() == 25_522_016
    assert n_no_decay == sum(2 * m.num_features for m in bns) + model.fc.bias.numel() == 54_248
    assert n_decay + n_no_decay == 25_576_264
    assert len(decay["params"]) == len(convs) + 1 and len(no_decay["params"]) == 2 * len(bns) + 1
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)


def test_no_bias_decay_off_decays_everything():
    (group,) = param_groups(build_model("resnet18d"), 1e-4, no_bias_decay=False)
    assert group["weight_decay"] == 1e-4 and sum(p.numel() for p in group["params"]) == 11_708_744


# -- label smoothing ------------------------------------------------------------------------------


def test_paper_label_smoothing_spreads_eps_over_the_other_classes():
    q = smooth_targets(torch.tensor([2, 0]), num_classes=5, eps=0.1, form="paper")
    assert q[0].tolist() == pytest.approx([0.025, 0.025, 0.9, 0.025, 0.025])
    assert q[1, 0] == pytest.approx(0.9) and q.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_torch_label_smoothing_matches_pytorchs_cross_entropy():
    q = smooth_targets(torch.tensor([2]), num_classes=5, eps=0.1, form="torch")
    assert q[0].tolist() == pytest.approx([0.02, 0.02, 0.92, 0.02, 0.02])
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    expected = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    got = soft_cross_entropy(logits, smooth_targets(labels, 5, 0.1, form="torch"))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_smoothing_is_plain_cross_entropy():
    logits, labels = torch.randn(8, 7), torch.randint(0, 7, (8,))
    got = soft_cross_entropy(logits, smooth_targets(labels, 7, 0.0))
    assert got.item() == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


# -- mixup ----------------------------------------------------------------------------------------


def test_mixup_mixes_images_and_targets_with_the_same_lambda():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2).clone()
    targets = torch.eye(4)
    rng = np.random.default_rng(0)
    lam_expected = np.random.default_rng(0).beta(0.2, 0.2)
    mixed, mixed_t, lam = mixup(images, targets, alpha=0.2, rng=rng, pairing="flip")
    assert lam == pytest.approx(lam_expected)
    # flip pairs i with n - 1 - i
    assert mixed[0, 0, 0, 0].item() == pytest.approx(lam * 0 + (1 - lam) * 3)
    assert mixed_t[0].tolist() == pytest.approx([lam, 0, 0, 1 - lam])
    assert mixed_t.sum(1).tolist() == pytest.approx([1.0] * 4)


def test_mixup_alpha_zero_is_identity():
    images, targets = torch.randn(6, 3, 4, 4), torch.eye(6)
    same = mixup(images, targets, alpha=0.0, rng=np.random.default_rng(0))
    assert same[0] is images and same[1] is targets and same[2] == 1.0


@pytest.mark.parametrize("pairing", ["flip", "permute"])
def test_mixup_mixes_each_image_with_its_partner(pairing):
    """mixed[i] = lam x[i] + (1 - lam) x[j(i)], and the same for the targets, where j is the pairing: each row's
    partner is found from the output itself (the one j for which the formula holds), then compared with the
    pairing the seed gives."""
    n, seed = 8, 23  # Beta(0.2, 0.2) is mostly near 0 or 1; seed 23 draws lam = 0.597, far from both
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randn(n, 3, 4, 4, generator=g), torch.softmax(torch.randn(n, 10, generator=g), 1)
    mixed, mixed_t, lam = mixup(images, targets, alpha=0.2, rng=seed, pairing=pairing)
    assert 0.55 < lam < 0.65
    partner = []
    for i in range(n):
        (j,) = [j for j in range(n) if torch.allclose(mixed[i], lam * images[i] + (1 - lam) * images[j], atol=1e-6)]
        assert torch.allclose(mixed_t[i], lam * targets[i] + (1 - lam) * targets[j], atol=1e-7)
        partner.append(j)
    assert sorted(partner) == list(range(n))  # every image is someone's partner: the batch mixes with itself
    if pairing == "flip":
        assert partner == list(range(n - 1, -1, -1))
    else:
        rng = np.random.default_rng(seed)
        rng.beta(0.2, 0.2)  # lambda is drawn first, then the permutation
        assert partner == mix_pairs(n, "permute", rng).tolist()
        assert partner not in (list(range(n)), list(range(n - 1, -1, -1)))  # neither identity nor the flip


# -- distillation ---------------------------------------------------------------------------------


def test_distillation_loss_on_hand_made_logits():
    z = torch.tensor([[2.0, 0.0, -2.0]])  # student
    r = torch.tensor([[1.0, 3.0, 0.0]])  # teacher
    p = torch.tensor([[1.0, 0.0, 0.0]])  # true (one-hot) target
    T = 2.0

    def ce(q, logits):
        return -sum(
            qi * math.log(math.exp(li) / sum(math.exp(x) for x in logits)) for qi, li in zip(q, logits, strict=True)
        )

    soft_teacher = [math.exp(v / T) / sum(math.exp(x / T) for x in r[0].tolist()) for v in r[0].tolist()]
    expected = 0.7 * ce(p[0].tolist(), z[0].tolist()) + 0.3 * T**2 * ce(soft_teacher, (z[0] / T).tolist())
    got = distillation_loss(z, r, p, temperature=T, hard_weight=0.7, soft_weight=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_distillation_soft_term_vanishes_when_student_equals_teacher_at_high_T():
    z = torch.randn(4, 10)
    p = torch.eye(10)[:4]
    only_hard = distillation_loss(z, z, p, temperature=20.0, hard_weight=1.0, soft_weight=0.0)
    assert only_hard.item() == pytest.approx(soft_cross_entropy(z, p).item())
    # the soft term alone is T^2 times the entropy of the teacher's softened distribution: its minimum
    soft = distillation_loss(z, z, p, temperature=20.0, hard_weight=0.0, soft_weight=1.0)
    q = torch.softmax(z / 20, dim=1)
    assert soft.item() == pytest.approx((400 * -(q * q.log()).sum(1).mean()).item(), rel=1e-5)


# -- fp16 dynamic loss scaling --------------------------------------------------------------------


def make_strategy(precision="fp16"):
    torch.manual_seed(0)
    cfg = load_config(None, [f"precision={precision}", "loss_scale.init_scale=1024", "loss_scale.growth_interval=2"])
    model = nn.Linear(4, 2)
    return DDPStrategy(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), DistEnv(), cfg), model


def test_overflow_skips_the_step_and_halves_the_scale():
    strategy, model = make_strategy()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(3, 4)).sum()
    strategy.backward(loss)
    model.weight.grad[0, 0] = float("inf")  # an injected overflow
    assert strategy.step().tolist() is False  # a device tensor: the engine reads it only at log steps
    assert strategy.loss_scale == 512
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_clean_steps_update_weights_and_grow_the_scale():
    strategy, model = make_strategy()
    before = model.weight.detach().clone()
    for _ in range(2):
        strategy.backward(model(torch.randn(3, 4)).sum())
        assert strategy.step().tolist() is True
    assert strategy.loss_scale == 2048  # doubled after growth_interval=2 clean steps
    assert not torch.equal(before, model.weight)


def test_scaled_gradients_are_unscaled_before_the_update():
    fp16, m16 = make_strategy("fp16")
    fp32, m32 = make_strategy("fp32")
    x = torch.randn(3, 4)
    for s, m in ((fp16, m16), (fp32, m32)):
        s.backward(m(x).sum())
        s.step()
    torch.testing.assert_close(m16.weight, m32.weight)


def test_the_step_reads_lr_loss_scale_and_skip_flag_from_device_memory_that_stays_in_place():
    """A step capturable in a CUDA graph (issue 26): the fused SGD's lr is a 0-dim float32 tensor written in place
    by set_lr, the fp16 loss scale a tensor GradScaler updates in place, the skip flag decided on the device. So a
    graph captured once reads each step's lr and scale from the same memory. The weights equal those of the same
    steps with a host float lr exactly, through a skipped (overflow) step; a checkpoint whose lr is a float (one
    written before) is restored with its lr back on the device."""
    from dist_bot.recipe.sgd import make_sgd

    def build():
        torch.manual_seed(0)
        cfg = load_config(None, ["precision=fp16", "loss_scale.init_scale=1024", "loss_scale.growth_interval=2"])
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        groups = param_groups(model, 1e-4, True)
        return DDPStrategy(model, lambda m: make_sgd(groups, 0.9, True), DistEnv(), cfg), model

    dev, m_dev = build()
    host, m_host = build()
    for group in host.optimizer.param_groups:
        group["lr"] = 0.0  # the host-float form, the reference
    lrs = [g["lr"] for g in dev.optimizer.param_groups]
    assert all(isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.dtype == torch.float32 for lr in lrs)
    addresses = None
    torch.manual_seed(1)
    for step, lr in enumerate([0.05, 0.1, 0.2, 0.15, 0.1]):
        x = torch.randn(4, 6)
        for s, m in ((dev, m_dev), (host, m_host)):
            s.set_lr(lr)
            s.backward(m(x).square().mean())
            if step == 2:
                m[0].weight.grad[0, 0] = float("inf")  # an overflow: skipped, the scale halved
            s.step()
        assert all(g["lr"] is lr for g, lr in zip(dev.optimizer.param_groups, lrs, strict=True))  # written in place
        assert [lr.item() for lr in lrs] == [torch.tensor(lr).item()] * len(lrs)
        now = [lr.data_ptr() for lr in lrs] + [dev.scaler._scale.data_ptr()]  # GradScaler makes it at step 1
        assert now == (addresses := addresses or now)
    assert dev.loss_scale == host.loss_scale == 2048  # 1024, x2 after 2 clean steps, /2 on the overflow, x2
    for a, b in zip(m_dev.parameters(), m_host.parameters(), strict=True):
        assert torch.equal(a, b)
    state = {"model": m_host.state_dict(), "optimizer": host.optimizer.state_dict(), "scaler": host.scaler.state_dict()}
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    dev.apply(state)
    restored = [g["lr"] for g in dev.optimizer.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in restored)
    assert [lr.item() for lr in restored] == [torch.tensor(0.1).item()] * len(restored)


def test_loss_scale_collapse_stops_with_a_clear_error():
    """update() only does arithmetic on the step's (device) values; check() reads them (at log steps)."""
    guard = LossScaleGuard(min_scale=1.0, max_steps_at_min=3)
    guard.update(torch.tensor(2.0), taken=torch.tensor(False))
    guard.check()
    guard.update(torch.tensor(1.0), taken=torch.tensor(False))
    guard.update(torch.tensor(0.5), taken=torch.tensor(False))
    guard.check()  # 2 steps at the minimum so far
    guard.update(torch.tensor(0.25), taken=torch.tensor(False))
    with pytest.raises(LossScaleCollapse, match=r"loss scale has been <= 1 for 3 steps.*precision=bf16"):
        guard.check()
    assert guard.skipped_total == 4
    recovered = LossScaleGuard(min_scale=1.0, max_steps_at_min=3)
    for scale in (1.0, 1.0, 2.0, 1.0, 1.0):  # a clean step above the minimum resets the count
        recovered.update(torch.tensor(scale), taken=torch.tensor(True))
    recovered.check()
    assert (recovered.steps_at_min, recovered.skipped_total) == (2, 0)
    recovered.update(torch.tensor(1.0), taken=torch.tensor(True))  # the run at the minimum spans two checks
    with pytest.raises(LossScaleCollapse):
        recovered.check()


def test_the_multi_tensor_guarded_step_undoes_a_skipped_step_in_a_few_kernels():
    """step_unless on the multi-tensor SGD (FSDP2's form): a skipped step (an inf gradient) leaves every weight and
    momentum buffer as it was, a kept one changes them; the undo is one where per dtype, not one per tensor."""
    from dist_bot.distributed.strategy import step_unless, zero_momentum

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)
    zero_momentum(opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    step_unless(opt, torch.zeros(()))  # a kept step: the momentum buffers are now nonzero
    saved = [t.clone() for p in model.parameters() for t in (p, opt.state[p]["momentum_buffer"])]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    next(model.parameters()).grad[0, 0] = float("inf")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_unless(opt, torch.ones(()))
    now = [t for p in model.parameters() for t in (p, opt.state[p]["momentum_buffer"])]
    assert all(torch.equal(a, b) for a, b in zip(saved, now, strict=True))
    wheres = sum(e.count for e in prof.key_averages() if e.key == "aten::where")
    assert 1 <= wheres <= 2, wheres  # 40 tensors, one dtype
    step_unless(opt, torch.zeros(()))
    now = [t for p in model.parameters() for t in (p, opt.state[p]["momentum_buffer"])]
    assert not any(torch.equal(a, b) for a, b in zip(saved, now, strict=True))
