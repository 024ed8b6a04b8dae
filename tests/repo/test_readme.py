"""Every command in the ```bash blocks of README.md and of the docs/*.md pages that runs dist_bot is one it accepts:
the CLI (or launch.submit's) parser takes it, the recipe it names exists and loads with its overrides, and the
scripts it names exist. Commands no test can check (docker, enroot, apptainer, pip, ...) are listed in
docs/development.md, "Commands run by hand", with the date they were last run by hand.

Checked statically: nothing trains here (the demo, the tests and the GPU check run in their own tests and in CI).
A command with a placeholder runs with the value of PLACEHOLDERS; add one there when a page gains a new one.
"""

import re
import shlex
from pathlib import Path

import pytest

from dist_bot.cli import build_parser
from dist_bot.config import load_config
from launch import submit

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
# The pages whose commands are checked: README.md and every docs page (docs/*.head.md are parts of a generated
# page, docs/configuration.md, and checked there).
PAGES = [README, *sorted(p for p in DOCS.glob("*.md") if not p.name.endswith(".head.md"))]
BY_HAND = DOCS / "development.md"
BY_HAND_HEADING = "## Commands run by hand"

# README placeholder -> what the check uses in its place ("" drops it). Longest first when one contains another.
PLACEHOLDERS = {
    "[key=value ...]": "",
    "CONFIG": "configs/demo.yaml",
    "runs/NAME/checkpoints/step_000012345.pt": "runs/demo/checkpoints/step_000012345",
    "runs/NAME": "runs/demo",
    "[OUT]": "",
    "$PWD": str(REPO),
}


def page_commands(page: Path) -> list[str]:
    """The command lines of a page's ```bash blocks (also those indented in a list item): continuation lines
    joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", page.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def readme_commands() -> list[tuple[str, str]]:
    """(page, command) of every checked page, README.md first."""
    return [(str(page.relative_to(REPO)), c) for page in PAGES for c in page_commands(page)]


def substitute(command: str) -> list[str]:
    for placeholder, value in sorted(PLACEHOLDERS.items(), key=lambda kv: -len(kv[0])):
        command = command.replace(placeholder, value)
    command = re.sub(r"\[(--[^\]]+)\]", r"\1", command)  # optional flags ([--ema], [--topk 5]): checked as given
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # DATA=/datasets/imagenet sbatch ...
        words.pop(0)
    return words


def dist_bot_args(words: list[str]) -> list[str] | None:
    """The arguments of `dist-bot` in `dist-bot ...`, `srun ... dist-bot ...`, `[python|torchrun ...] -m dist_bot`."""
    for i, word in enumerate(words):
        if word == "dist-bot" or (word == "dist_bot" and words[i - 1] == "-m"):
            return words[i + 1 :]
    return None


def parse(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit:  # argparse's way to refuse a command (its message is in the captured stderr)
        pytest.fail(f"{parser.prog} does not accept: {shlex.join(argv)}")


def check_dist_bot(argv: list[str]) -> None:
    args = parse(build_parser(), argv)
    config, overrides = getattr(args, "config", None), list(getattr(args, "overrides", []))
    if config is not None and "=" in config:  # `dist-bot bench train key=value ...`: the defaults
        config, overrides = None, [config, *overrides]
    if args.command == "eval":
        overrides = [o for o in overrides if not o.startswith("checkpoint=")]
    if config is not None or overrides:
        load_config(config, overrides)


def check_submit(argv: list[str], capsys) -> None:
    parse(submit.build_parser(), argv)
    assert submit.main([*argv, "--dry-run"]) == 0, capsys.readouterr().err  # parses, plans and loads each run
    capsys.readouterr()


def check_sbatch(words: list[str]) -> None:
    """`sbatch [flags] slurm/X.sh [overrides]`: the script exists and its recipe loads with the overrides."""
    i = next(i for i, w in enumerate(words) if w.endswith(".sh"))
    assert all(w.startswith("--") for w in words[1:i]), f"sbatch flags before the script: {words[1:i]}"
    script = REPO / words[i]
    assert script.is_file(), f"{words[i]} does not exist"
    recipe = re.search(r'"\$\{CONFIG:-([^}]+)\}"', script.read_text())
    assert recipe, f'{words[i]} names no recipe ("${{CONFIG:-configs/...}}")'
    load_config(REPO / recipe.group(1), [*words[i + 1 :], "data.path=/datasets/imagenet"])


COMMANDS = readme_commands()


def kind(command: str) -> str | None:
    words = substitute(command)
    if not words:
        return None
    if dist_bot_args(words) is not None:
        return "dist-bot"
    if words[:3] == ["python", "-m", "launch.submit"]:
        return "submit"
    if words[0] == "sbatch":
        return "sbatch"
    if words[0] == "bash":
        return "script"
    return None  # docker, enroot, apptainer, pip, tensorboard: listed in docs/development.md, run by hand


def test_readme_has_the_commands_this_checks():
    kinds = [kind(c) for _, c in COMMANDS]
    assert kinds.count("dist-bot") >= 20 and kinds.count("submit") >= 3 and kinds.count("sbatch") >= 5, kinds
    assert [c for page, c in COMMANDS if page == "README.md"][:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    pages = {page for page, c in COMMANDS if kind(c)}
    for page in ("docs/training.md", "docs/cluster.md", "docs/data.md", "docs/results.md", "docs/configuration.md"):
        assert page in pages, f"{page} has no checked command: did its ```bash blocks move?"


def by_hand_section() -> str:
    text = BY_HAND.read_text()
    assert BY_HAND_HEADING in text, f"{BY_HAND.relative_to(REPO)} has no section {BY_HAND_HEADING!r}"
    return text.split(BY_HAND_HEADING, 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize(
    "page,command", [pc for pc in COMMANDS if not kind(pc[1])], ids=lambda x: x.split("#")[0].strip()[:70]
)
def test_unchecked_command_is_listed_as_run_by_hand(page, command):
    """A command no test parses is listed, with the date it was last run (or read) by hand."""
    command = " ".join(re.split(r"\s+#\s", command)[0].split())  # without its comment; spaced as the list items
    items = [" ".join(item.split()) for item in by_hand_section().split("\n- ")[1:]]  # one list item each
    listed = [item for item in items if f"`{command}`" in item]
    assert listed, f"{page}: `{command}` is neither checked here nor listed in {BY_HAND.name}, {BY_HAND_HEADING!r}"
    assert re.search(r"\d{4}-\d{2}-\d{2}", listed[0]), f"no date beside `{command}` in {BY_HAND.name}"


@pytest.mark.parametrize(
    "page,command", [pc for pc in COMMANDS if kind(pc[1])], ids=lambda x: x.split("#")[0].strip()[:70]
)
def test_readme_command_is_accepted(page, command, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the pages' commands run from the repository root
    words = substitute(command)
    what = kind(command)
    if what == "dist-bot":
        check_dist_bot(dist_bot_args(words))
    elif what == "submit":
        check_submit(words[3:], capsys)
    elif what == "sbatch":
        check_sbatch(words)
    else:
        assert (REPO / words[1]).is_file(), f"{words[1]} does not exist"
