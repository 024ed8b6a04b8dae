"""The data interface served by torch, DALI (CPU-only mode here) and synthetic loaders."""

import json
import sys

import pytest
import torch
from conftest import REPO, pack_of, run_cmd

from dist_bot.config import load_config
from dist_bot.data.loader import micro_batches
from dist_bot.distributed.env import DistEnv


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory, digits_dir):
    """103 train and 103 val classes of one image each: a label is the identity of a sample. 103 divides
    neither the world size 2 nor the batch 8."""
    out = tmp_path_factory.mktemp("unique") / "data"
    for split in ("train", "val"):
        files = sorted((digits_dir / split).glob("*/*.jpg"))[:103]
        for i, f in enumerate(files):
            (out / split / f"{i:03d}").mkdir(parents=True)
            (out / split / f"{i:03d}" / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="module")
def one_image_per_class_pack(tmp_path_factory, one_image_per_class):
    return pack_of(one_image_per_class, tmp_path_factory.mktemp("unique") / "pack")


def needs(loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_two_ranks_read_every_sample_exactly_once(loader, one_image_per_class, one_image_per_class_pack, tmp_path):
    """A folder and its pack, in one launch of 2 processes."""
    needs(loader)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "probes" / "loader_probe.py"),
        f"{one_image_per_class},{one_image_per_class_pack}",
        loader,
        "8",
        str(tmp_path),
    ]
    res = run_cmd(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    for layout in ("0", "1"):  # the folder, then the pack
        ranks = [json.loads((tmp_path / layout / f"rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"] == 7  # 6 x 16 + one step of 7
        for epoch in (0, 1):
            steps = [r["train"][epoch] for r in ranks]
            assert len(steps[0]) == len(steps[1]) == 7
            assert all(len(s) > 0 for r in steps for s in r), "no rank may get an empty step"
            assert sorted(x for r in steps for s in r for x in s) == list(range(103))
            val = [x for r in ranks for x in r["val"][epoch]]
            assert sorted(val) == list(range(103)), "validation: every image once, padding never counted"
        order = [[x for s in r["train"][e] for x in s] for r in ranks for e in (0, 1)]
        assert order[0] != order[1], "the order changes with the epoch"
        for r in ranks:  # resumed inside epoch 1 at step 2: exactly the rest of that epoch
            assert r["resumed"] == r["train"][1][2:]


def loaders(loader, data, **over):
    from dist_bot.data import make_loaders

    args = [
        f"data.path={data}",
        f"data.loader={loader}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.workers=1",
        "data.color_jitter=0",
        "data.pca_lighting=0",
    ] + [f"{k}={v}" for k, v in over.items()]
    return make_loaders(load_config(None, args), DistEnv())


@pytest.fixture(scope="module")
def imagenette_subset_pack(tmp_path_factory, imagenette_subset):
    return pack_of(imagenette_subset, tmp_path_factory.mktemp("imagenette") / "pack", shard_size=2 * 10**6)


@pytest.mark.parametrize(("precision", "layout"), [("fp32", "folder"), ("fp16", "folder"), ("fp32", "pack")])
def test_dali_and_torch_batches_have_the_same_form(precision, layout, request):
    needs("dali")
    data = request.getfixturevalue("imagenette_subset" if layout == "folder" else "imagenette_subset_pack")
    out = {}
    for name in ("dali", "torch"):
        train, val = loaders(name, data, precision=precision)
        out[name] = (next(micro_batches(train)), next(iter(val)))
    for i in (0, 1):
        (xd, yd), (xt, yt) = out["dali"][i], out["torch"][i]
        assert xd.shape == xt.shape == (8, 3, 64, 64)
        assert xd.dtype == xt.dtype == (torch.float16 if precision == "fp16" else torch.float32)
        assert xd.is_contiguous(memory_format=torch.channels_last) and xt.is_contiguous(
            memory_format=torch.channels_last
        )
        assert yd.dtype == yt.dtype == torch.int64
        for x in (xd, xt):  # normalized ImageNet-style pixels
            assert -2.2 < x.float().min() < -1.0 and 1.5 < x.float().max() < 2.7
            assert abs(x.float().mean()) < 1.0
    (vd, yd), (vt, yt) = out["dali"][1], out["torch"][1]
    assert torch.equal(yd, yt)  # the same validation images in the same order (one process)
    diff = (vd.float() - vt.float()).abs()
    assert diff.mean() < 0.05, f"validation crops differ: mean |diff| {diff.mean():.3f} (normalized units)"


TODAYS = {"data.auto_augment": "trivial", "data.random_erasing": 0.5, "data.interpolation": "random"}


@pytest.mark.parametrize("today", [{}, TODAYS], ids=["paper", "trivialaugment+erasing+random_interpolation"])
def test_one_augmentation_draw_gives_both_loaders_the_same_images(imagenette_subset, monkeypatch, today):
    """An epoch of Imagenette JPEGs through both loaders with the paper's whole augmentation (crop, flip, colour
    jitter, lighting): every image gets one draw of (seed, epoch, index), the same crop box in both, and the
    pixels agree within what their decoders and resizers differ by (libjpeg-turbo and PIL's bilinear filter
    against DALI's): measured here (DALI's CPU decoder), mean |diff| 0.0007 a pixel over the epoch, 0.0018 for
    the worst image, in [0, 1] units; with another seed's draw for the torch loader, 0.25. With today's additions
    (TrivialAugment's operations through DALI's suite and the torch loader's, random erasing, bicubic or bilinear per
    image): the same draws, and pixels as close (measured: mean 0.0013, worst image 0.0052)."""
    needs("dali")
    from dist_bot.data import dali_loader, plan, torch_loader

    boxes = {"dali": {}, "torch": {}}

    def recording(name, real):
        def draw(seed, epoch, index, width, height, *rest):
            d = real(seed, epoch, index, width, height, *rest)
            boxes[name][(epoch, index)] = (width, height, d.box)
            return d

        return draw

    real = plan.draw
    monkeypatch.setattr(dali_loader, "draw", recording("dali", real))
    over = {"data.color_jitter": 0.4, "data.pca_lighting": 0.1, "data.dali_py_workers": 0, "data.workers": 0}
    over |= today
    got = {}
    for name in ("dali", "torch"):
        if name == "torch":  # DrawnCrop's draw (data.workers=0: in this process)
            monkeypatch.setattr(torch_loader, "draw", recording("torch", real))
        train, _ = loaders(name, imagenette_subset, **over)
        train.set_epoch(1)
        got[name] = [(x.float().clone(), y.clone()) for x, y in micro_batches(train)]
        train.close()
    # DALI reads ahead into the next epoch: compare this one's draws
    dali = {k: v for k, v in boxes["dali"].items() if k[0] == 1}
    assert len(dali) == train.num_samples  # every image drawn once
    assert dali == boxes["torch"]  # the same image size seen, the same crop box drawn
    std = torch.tensor(load_config(None, []).data.std).view(1, 3, 1, 1)
    per_image = []
    for (xd, yd), (xt, yt) in zip(got["dali"], got["torch"], strict=True):
        assert torch.equal(yd, yt)
        per_image += ((xd - xt).abs() * std).mean((1, 2, 3)).tolist()  # in [0, 1] pixel units
    mean, worst = sum(per_image) / len(per_image), max(per_image)
    print(f"dali vs torch, {len(per_image)} augmented images: mean |diff| {mean:.4f}, worst image {worst:.4f}")
    assert mean < 0.005 and worst < 0.02  # room for nvJPEG's decoding on a GPU


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_pack_gives_exactly_the_folders_batches_augmented_resumed_and_evaluated(
    loader, tiny_digits, tiny_digits_pack
):
    """Sample i of a pack is sample i of its folder, so every batch is the same: the plan, each image's augmentation
    (seeded by its index), a resume inside an epoch and validation."""
    needs(loader)
    got = []
    for data in (tiny_digits, tiny_digits_pack):
        over = {"data.color_jitter": 0.4, "data.pca_lighting": 0.1, "data.dali_py_workers": 0}
        train, val = loaders(loader, data, **over)
        train.set_epoch(1, 3)
        got.append((list(micro_batches(train)), list(val)))
    for folder, packed in zip(*got, strict=True):
        assert len(folder) == len(packed) > 1
        for (xf, yf), (xp, yp) in zip(folder, packed, strict=True):
            assert torch.equal(yf, yp) and torch.equal(xf, xp)


def test_grayscale_cmyk_and_png_decode_and_a_corrupt_file_is_named(tmp_path):
    needs("dali")
    from PIL import Image

    from dist_bot.errors import BadImageError

    for split in ("train", "val"):
        for c, (mode, ext) in enumerate([("L", "jpg"), ("CMYK", "jpg"), ("RGB", "png"), ("RGB", "jpg")]):
            d = tmp_path / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.new(mode, (40 + i, 30), color=(i * 40,) * len(mode)).save(d / f"{i}.{ext}")
    train, val = loaders("dali", tmp_path)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        got = sorted(y for _, labels in micro_batches(train) for y in labels.tolist())
        assert got == sorted([0, 1, 2, 3] * 4)
    assert sorted(y for _, labels in val for y in labels.tolist()) == sorted([0, 1, 2, 3] * 4)

    bad = tmp_path / "train" / "c3" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header parses, the data does not decode
    train, _ = loaders("dali", tmp_path)
    with pytest.raises(BadImageError, match=r"cannot read image .*c3/0\.jpg"):
        for _ in micro_batches(train):
            pass


def test_synthetic_loader_follows_the_interface():
    train, val = loaders("synthetic", "/nonexistent", **{"model.num_classes": 10})
    assert len(train) == 1024 // 8 and train.num_classes == 10
    x, y = next(micro_batches(train))
    assert x.shape == (8, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.max() < 10 and val.samples == 64


def test_loader_workers_and_their_forkserver_outlive_preemption_signals():
    """Slurm signals every process of a job; DataLoader helpers must leave the stopping to the trainer."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    import os
    import signal
    import time

    from dist_bot.data.torch_loader import worker_context
    from dist_bot.signals import PREEMPT_SIGNALS

    ctx = worker_context()
    worker = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    worker.start()
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    tracker = multiprocessing.resource_tracker._resource_tracker._pid
    try:
        for sig in PREEMPT_SIGNALS:
            for pid in (worker.pid, server, tracker):
                os.kill(pid, sig)
        time.sleep(0.5)
        assert worker.is_alive(), "a DataLoader worker died of a preemption signal"
        for pid in (server, tracker):
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the forkserver or resource tracker died of a signal"
        # and this process still receives them: the handler runs
        got = []
        old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert got == [signal.SIGUSR1]
    finally:
        worker.kill()
        worker.join()


@pytest.mark.parametrize("layout", ["folder", "pack"])
def test_one_dataloader_serves_consecutive_epochs_reading_ahead_across_their_end(layout, request, monkeypatch):
    """The torch loader keeps its DataLoader (and its workers) from one epoch to the next, so the next epoch's
    first batches are decoded while this one ends; a resume, an abandoned epoch or another order starts anew."""
    import itertools

    from dist_bot.data.torch_loader import TorchLoader

    tiny_digits = request.getfixturevalue("tiny_digits" if layout == "folder" else "tiny_digits_pack")
    built, real = [], TorchLoader._dataloader
    monkeypatch.setattr(TorchLoader, "_dataloader", lambda self, b: built.append(self.epoch) or real(self, b))
    train, _ = loaders("torch", tiny_digits)
    seen = {}
    for epoch, start, take in ((0, 0, None), (1, 0, None), (2, 0, 3), (3, 0, None), (3, 4, None)):
        train.set_epoch(epoch, start)
        planned = len(train.train_batches())
        got = [y.tolist() for _, y in itertools.islice(micro_batches(train), planned if take is None else take)]
        assert len(got) == (planned if take is None else take)
        seen[(epoch, start)] = got
    assert built == [0, 3, 3]  # epochs 0-2 from one DataLoader; after the abandoned epoch 2 and for the resume
    assert seen[(3, 4)] == seen[(3, 0)][4:]
    fresh, _ = loaders("torch", tiny_digits)  # the same batches as a loader that starts at each epoch
    fresh.set_epoch(1)
    assert [y.tolist() for _, y in micro_batches(fresh)] == seen[(1, 0)]
