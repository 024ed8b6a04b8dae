"""Which dist_bot made a run: the git commit of a checkout (dirty or not), nothing for a copy without git, the
commit pip recorded for an install from git, and never a failure or a long wait when git misbehaves."""

import json
import subprocess
import time
from types import SimpleNamespace

import pytest

from dist_bot import provenance


def git(repo, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git repository holding a package folder (pkg/__init__.py, committed) that provenance takes for its own."""
    pkg = tmp_path / "repo" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    git(pkg.parent, "init", "-q")
    git(pkg.parent, "add", ".")
    git(pkg.parent, "commit", "-q", "-m", "first")
    monkeypatch.setattr(provenance, "_PACKAGE", pkg)
    return pkg


def test_commit_of_a_clean_then_dirty_checkout(checkout):
    head = git(checkout, "rev-parse", "HEAD")
    assert provenance.git_commit() == head
    (checkout / "notes.txt").write_text("untracked files do not count")  # as `git describe --dirty`
    assert provenance.git_commit() == head
    (checkout / "__init__.py").write_text("__version__ = '1'\n")
    assert provenance.git_commit() == head + "-dirty"


def test_a_package_untracked_inside_another_repository_has_no_commit(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")  # e.g. a virtual environment inside some project's repository
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "project")
    pkg = tmp_path / "venv" / "site-packages" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(provenance, "_PACKAGE", pkg)
    assert provenance.git_commit() is None


def test_no_git_or_a_hanging_git_gives_none_quickly(checkout, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git at all
    assert provenance.git_commit() is None
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\nexec sleep 30\n")  # a git stuck on a dead network file system
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    monkeypatch.setattr(provenance, "GIT_TIMEOUT_S", 0.5)
    t0 = time.perf_counter()
    assert provenance.git_commit() is None
    assert time.perf_counter() - t0 < 5


def test_an_install_from_a_git_url_reports_pips_recorded_commit(monkeypatch):
    direct_url = {"url": "https://github.com/x/dist_bot", "vcs_info": {"vcs": "git", "commit_id": "ab" * 20}}
    dist = SimpleNamespace(read_text=lambda name: json.dumps(direct_url) if name == "direct_url.json" else None)
    monkeypatch.setattr(provenance.metadata, "distribution", lambda name: dist)
    assert provenance.installed_commit() == "ab" * 20
    editable = {"url": "file:///src/dist_bot", "dir_info": {"editable": True}}
    dist.read_text = lambda name: json.dumps(editable)
    assert provenance.installed_commit() is None
