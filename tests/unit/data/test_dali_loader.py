"""The DALI training loader's feeder: each image's file read and augmentation draw run in DALI's Python workers,
off the training thread, and give exactly the batches the training thread would; one pipeline serves consecutive
epochs; the workers outlive preemption signals and die with their trainer."""

import builtins
import gc
import itertools
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from dist_bot.config import load_config
from dist_bot.data.dali_loader import PIPELINE_PREFETCH
from dist_bot.data.loader import micro_batches, train_augmentation
from dist_bot.data.plan import draw, lighting_rgb
from dist_bot.data.source import FileList, ImageList
from dist_bot.distributed.env import DistEnv

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")

IMAGES, BATCH = 100, 8  # tiny_digits' training split: 13 micro-batches, 12 of 8 and one of 4


def dali_train(data, **over):
    from dist_bot.data import make_loaders

    args = [
        f"data.path={data}",
        "data.loader=dali",
        "data.image_size=32",
        f"data.batch_size={BATCH}",
        "data.workers=1",
        "data.min_crop_area=0.35",
    ] + [f"{k}={v}" for k, v in over.items()]
    return make_loaders(load_config(None, args), DistEnv())[0]


def python_workers(parent: int | None = None) -> list[int]:
    """DALI's Python workers of a process: its spawned children (not the resource tracker or a forkserver)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat, cmdline = Path(f"/proc/{pid}/stat").read_text(), Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # ended meanwhile
        if int(stat.rpartition(")")[2].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(pid))
    return found


def running(pid: int) -> bool:
    """Alive: neither gone nor a zombie (an init that does not reap orphans leaves them so)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_the_training_thread_reads_no_image_file_when_python_workers_do(tiny_digits, monkeypatch):
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if str(file).endswith(".jpg"):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    for workers in (1, 0):
        opened.clear()
        train = dali_train(tiny_digits, **{"data.dali_py_workers": workers})
        assert sum(len(labels) for _, labels in micro_batches(train)) == IMAGES
        if workers:
            assert opened == []
        else:  # the epoch's files, and the next epoch's first micro-batches, read ahead in the pipeline's queue
            assert IMAGES <= len(opened) <= IMAGES + (PIPELINE_PREFETCH + 1) * BATCH


