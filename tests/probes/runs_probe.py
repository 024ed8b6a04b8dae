"""Under torchrun: `dist_bot.cli.main(ARGS)` once for each RUN, one after another in one process group's lifetime
of the job (what a sweep driven from Python does, and how the system tests put several cases in one launch when
the launch is most of their cost).

    torchrun --nproc_per_node=2 tests/probes/runs_probe.py RUN [RUN ...]

Each RUN is a JSON list of the command's arguments (["train", CONFIG, "key=value", ...]). Each run prints
`run I: status S in T s` (one write per process); a run that stops for a resume (status 75: run.stop_after_steps,
a preemption) lets the next one start, any other failure ends the probe with its status.
"""

import json
import sys
import time


def main_of_runs(runs: list[list[str]]) -> None:
    # imported here, not above: DALI's spawned workers import this module, and each would import torch with them
    from dist_bot.cli import main
    from dist_bot.train.loop import REQUEUE_EXIT_CODE

    for i, run in enumerate(runs):
        t = time.monotonic()
        status = main(run)
        sys.stdout.write(f"run {i}: status {status} in {time.monotonic() - t:.1f} s\n")  # one write: 2 processes
        sys.stdout.flush()
        if status not in (0, REQUEUE_EXIT_CODE):
            sys.exit(status)


if __name__ == "__main__":  # the loaders' spawned workers import this module: they must not run it
    main_of_runs([json.loads(arg) for arg in sys.argv[1:]])
