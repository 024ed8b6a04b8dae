"""Rank and world size from torchrun, from srun, or a plain process."""

from dist_bot.distributed.env import first_slurm_host, read_launch_env


def test_torchrun_variables_win():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
    }  # torchrun inside a Slurm allocation
    got = read_launch_env(env)
    assert (got["source"], got["rank"], got["world_size"], got["local_rank"]) == ("torchrun", 3, 8, 1)
    assert (got["master_addr"], got["master_port"]) == ("n1", "1234")


def test_srun_one_task_per_process():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
    }
    got = read_launch_env(env)
    assert (got["source"], got["rank"], got["world_size"], got["local_rank"]) == ("slurm", 5, 8, 1)
    assert got["master_addr"] == "gpu07"
    assert got["master_port"] == str(20000 + 4242)


def test_single_process_and_single_task_jobs():
    assert read_launch_env({})["source"] == "single"
    one_task = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (one_task["source"], one_task["world_size"]) == ("single", 1)


def test_first_host_of_slurm_node_lists():
    assert first_slurm_host("node[3-5,9],gpu01") == "node3"
    assert first_slurm_host("gpu01,gpu02") == "gpu01"
    assert first_slurm_host("localhost") == "localhost"


def test_a_slurm_task_with_the_torch_variables_is_still_its_own_slurm_task():
    """submitit (and dist_bot's own export) set RANK/WORLD_SIZE from Slurm's: such a process is one Slurm task,
    whose CPUs are its own (cpus_per_process does not divide them); torchrun's processes under srun are not."""
    submitit = {"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "LOCAL_RANK": "1"}
    assert read_launch_env(submitit)["source"] == "slurm"
    under_torchrun = submitit | {"TORCHELASTIC_RUN_ID": "x"}
    assert read_launch_env(under_torchrun)["source"] == "torchrun"


def test_every_launcher_exports_the_torch_variables_a_plain_process_none():
    from dist_bot.distributed.env import export_launch_env

    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"}
    srun |= {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu07"}
    environ = dict(srun)
    export_launch_env(read_launch_env(environ), environ)
    exported = {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    assert exported == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("gpu07", "20007")
    again = read_launch_env(environ)  # read again (a second run in this process): the same process
    assert (again["source"], again["rank"], again["local_world_size"]) == ("slurm", 5, 4)
    plain: dict[str, str] = {}
    export_launch_env(read_launch_env(plain), plain)
    assert plain == {}


def test_more_processes_on_a_node_than_gpus_is_an_error_naming_both_numbers():
    import pytest

    from dist_bot.distributed.env import device_index
    from dist_bot.errors import UserError

    assert device_index(3, 8, 8, {}) == 3
    assert device_index(3, 4, 1, {"SLURM_GPUS_PER_TASK": "1"}) == 0  # srun bound one GPU to each task
    with pytest.raises(UserError, match=r"^5 processes on this node, but 4 GPU\(s\) visible") as e:
        device_index(4, 5, 4, {})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="2 processes on this node, but 1 GPU"):
        device_index(1, 2, 1, {})


def test_fp16_bn_statistics_are_averaged_in_fp32(monkeypatch):
    """32 ranks' running_var of 2,048 sum to 65,536, past fp16's largest value (65,504): averaged in fp32, the
    mean stays 2,048 (DeepSpeed's fp16 keeps BN buffers in fp16). The all-reduce is faked: a sum of 32 equals."""
    import torch
    import torch.distributed as dist

    from dist_bot.distributed.env import DistEnv, average_buffers

    sums = []
    monkeypatch.setattr(dist, "all_reduce", lambda t: sums.append(t.dtype) or t.mul_(32))
    bn = torch.nn.BatchNorm2d(4).half()
    bn.running_var.fill_(2048.0)
    bn.running_mean.fill_(-3.0)
    average_buffers(bn, DistEnv(rank=0, world_size=32))
    assert bn.running_var.dtype == torch.float16 and torch.equal(bn.running_var, torch.full((4,), 2048.0).half())
    assert torch.equal(bn.running_mean, torch.full((4,), -3.0).half())
    assert sums == [torch.float32, torch.float32]  # the floating buffers, summed in fp32 (num_batches_tracked: no)
