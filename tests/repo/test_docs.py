"""The documentation: README.md stays short and links every docs page, relative links point to files (and headings)
that exist, and docs/configuration.md is what scripts/config_doc.py generates from dist_bot/config.py."""

import importlib.util
import re
from pathlib import Path

import pytest

from dist_bot.config import all_keys

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if not p.name.endswith(".head.md"))  # *.head.md: parts of a page
MAX_README_LINES = 200
REGENERATE = "run: .venv/bin/python scripts/config_doc.py --write"


def config_doc():
    spec = importlib.util.spec_from_file_location("config_doc", REPO / "scripts" / "config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    assert PAGES, "no docs pages"
    for page in PAGES:
        assert f"](docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def without_code(text: str) -> str:
    """The text outside fenced blocks and inline code, where a link is a link."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_that_exist(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(REPO)} links {target}: {path} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.relative_to(REPO)} links {target}: no heading #{anchor}"


def test_configuration_page_is_generated():
    page = DOCS / "configuration.md"
    assert page.is_file(), REGENERATE
    assert page.read_text() == config_doc().generate(), f"docs/configuration.md is out of date; {REGENERATE}"


def test_configuration_page_has_every_field():
    text = (DOCS / "configuration.md").read_text()
    missing = [key for key in all_keys() if f"| `{key}` |" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}; {REGENERATE}"


def test_configuration_page_keeps_the_hand_written_part():
    head = (DOCS / "configuration.head.md").read_text()
    assert (DOCS / "configuration.md").read_text().startswith(head.rstrip("\n") + "\n"), REGENERATE
