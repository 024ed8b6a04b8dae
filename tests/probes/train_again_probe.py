"""Under torchrun: `dist_bot.cli.main(["train", ...])` several times in one process group's lifetime of the job
(what a sweep driven from Python does); each run in a folder of its own, run.name=<name>-<i>.

    torchrun --nproc_per_node=2 tests/probes/train_again_probe.py RUNS NAME train CONFIG [key=value ...]
"""

import sys
import time

from dist_bot.cli import main

runs, name, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
for i in range(runs):
    t = time.monotonic()
    status = main([*args, f"run.name={name}-{i}"])
    sys.stdout.write(f"run {i}: status {status} in {time.monotonic() - t:.1f} s\n")  # one write: 2 processes
    sys.stdout.flush()
    if status != 0:
        sys.exit(status)
