"""TEST HELPER (on PYTHONPATH of a job's tasks): rank 0's end-of-run work (Tracker.log_model: the final export
and W&B upload) takes DIST_BOT_SLOW_END_S seconds, as a large upload would; patched in when dist_bot.tracking is
first imported, so that no other process of the job imports anything more."""

import importlib.abc
import importlib.machinery
import os
import sys
import time


class SlowEnd(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "dist_bot.tracking":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            log_model = module.Tracker.log_model

            def slow_log_model(tracker, *args):
                if tracker.enabled:  # the main process's
                    time.sleep(float(os.environ["DIST_BOT_SLOW_END_S"]))
                return log_model(tracker, *args)

            module.Tracker.log_model = slow_log_model

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("DIST_BOT_SLOW_END_S"):
    sys.meta_path.insert(0, SlowEnd())
