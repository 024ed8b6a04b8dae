"""Today's augmentations, off by default: data.auto_augment (RandAugment, TrivialAugment, AutoAugment) and
data.random_erasing on both loaders from each image's one draw, data.interpolation, data.repeated_aug inside the
exact plan, loss.cutmix_alpha beside mixup."""

import numpy as np
import pytest
import torch
from PIL import Image

from dist_bot.config import load_config
from dist_bot.data.loader import train_augmentation
from dist_bot.data.plan import (
    AUGMENT_BINS,
    AUGMENT_SUITES,
    AUTO_AUGMENT_POLICY,
    Augmentation,
    augment_param,
    draw,
    epoch_order,
    plan_epoch,
)
from dist_bot.errors import ConfigError
from dist_bot.recipe.losses import cutmix, mix, mixup

SUITES = ["rand", "trivial", "auto"]


def needs_dali():
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")


# -- one table, DALI's --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_the_suites_are_dalis_operations_ranges_and_parameters(suite):
    """plan.AUGMENT_SUITES is what the torch loader applies without DALI; it must be DALI's suites: the same
    operations in the same order (the drawn index picks one in both), magnitude ranges, negation, and parameters
    at every bin and sign."""
    needs_dali()
    from nvidia.dali.auto_aug import auto_augment

    from dist_bot.data.dali_loader import dali_suite

    ours, dalis = AUGMENT_SUITES[suite], dali_suite(suite)
    assert [op[0] for op in ours] == [a.name for a in dalis]
    for op, (name, lo, hi, signed) in enumerate(ours):
        aug = dalis[op]
        assert (tuple(aug.mag_range) if aug.mag_range is not None else (0.0, 0.0)) == pytest.approx((lo, hi))
        assert aug.randomly_negate == signed, name
        if aug.mag_range is None:
            continue
        magnitudes = aug._get_magnitudes(AUGMENT_BINS[suite])
        for bin in range(AUGMENT_BINS[suite]):
            for sign in (0, 1):
                param = aug._map_mag_to_param(magnitudes[bin] * (-1 if sign and signed else 1))
                _, ours_param = augment_param(suite, op, bin, sign)
                if name == "sharpness":  # DALI's kernel, ours its factor f: f identity - (f - 1) smooth
                    assert param[1, 1] == pytest.approx(ours_param - (ours_param - 1) * 5 / 13, abs=1e-6)
                elif name == "posterize":  # DALI's mask, ours the bits kept
                    bits = min(8, max(1, int(np.round(np.float32(ours_param)))))
                    assert int(param) == 255 ^ (2 ** (8 - bits) - 1)
                elif name.startswith(("shear", "translate")):  # DALI's [x, y] pair
                    assert max(param, key=abs) == pytest.approx(ours_param, abs=1e-6)
                else:
                    assert float(param) == pytest.approx(ours_param, abs=1e-5), (name, bin, sign)
    if suite == "auto":
        policy = auto_augment.get_image_net_policy(use_shape=True)
        dali_policy = [tuple((a.name, p, m or 0) for a, p, m in sub) for sub in policy.sub_policies]
        assert list(AUTO_AUGMENT_POLICY) == dali_policy
        assert policy.num_magnitude_bins == AUGMENT_BINS["auto"]


