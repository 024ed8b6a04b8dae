"""Run under torchrun by tests/unit/data/test_loaders.py: record which samples each rank's loaders deliver.

    torchrun --standalone --nproc_per_node=2 tests/probes/loader_probe.py DATA[,DATA...] LOADER BATCH OUT

Every class of DATA holds one image, so a label is a sample's identity. Writes OUT/<i>/rank<r>.json for the
i-th DATA (a folder or a pack; one launch serves several, since starting the processes is most of the cost)
with, per epoch, the labels of each training step (micro-batches concatenated), the validation labels, and
the labels delivered when epoch 1 is resumed at step 2.
"""

import json
import sys
from pathlib import Path

# dist_bot (and torch) are imported in the functions: DALI's spawned workers import this module, and would import
# them too


def steps_of(loader) -> list[list[int]]:
    out = [[y for micro in step for y in micro.labels.tolist()] for step in loader]
    assert len(out) == len(loader) - loader.start_step, "the loader served other steps than its plan's"
    return out


def record(data: str, loader: str, batch: str, env) -> dict:
    from dist_bot.config import load_config
    from dist_bot.data import make_loaders

    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"data.loader={loader}",
            f"data.batch_size={batch}",
            "data.image_size=32",
            "data.workers=1",
            "model.channels_last=true",
        ],
    )
    train, val = make_loaders(cfg, env)
    out = {"steps_per_epoch": len(train), "train": [], "val": []}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        out["train"].append(steps_of(train))
        out["val"].append([label for _, y in val for label in y.tolist()])
    train.set_epoch(1, start_step=2)
    out["resumed"] = steps_of(train)
    return out


def main(datas: str, loader: str, batch: str, out: str) -> None:
    from dist_bot.distributed.env import init_distributed, shutdown

    env = init_distributed("gloo")
    for i, data in enumerate(datas.split(",")):
        Path(out, str(i)).mkdir(parents=True, exist_ok=True)
        Path(out, str(i), f"rank{env.rank}.json").write_text(json.dumps(record(data, loader, batch, env)))
    shutdown(finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
