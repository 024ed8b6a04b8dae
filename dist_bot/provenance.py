"""Which dist_bot made a run: its version and the git commit of its source, recorded in the run folder's
config.yaml (a comment header), in every checkpoint's meta.pt and in the W&B config.

    source_info()  # {"version": "0.1.0", "commit": "4aad279c...-dirty"}

The commit is the source tree's HEAD when dist_bot runs from a git checkout (with "-dirty" when tracked files
differ from it: `git describe --dirty`'s rule); else the commit pip recorded when it installed dist_bot from a
git URL (PEP 610's direct_url.json); else None (a wheel, a copy without .git such as the Docker image). Asking
git never fails a run or waits long: any error, a missing git, or GIT_TIMEOUT_S gives None.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

from dist_bot import __version__

GIT_TIMEOUT_S = 5.0  # each git call; a hung network file system must not hold up a run's start
_PACKAGE = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    """git's stdout in dist_bot's source folder, or None on any failure."""
    # GIT_DIR and friends would point git at another repository than the one holding this file
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    try:
        out = subprocess.run(
            ["git", "-C", str(_PACKAGE), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD of the checkout dist_bot runs from, plus "-dirty" when tracked files changed; None if not one."""
    # dist_bot installed into a virtual environment that lies inside some other repository is not a checkout
    # of dist_bot: its __init__.py must be tracked by the repository git finds
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if changes else "")


def installed_commit() -> str | None:
    """The commit pip recorded when it installed dist_bot from a git URL (PEP 610), else None."""
    try:
        text = metadata.distribution("dist-bot").read_text("direct_url.json")
        return json.loads(text)["vcs_info"]["commit_id"] if text else None
    except Exception:  # not installed, no such file, no vcs_info: nothing recorded
        return None


@functools.cache
def source_info() -> dict[str, str | None]:
    """{"version": dist_bot.__version__, "commit": the source's git commit or None}; asked once per process."""
    return {"version": __version__, "commit": git_commit() or installed_commit()}


def config_header() -> str:
    """The comment that opens a run's config.yaml: YAML readers skip it, so the file stays a valid recipe."""
    info = source_info()
    return f"# written by dist_bot {info['version']}, commit {info['commit'] or 'unknown (not a git checkout)'}\n"
