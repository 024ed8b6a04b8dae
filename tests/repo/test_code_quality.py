"""Lint, formatting and the house layering rule: dist_bot's imports only point down."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "dist_bot"

# Lowest first. A module may import from its own layer or any layer below it, never above.
LAYERS: list[set[str]] = [
    {"errors", "config", "signals", "provenance"},
    {"models", "data", "recipe", "datasets", "checkpoint"},  # checkpoint: file format and atomic writes
    {"distributed"},
    {"tracking", "profiling", "train"},
    {"bench", "report", "export", "predict", "doctor"},  # commands' own modules
    {"cli", "__main__"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"dist_bot.{module} has no layer: add it to LAYERS in {Path(__file__).name}")


def dist_bot_imports(path: Path) -> set[str]:
    """The dist_bot submodules a file imports (absolute or relative)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package_parts = rel.parts[:-1]  # models/profile.py and models/__init__.py both live in "models"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - (node.level - 1)])
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target} if target else {a.name for a in node.names}
            elif node.module and node.module.startswith("dist_bot."):
                found.add(node.module.removeprefix("dist_bot."))
            elif node.module == "dist_bot":
                found |= {a.name for a in node.names if a.name != "__version__"}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("dist_bot.") for a in node.names if a.name.startswith("dist_bot.")}
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    rel = path.relative_to(PACKAGE).with_suffix("")
    if rel.parts == ("__init__",):
        return  # the package root holds only the version
    me = layer_of(".".join(rel.parts))
    upward = [m for m in dist_bot_imports(path) if layer_of(m) > me]
    assert not upward, f"{rel} (layer {me}) imports from a higher layer: {upward}"


def test_ruff_check():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, "run `ruff format .`:\n" + out.stdout + out.stderr


def test_shell_scripts_parse_and_sbatch_directives_come_before_any_command():
    scripts = sorted([*(REPO / "slurm").rglob("*.sh"), *(REPO / "scripts").glob("*.sh"), REPO / ".ci" / "run"])
    for script in scripts:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"
    for script in (REPO / "slurm").glob("*.sh"):
        lines = script.read_text().splitlines()
        first_command = next(i for i, x in enumerate(lines) if x.strip() and not x.startswith("#"))
        late = [x for x in lines[first_command:] if x.startswith("#SBATCH")]
        assert not late, f"{script.name}: sbatch ignores #SBATCH lines after the first command: {late}"
        assert any(x.startswith("#SBATCH --requeue") for x in lines), f"{script.name} must be requeueable"


def test_dockerfile_copies_the_packages_configs_scripts_and_lock():
    text = (REPO / "Dockerfile").read_text()
    copied = " ".join(x for x in text.splitlines() if x.startswith("COPY"))
    for path in ("pyproject.toml", "requirements.lock", "dist_bot", "launch", "configs", "slurm"):
        assert f" {path}" in copied, f"Dockerfile does not COPY {path}"


# DALI's Python workers are spawned, and a spawned process first imports the program that started it (as
# __mp_main__): a program that imports torch at its top makes each worker import it too (~1 s on 2 cores; a
# DALI-fed run in a test probe cost 4.4 s instead of 2.1).
LAUNCHED = [("module", "dist_bot")] + [
    ("path", f"tests/probes/{name}") for name in ("fault_probe.py", "loader_probe.py", "runs_probe.py", "sync_probe.py")
]


@pytest.mark.parametrize(("kind", "program"), LAUNCHED)
def test_programs_that_start_loaders_import_no_torch_in_the_loaders_workers(kind, program):
    run = f"runpy.run_{kind}({program!r}, run_name='__mp_main__')"
    code = f"import runpy, sys; {run}; print(sorted(m for m in ('torch', 'nvidia.dali') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.split("\n")[-2] == "[]", res.stdout + res.stderr[-2000:]