def test_python_workers_deliver_the_training_threads_batches_over_epochs_and_a_resume(tiny_digits):
    def batches(workers):
        gc.collect()  # the pipelines of earlier tests' loaders end with their workers
        others = set(python_workers())  # those that are still alive, ending: not this loader's
        train = dali_train(tiny_digits, **{"data.dali_py_workers": workers})
        out, pids = [], []
        for epoch, start in ((0, 0), (1, 0), (1, 2)):
            train.set_epoch(epoch, start)
            out.append([(x.clone(), y.clone()) for x, y in micro_batches(train)])
            pids.append(set(python_workers()) - others)
        return out, pids

    here, _ = batches(0)
    there, pids = batches(1)
    assert [len(e) for e in here] == [len(e) for e in there] == [13, 13, 11]
    for (xa, ya), (xb, yb) in zip(itertools.chain(*here), itertools.chain(*there), strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    for (xa, ya), (xb, yb) in zip(here[1][2:], here[2], strict=True):  # the resumed epoch is the epoch's rest
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert len(pids[0]) == 1 and pids[1] == pids[0], "the next epoch reuses the pipeline and its worker"
    assert len(pids[2]) == 1 and pids[2] != pids[0], "a resume inside an epoch builds a new pipeline"


def test_one_pipeline_serves_consecutive_epochs_and_any_other_order_builds_a_new_one(tiny_digits, monkeypatch):
    from dist_bot.data.dali_loader import DaliLoader

    built = []
    build = DaliLoader._build_feed
    monkeypatch.setattr(DaliLoader, "_build_feed", lambda self: built.append(self.epoch) or build(self))
    train = dali_train(tiny_digits, **{"data.dali_py_workers": 0})

    def run(epoch, start=0, take=None):
        train.set_epoch(epoch, start)
        planned = len(train.train_batches())
        # as the engine takes them: exactly the plan's micro-batches, never the iterator's end
        got = list(itertools.islice(micro_batches(train), planned if take is None else take))
        assert len(got) == (planned if take is None else take)

    for epoch in (0, 1, 2):
        run(epoch)
    assert built == [0]
    run(1)  # out of order
    assert built == [0, 1]
    run(2, take=3)  # follows epoch 1, but is abandoned
    assert built == [0, 1]
    run(3)
    assert built == [0, 1, 3]
    run(4, start=5)  # inside an epoch
    run(5)
    assert built == [0, 1, 3, 4]


def test_pca_lighting_shifts_each_image_by_the_draw_of_its_own_seed(tiny_digits):
    """Lighting adds (alpha * eigval) @ eigvec.T to [0, 1] pixels before normalisation: normalized, each channel
    moves by rgb / std, uniformly over the image; alpha ~ N(0, 1) x data.pca_lighting, drawn after the crop,
    flip and colour jitter from the image's (seed, epoch, index) generator."""
    common = {"data.dali_py_workers": 0, "data.color_jitter": 0}
    lit, dark = dali_train(tiny_digits, **common), dali_train(tiny_digits, **common, **{"data.pca_lighting": 0})
    shift = next(micro_batches(lit))[0] - next(micro_batches(dark))[0]
    per_channel = shift.mean((2, 3))
    assert (shift - per_channel[:, :, None, None]).abs().max() < 1e-4
    d = lit.cfg.data
    expected = []
    for index in lit.train_batches()[0]:
        with Image.open(lit.images.samples[index][0]) as im:
            width, height = im.size
        drawn = draw(lit.cfg.run.seed, 0, index, width, height, train_augmentation(d), d.image_size)
        alpha = np.array(drawn.alpha) * d.pca_lighting
        expected.append(lighting_rgb(alpha) / np.array(d.std))
    assert torch.allclose(per_channel, torch.tensor(np.array(expected), dtype=torch.float32), atol=1e-4)


def test_the_file_list_pickles_compactly(tmp_path):
    """DALI pickles the feeder to every worker: for ImageNet's 1.28 M files that must take megabytes, not a
    tuple of tuples (about 100 bytes a file, and seconds)."""
    root = Path("/data/imagenet/train")
    classes = tuple(f"n{c:08d}" for c in range(1000))
    samples = tuple((f"{root}/{c}/{c}_{i}.JPEG", label) for label, c in enumerate(classes) for i in range(100))
    files = FileList.of(ImageList(root, classes, samples))
    assert len(pickle.dumps(files)) < 50 * len(samples)
    for i in (0, 12_345, len(samples) - 1):
        assert files.path(i) == samples[i][0] and files.labels[i] == samples[i][1]


def test_workers_import_the_feeder_without_torch():
    """Every DALI worker imports the feeder's module: with torch and torchvision it would start in six seconds,
    not one."""
    code = "import sys, dist_bot.data.dali_loader; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)}
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


PROBE = """
import sys, time
from dist_bot.config import load_config
from dist_bot.data import make_loaders
from dist_bot.distributed.env import DistEnv

if __name__ == "__main__":  # DALI's workers are spawned: they import this module again
    args = [f"data.path={sys.argv[1]}", "data.loader=dali", "data.image_size=32", "data.batch_size=8"]
    train = make_loaders(load_config(None, [*args, "data.workers=1", "data.dali_py_workers=2"]), DistEnv())[0]
    next(iter(next(iter(train))))
    print("ready", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_python_workers_outlive_preemption_signals_and_die_with_their_trainer(tiny_digits, tmp_path):
    from dist_bot.signals import PREEMPT_SIGNALS

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tiny_digits)]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # also the killed trainer's resource tracker's, reporting what it cleaned up
        trainer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        assert trainer.stdout.readline().strip() == "ready", log.read_text()[-3000:]
        workers = python_workers(trainer.pid)
        assert len(workers) == 2
        for pid in workers:  # Slurm signals every process of the job; only the trainer may act on it
            for sig in PREEMPT_SIGNALS:
                os.kill(pid, sig)
        time.sleep(0.5)
        assert all(map(running, workers)), "a DALI worker died of a preemption signal"
    finally:
        trainer.send_signal(signal.SIGKILL)  # no clean-up in the trainer: the kernel must end the workers
        trainer.wait()
    deadline = time.time() + 10
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.1)
    lingering = list(filter(running, workers))
    for pid in lingering:  # not left behind by a failing test
        os.kill(pid, signal.SIGKILL)
    assert not lingering, "DALI workers outlived their trainer"
