"""How many CPUs a process may use for data loading, and the worker counts that follow by default."""

import os

import pytest

from dist_bot.config import load_config
from dist_bot.data.loader import cpus_per_process, dali_py_workers, dataloader_workers, decode_workers
from dist_bot.distributed.env import DistEnv


@pytest.fixture
def cpus(monkeypatch):
    """Set this process's CPU affinity to N CPUs (and no Slurm CPU count from the environment)."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)

    def set_cpus(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))

    return set_cpus


def test_torchrun_processes_share_their_nodes_cpus(cpus):
    cpus(16)
    env = DistEnv(source="torchrun", local_world_size=4)
    assert cpus_per_process(env, {}) == 4
    # torchrun inside one Slurm task: the task's CPUs, still shared by the processes torchrun started
    assert cpus_per_process(env, {"SLURM_CPUS_PER_TASK": "8"}) == 2


def test_srun_tasks_own_their_cpus_when_slurm_gives_each_some(cpus):
    cpus(16)
    env = DistEnv(source="slurm", local_world_size=4)
    assert cpus_per_process(env, {"SLURM_CPUS_PER_TASK": "6"}) == 6  # --cpus-per-task: this task's own
    assert cpus_per_process(env, {}) == 4  # without it every task sees the node's CPUs: share them


def test_a_single_process_has_its_affinity(cpus):
    cpus(3)
    assert cpus_per_process(DistEnv(), {}) == 3


@pytest.mark.parametrize(
    ("n", "dali_threads", "dataloader", "python"),
    [(1, 1, 1, 1), (2, 2, 1, 1), (8, 8, 7, 2), (16, 16, 15, 4), (96, 96, 95, 8)],
)
def test_worker_counts_follow_the_cpus_by_default(cpus, n, dali_threads, dataloader, python):
    """DALI's threads take the CPUs, the DataLoader leaves one to the training thread, DALI's Python workers
    (file reads, crop draws) a quarter of them, 1 to 8."""
    cpus(n)
    cfg, env = load_config(None, []), DistEnv()
    assert cfg.data.workers is None and cfg.data.dali_py_workers is None
    assert decode_workers(cfg, env) == dali_threads
    assert dataloader_workers(cfg, env) == dataloader
    assert dali_py_workers(cfg, env) == python


def test_worker_counts_that_are_set_are_kept(cpus):
    cpus(16)
    cfg, env = load_config(None, ["data.workers=3", "data.dali_py_workers=0"]), DistEnv()
    assert decode_workers(cfg, env) == dataloader_workers(cfg, env) == 3
    assert dali_py_workers(cfg, env) == 0  # the feeder runs in the training thread


def test_the_loaders_use_them(cpus, tiny_digits):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    from dist_bot.data import make_loaders

    cpus(8)
    args = [f"data.path={tiny_digits}", "data.batch_size=8"]
    dali, _ = make_loaders(load_config(None, [*args, "data.loader=dali"]), DistEnv())
    torch_train, _ = make_loaders(load_config(None, [*args, "data.loader=torch"]), DistEnv())
    assert (dali.workers, dali.py_workers, torch_train.workers) == (8, 2, 7)
