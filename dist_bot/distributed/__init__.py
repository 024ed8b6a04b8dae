"""How the model is distributed, behind one small interface the engine calls (strategy.py's Strategy)."""

from __future__ import annotations

from .env import DistEnv, init_distributed, shutdown
from .strategy import Strategy, build_strategy

__all__ = ["DistEnv", "Strategy", "build_strategy", "init_distributed", "shutdown"]