def crops(n: int, size: int = 64) -> list[np.ndarray]:
    """``n`` natural-looking uint8 HWC images: gradients with texture, distinct per image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for k in range(n):
        base = np.stack([xx * (2 + k % 3), yy * 3, (xx + yy) * 1.5], axis=2) + 20 * np.sin(xx / 5 + k)[..., None]
        out.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("suite", SUITES)
def test_each_operation_is_applied_alike_by_dali_and_by_the_torch_loader(suite):
    """Every operation of the suite at its first, middle and last bin, both signs, on DALI's pipeline (its own
    augmentations, selected per image from the feeder's fields) and with the torch loader's PIL/numpy
    implementation: the photometric ones equal to within rounding, the geometric ones (PIL's bilinear against
    DALI's warp) within a few grey levels on average."""
    needs_dali()
    from nvidia.dali import fn, pipeline_def

    from dist_bot.data.dali_loader import auto_augment
    from dist_bot.data.torch_loader import apply_op

    bins = AUGMENT_BINS[suite]
    cases = [(op, b, s) for op in range(len(AUGMENT_SUITES[suite])) for b in (0, bins // 2, bins - 1) for s in (0, 1)]
    images = crops(len(cases))
    data = load_config(None, [f"data.auto_augment={suite}", "data.auto_augment_ops=1"]).data
    slots = 2 if suite == "auto" else 1  # AutoAugment's sub-policies: two; the second identity here
    identity = [op[0] for op in AUGMENT_SUITES[suite]].index("identity")
    fields = {
        "aa_op": [np.array([op] + [identity] * (slots - 1), np.int32) for op, _, _ in cases],
        "aa_bin": [np.array([b] + [0] * (slots - 1), np.int32) for _, b, _ in cases],
        "aa_sign": [np.array([s] + [0] * (slots - 1), np.int32) for _, _, s in cases],
    }

    @pipeline_def(batch_size=len(cases), num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        x = {k: fn.external_source(source=constant(v), batch=True) for k, v in fields.items()}
        imgs = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return auto_augment(imgs, x, data)

    def constant(batch):  # DALI would pass an iteration number to a callable with a parameter
        return lambda: batch

    p = pipe()
    p.build()
    (out,) = p.run()
    worst = {}
    for k, (op, b, s) in enumerate(cases):
        name, param = augment_param(suite, op, b, s)
        ours = np.asarray(apply_op(Image.fromarray(images[k]), name, param), dtype=np.float32)
        diff = np.abs(np.asarray(out[k], dtype=np.float32) - ours)
        inner = diff[2:-2, 2:-2]  # the 1-pixel border: PIL's sharpness keeps it, DALI filters it (its docs)
        worst[name] = max(worst.get(name, 0.0), float(inner.mean()))
        geometric = name.startswith(("shear", "translate", "rotate"))
        if not geometric:
            assert inner.max() <= 1, (name, b, s, inner.max())
    print(suite, {k: round(v, 2) for k, v in worst.items()})
    assert max(worst.values()) < 4.0, worst


# -- the draw -----------------------------------------------------------------------------------------------------


def test_the_new_draws_come_after_the_papers_and_change_none_of_them():
    """Turning on an augmentation of today changes none of the paper's draws (a run without it is unchanged), and
    each image's draw is a function of its (seed, epoch, index)."""
    paper = draw(0, 3, 17, 500, 375, Augmentation(), 128)
    every = Augmentation(interpolation="random", auto_augment="rand", random_erasing=1.0)
    today = draw(0, 3, 17, 500, 375, every, 128)
    assert (today.box, today.flip, today.twist, today.alpha) == (paper.box, paper.flip, paper.twist, paper.alpha)
    assert (paper.bicubic, paper.ops, paper.erase) == (False, (), (0, 0, 0, 0))
    assert today == draw(0, 3, 17, 500, 375, every, 128)
    draws = [draw(0, 3, i, 500, 375, every, 128) for i in range(400)]
    assert 150 < sum(d.bicubic for d in draws) < 250  # random: one of the two, even odds
    assert all(len(d.ops) == 2 and all(b == 9 for _, b, _ in d.ops) for d in draws)  # RandAugment: N=2, M=9
    assert len({op for d in draws for op, _, _ in d.ops}) == len(AUGMENT_SUITES["rand"])  # with replacement, all
    for d in draws:  # torchvision's RandomErasing: 2-33 % of the area, inside the image
        x, y, w, h = d.erase
        assert w * h == 0 or (0.02 * 128**2 * 0.9 <= w * h <= 128**2 / 3 * 1.1 and x + w <= 128 and y + h <= 128)
    assert sum(d.erase[2] > 0 for d in draws) > 300  # probability 1: erased unless no try fits


def test_autoaugment_draws_a_sub_policy_and_applies_each_operation_with_its_probability():
    settings = Augmentation(auto_augment="auto")
    names = [op[0] for op in AUGMENT_SUITES["auto"]]
    draws = [draw(1, 0, i, 300, 300, settings, 64).ops for i in range(3000)]
    first = [names[ops[0][0]] for ops in draws]
    # the first sub-policy's first operation, equalize with p 0.8, is one of the most frequent; identity when
    # an operation is not applied
    assert "identity" in first and first.count("equalize") > first.count("invert") > 0
    bins = {(names[op], b) for ops in draws for op, b, _ in ops}
    assert ("rotate", 8) in bins and ("solarize_add", 3) in bins and ("shear_x", 9) in bins


# -- repeated augmentation -----------------------------------------------------------------------------------------


def test_repeated_augmentation_trains_each_image_k_times_on_k_processes_each_copy_drawn_apart():
    """data.repeated_aug=3 on 4 processes (ResNet strikes back's setting, DeiT's sampler): the epoch keeps its
    length, N/3 images three times each, the copies of an image on three different processes; a copy is planned
    as index + c N, so its draw differs; with k = 1 the plan is unchanged."""
    n, world, k = 1000, 4, 3
    order = epoch_order(n, 0, 5, True, repeats=k)
    assert len(order) == n and np.array_equal(epoch_order(n, 0, 5, True), epoch_order(n, 0, 5, True, repeats=1))
    plans = [plan_epoch(n, 25, r, world, 1, 0, 5, repeats=k) for r in range(world)]
    where = {}
    for r, steps in enumerate(plans):
        for step in steps:
            for i in (i for mb in step.micro_batches for i in mb):
                where.setdefault(i % n, []).append((r, i // n))
    counts = [len(v) for v in where.values()]
    assert sum(counts) == n and max(counts) == k and len(where) == -(-n // k)
    for copies in where.values():
        if len(copies) == k:
            assert len({r for r, _ in copies}) == k and sorted(c for _, c in copies) == list(range(k))
    drawn = {draw(0, 5, i + c * n, 500, 375, Augmentation(), 64).box for i in [order[0]] for c in range(k)}
    assert len(drawn) == k  # three crops of one image


def test_the_loaders_read_a_copys_image(imagenette_subset):
    """A repeated copy (index + c N) reads image index: the same label, a different crop."""
    from dist_bot.data import make_loaders
    from dist_bot.distributed.env import DistEnv

    args = [f"data.path={imagenette_subset}", "data.loader=torch", "data.image_size=32", "data.workers=0"]
    args += ["data.batch_size=12", "data.repeated_aug=3", "data.color_jitter=0", "data.pca_lighting=0"]
    train, _ = make_loaders(load_config(None, args), DistEnv())
    train.set_epoch(0)
    step = next(iter(train))
    (indices,) = step.plan.micro_batches
    micro = next(iter(step))
    n = len(train.images)
    labels = [train.images.samples[i % n][1] for i in indices]
    assert micro.labels.tolist() == labels and len({i % n for i in indices}) == 4  # 12 = 4 images x 3
    assert not torch.equal(micro.images[0], micro.images[1])  # copies 0 and 1 of one image, drawn apart
    train.close()


# -- CutMix -------------------------------------------------------------------------------------------------------


def test_cutmix_pastes_a_box_of_the_pair_and_mixes_the_targets_by_its_area():
    images = torch.arange(4 * 3 * 16 * 20, dtype=torch.float32).view(4, 3, 16, 20)
    targets = torch.eye(4)
    mixed, t, lam = cutmix(images, targets, 1.0, 7)
    pasted = (mixed != images).any(1)  # (N, H, W): where the pair's pixels are
    area = pasted[0].sum().item()
    assert 0 < area < 16 * 20 and lam == pytest.approx(1 - area / (16 * 20))
    where = pasted.unsqueeze(1).expand_as(mixed)
    assert torch.equal(mixed[where], images.flip(0)[where])
    assert torch.allclose(t, targets * lam + targets.flip(0) * (1 - lam)) and torch.allclose(t.sum(1), torch.ones(4))
    cl = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(cutmix(cl, targets, 1.0, 7)[0], mixed)  # channels_last alike


def test_with_both_each_micro_batch_takes_mixup_or_cutmix_and_mixup_alone_draws_as_before():
    images, targets = torch.rand(4, 3, 8, 8), torch.eye(4)
    for seed in range(5):
        a, b, _ = mix(images, targets, 0.2, 0.0, (0, 1, seed, 0))
        c, d, _ = mixup(images, targets, 0.2, (0, 1, seed, 0))
        assert torch.equal(a, c) and torch.equal(b, d)
    kinds = []
    for seed in range(200):
        out, _, _ = mix(images, targets, 0.2, 1.0, (0, 1, seed, 0))
        kinds.append("mixup" if (out != images).all() else "cutmix")
    assert 70 < kinds.count("cutmix") < 130


def test_an_augmentation_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match=r"data\.auto_augment"):
        load_config(None, ["data.auto_augment=randaug"])
    with pytest.raises(ConfigError, match=r"data\.random_erasing"):
        load_config(None, ["data.random_erasing=1.5"])


def test_the_settings_reach_the_draw():
    d = load_config(None, ["data.auto_augment=trivial", "data.random_erasing=0.25", "data.interpolation=random"]).data
    s = train_augmentation(d)
    assert (s.auto_augment, s.random_erasing, s.interpolation, s.min_crop_area) == ("trivial", 0.25, "random", 0.08)
