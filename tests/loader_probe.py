"""Run under torchrun by tests/test_data_loaders.py: record which samples each rank's loaders deliver.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/loader_probe.py DATA LOADER BATCH OUT

Every class of DATA holds one image, so a label is a sample's identity. Writes OUT/rank<r>.json with, per
epoch, the labels of each training step (micro-batches concatenated), the validation labels, and the
labels delivered when epoch 1 is resumed at step 2.
"""

import json
import sys
from pathlib import Path

from dist_bot.config import load_config
from dist_bot.data import make_loaders
from dist_bot.distributed.env import init_distributed, shutdown


def steps_of(loader) -> list[list[int]]:
    it = iter(loader)
    out = []
    for step in loader.steps[loader.start_step :]:
        labels = []
        for _ in step.micro_batches:
            _, y = next(it)
            labels += y.tolist()
        out.append(labels)
    assert next(it, None) is None, "the loader delivered more batches than its plan"
    return out


def main(data: str, loader: str, batch: str, out: str) -> None:
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
    env = init_distributed("gloo")
    train, val = make_loaders(cfg, env)
    record = {"steps_per_epoch": len(train), "train": [], "val": []}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        record["train"].append(steps_of(train))
        record["val"].append([label for _, y in val for label in y.tolist()])
    train.set_epoch(1, start_step=2)
    record["resumed"] = steps_of(train)
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
