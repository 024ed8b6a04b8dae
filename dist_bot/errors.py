"""The errors a user can act on, in one place: each names the problem and its fix in its message.

The CLI prints a ``UserError`` as one line without a traceback (exit status 2); the launchers do the same. Every
such error in dist_bot derives from it; the kinds say where the problem lies.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a run that cannot go on: the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the schema; the message says which key and how to fix it."""


class DataError(UserError, ValueError):
    """The data folder is missing, empty, or laid out wrongly; the message names the path and the fix."""


class BadImageError(UserError, RuntimeError):
    """An image file that cannot be decoded (named in the message)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or is not dist_bot's."""


class CheckpointWriteError(UserError, RuntimeError):
    """Writing a checkpoint failed on some process; the previous checkpoint is kept."""


class RunError(UserError, RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class ExportError(UserError, ValueError):
    """An export that cannot be made as asked (format, model, file name); the message names what works."""


class LossScaleCollapse(UserError, RuntimeError):
    """fp16 loss scale stuck at its minimum: the run would only skip steps or train on garbage."""


class PeerFailed(UserError, RuntimeError):
    """Another process of the run failed: this one stops too (its error names that process and its error)."""
