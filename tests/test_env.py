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
