"""Run under torchrun by tests/test_strategies.py: an fp16 overflow in ONE rank's backward.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/strategy_probe.py OUT key=value...

Writes OUT/rank<r>.json: whether each of two steps was taken, the loss scale after each, and whether the
weights changed.
"""

import json
import sys
from pathlib import Path

import torch

from dist_bot.config import load_config
from dist_bot.distributed import build_strategy
from dist_bot.distributed.env import init_distributed, shutdown
from dist_bot.models import build_model


def main(out: str, *overrides: str) -> None:
    cfg = load_config(None, [*overrides, "precision=fp16", "loss_scale.init_scale=1024", "model.channels_last=false"])
    strategy = cfg.strategy
    env = init_distributed("gloo")
    torch.manual_seed(0)
    model = build_model("resnet18d", num_classes=10, zero_init_last=False)
    s = build_strategy(strategy, model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), env, cfg)
    record = {"steps": [], "scales": [], "changed": []}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for poison in (True, False):
        before = s.eval_model().state_dict()["fc.weight"].clone()
        s.model.train()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(s.model(x), y)
        if poison and env.rank == 1:  # an overflow in one rank's backward only, as fp16 overflows happen
            loss = loss * float("inf")
        s.backward(loss)
        record["steps"].append(bool(s.step()))
        record["scales"].append(s.loss_scale)
        record["changed"].append(not torch.equal(before, s.eval_model().state_dict()["fc.weight"]))
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
