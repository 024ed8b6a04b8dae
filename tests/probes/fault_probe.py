"""`dist-bot train` with one fault injected, for tests/system/test_faults.py (run under torchrun or alone).

    python tests/probes/fault_probe.py FAULT train CONFIG key=value...

FAULT is one of
    none                    no fault
    enospc:STEP:RANK        saving the checkpoint of global step STEP, RANK's disk is full (DDP: torch.save of
                            model.pt on rank 0; FSDP: torch.distributed.checkpoint's shard writer)
    unreadable:STEP:RANK    on RANK only, every file of checkpoint STEP cannot be read (a stale listing, a
                            transient read error on one node)
    startup-signal:SIG      the process receives SIG while its loaders are being built
    dump:PATH               after resuming, write the full model state, then train on: PATH gets the weights as
                            this world size holds them, to compare with what was saved (one launch both checks the
                            resumed state and continues the run)

Everything else is the real command: `dist_bot.cli.main`.
"""

import errno
import os
import signal
import sys
from pathlib import Path

# torch is imported where a fault needs it: DALI's spawned workers import this module, and would import it too


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def full_disk(step: int, on_rank: int) -> None:
    if rank() != on_rank:
        return
    import torch
    import torch.distributed.checkpoint as dcp

    def saving_step(path) -> bool:
        return f"tmp_step_{step:09d}" in str(path)

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        name = getattr(f, "name", f)
        if saving_step(name):
            if hasattr(f, "write"):
                f.write(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    real_write = dcp.FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if saving_step(self.path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, plan, planner)

    dcp.FileSystemWriter.write_data = write_data


def unreadable(step: int, on_rank: int) -> None:
    if rank() != on_rank:
        return
    from dist_bot import checkpoint
    from dist_bot.errors import CheckpointError

    real_verify = checkpoint.verify_file

    def verify(path):
        if f"step_{step:09d}" in str(path):
            raise CheckpointError(f"checkpoint file {path} is unreadable (OSError: Input/output error)")
        return real_verify(path)

    checkpoint.verify_file = verify


def startup_signal(name: str) -> None:
    from dist_bot import data

    real = data.make_loaders

    def make_loaders(cfg, env):
        os.kill(os.getpid(), getattr(signal, name))  # as Slurm would, in the middle of start-up
        return real(cfg, env)

    import dist_bot.train.loop

    dist_bot.train.loop.make_loaders = make_loaders


def dump(path: str) -> None:
    import torch

    from dist_bot.train import Trainer

    real_init = Trainer.__init__

    def init(self, cfg, env):
        real_init(self, cfg, env)
        weights = self.strategy.eval_model(sync_buffers=False).state_dict()
        if env.is_main:
            torch.save({k: v.detach().cpu() for k, v in weights.items()}, path)
        # no side effect on training: DDP's and ZeRO's module is only read, FSDP2 fills a separate plain copy

    Trainer.__init__ = init


def main(fault: str, *argv: str) -> int:
    kind, _, arg = fault.partition(":")
    if kind == "enospc":
        full_disk(*map(int, arg.split(":")))
    elif kind == "unreadable":
        unreadable(*map(int, arg.split(":")))
    elif kind == "startup-signal":
        startup_signal(arg)
    elif kind == "dump":
        dump(arg)
    elif kind != "none":
        raise SystemExit(f"unknown fault {fault!r}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dist_bot.cli import main as cli

    return cli(list(argv))


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
