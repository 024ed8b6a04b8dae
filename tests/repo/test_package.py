"""The installable package: the wheel built from this tree holds dist_bot, the launchers and the recipes, and
declares compatible version ranges, so that `pip install dist-bot` keeps an environment's own build of torch."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dist_bot

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "dist_bot", "launch", "configs"]  # what the Dockerfile copies, too


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the packaged sources (the build writes build/ and *.egg-info beside them)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), "."]
    done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


def metadata(wheel: Path) -> tuple[dict[str, list[str]], str]:
    with zipfile.ZipFile(wheel) as z:
        text = z.read(f"dist_bot-{dist_bot.__version__}.dist-info/METADATA").decode()
        entry_points = z.read(f"dist_bot-{dist_bot.__version__}.dist-info/entry_points.txt").decode()
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the headers; the README follows as the body
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    return fields, entry_points


def test_wheel_metadata_names_version_ranges_and_the_command(wheel):
    fields, entry_points = metadata(wheel)
    assert fields["Name"] == ["dist-bot"] and fields["Version"] == [dist_bot.__version__]
    requires = fields["Requires-Dist"]
    core = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower(): r for r in requires if "extra ==" not in r}
    assert {"torch", "torchvision", "pyyaml", "numpy", "pillow"} <= set(core)
    # ranges, never exact pins: an exact torch would replace the CUDA build of an NGC container or a cluster
    pinned = [r for r in requires if "==" in r.split(";")[0] or "===" in r]
    assert not pinned, f"exact pins in Requires-Dist (they belong in requirements.lock): {pinned}"
    assert re.fullmatch(r"torch>=2\.\d+", core["torch"]) and re.fullmatch(r"torchvision>=0\.\d+", core["torchvision"])
    extras = set(fields["Provides-Extra"])
    assert {"dali", "deepspeed", "wandb", "slurm", "demo", "report", "imagenet", "all", "dev"} <= extras
    assert any(r.startswith("timm") and 'extra == "dev"' in r for r in requires)  # the test-only reference
    assert re.search(r"^\[console_scripts\]\s*\ndist-bot = dist_bot\.cli:main$", entry_points, re.M)


def test_wheel_holds_every_module_and_recipe_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    modules = {p.relative_to(REPO).as_posix() for d in ("dist_bot", "launch") for p in (REPO / d).rglob("*.py")}
    recipes = {"dist_bot/configs/" + p.relative_to(REPO / "configs").as_posix() for p in REPO.glob("configs/**/*.yaml")}
    assert len(modules) > 30 and len(recipes) > 10
    assert modules - names == set(), "modules missing from the wheel: add their package to pyproject.toml"
    assert recipes - names == set(), "recipes missing from the wheel: add their folder to pyproject.toml"
    dist_info = f"dist_bot-{dist_bot.__version__}.dist-info/"
    stray = sorted(n for n in names - modules - recipes if not n.startswith(dist_info))
    assert not stray, f"the wheel holds files that are not dist_bot's modules or recipes: {stray}"  # tests, runs, data


def test_recipes_in_the_wheel_load_by_name(wheel, tmp_path):
    """Unpacked wheel, no source tree: `dist-bot config NAME` finds the bundled recipe and its base chain."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = (
        "import dist_bot.config as c, sys; "
        "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
        "print(c.load_config('resnet50d_bs1024').data.global_batch_size, "
        "c.load_config('configs/paper_ladder/6_distill_mixup.yaml').loss.mixup_alpha)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "site")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    from dist_bot.config import load_config

    expected = load_config(REPO / "configs/resnet50d_bs1024.yaml").data.global_batch_size
    mixup = load_config(REPO / "configs/paper_ladder/6_distill_mixup.yaml").loss.mixup_alpha
    assert done.stdout.split() == [str(expected), str(mixup)]
