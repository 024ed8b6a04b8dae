"""Run under torchrun by tests/unit/train/test_sync_free.py: count what a training step waits for.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/probes/sync_probe.py OUT key=value...

Trains with dist_bot's Trainer (the overrides choose the recipe) while every way Python code can wait for the
device is patched to record where it was called from: reading a tensor (``item``, ``tolist``, ``bool``,
``float``, ``int``, ``__index__``, ``numpy``), GradScaler's ``get_scale``, ``torch.cuda.synchronize``, and
every torch.distributed collective (DDP's own gradient all-reduce runs in C++ and is not seen: it is the one
collective a step must make). Writes OUT/rank<r>.json: the steps trained, the sync points seen inside steps
(must be none) and the number seen inside log steps (where the engine reads the device on purpose).
"""

import contextlib
import json
import sys
import traceback
from pathlib import Path

# torch and dist_bot are imported in the functions: DALI's spawned workers import this module, and would import
# them too

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
)


class Recorder:
    def __init__(self, setter=setattr):
        self.setter = setter  # a test passes monkeypatch.setattr, so that everything is undone after it
        self.where = None  # "step" or "log" while the Trainer is inside one
        self.in_step: list[str] = []
        self.in_log = 0

    def hit(self, what: str) -> None:
        if self.where == "step":
            caller = "".join(traceback.format_stack(limit=6)[:-2])
            self.in_step.append(f"{what}\n{caller}")
        elif self.where == "log":
            self.in_log += 1

    def wrap(self, owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def patched(*args, **kwargs):
            self.hit(label)
            return real(*args, **kwargs)

        self.setter(owner, name, patched)

    def around(self, owner, name: str, where: str) -> None:
        real = getattr(owner, name)

        def patched(*args, **kwargs):
            outer, self.where = self.where, where
            try:
                return real(*args, **kwargs)
            finally:
                self.where = outer

        self.setter(owner, name, patched)


def install(rec: Recorder) -> None:
    import torch
    import torch.distributed as dist

    from dist_bot.train import Trainer

    for name in READS:
        rec.wrap(torch.Tensor, name, f"Tensor.{name}")
    rec.wrap(torch.amp.GradScaler, "get_scale", "GradScaler.get_scale")
    rec.wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
    for name in COLLECTIVES:
        rec.wrap(dist, name, f"torch.distributed.{name}")
    rec.around(Trainer, "train_step", "step")
    rec.around(Trainer, "log_train", "log")


def main(out: str, *overrides: str) -> None:
    from dist_bot.config import load_config
    from dist_bot.distributed.env import init_distributed, shutdown
    from dist_bot.train import Preempted, Trainer

    cfg = load_config("configs/demo.yaml", list(overrides))
    env = init_distributed("gloo")
    trainer = Trainer(cfg, env)
    rec = Recorder()
    install(rec)
    steps = 0
    real_step = Trainer.train_step

    def counted(self, step):
        nonlocal steps
        steps += 1
        return real_step(self, step)

    Trainer.train_step = counted
    with contextlib.suppress(Preempted):  # run.stop_after_steps
        trainer.fit()
    result = {"steps": steps, "in_step": rec.in_step, "in_log": rec.in_log}
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(result))
    shutdown(finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
