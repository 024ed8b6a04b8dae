"""Training a run: ``Trainer(cfg, env).fit()``. loop.py is the loop (steps, epochs, evaluation), build.py what
it is built from, state.py the run's state and its checkpoints."""

from .loop import REQUEUE_EXIT_CODE, Preempted, Trainer, evaluate

__all__ = ["REQUEUE_EXIT_CODE", "Preempted", "Trainer", "evaluate"]
