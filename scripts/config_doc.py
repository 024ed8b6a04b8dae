"""Print docs/configuration.md, or write it with --write: docs/configuration.head.md (the hand-written part,
copied byte for byte) followed by one table per config section, read off dist_bot.config's dataclasses.

Each row is a dotted key, its type, its default, its range (``param(range=...)``), whether it may change when a run
resumes (``param(resumable=True)``) and its meaning (the comment beside the field, ``config.field_docs()``).
tests/repo/test_docs.py fails when the page differs from what this prints: after changing dist_bot/config.py, run
`.venv/bin/python scripts/config_doc.py --write`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's dist_bot, also without an installed one

from dist_bot import config  # noqa: E402

HEAD = REPO / "docs" / "configuration.head.md"
PAGE = REPO / "docs" / "configuration.md"
GENERATED_NOTE = (
    "<!-- Everything below is generated from dist_bot/config.py by scripts/config_doc.py: edit those, then run\n"
    "     .venv/bin/python scripts/config_doc.py --write -->\n"
)


def type_name(t: Any) -> str:
    """An annotation as it reads in config.py: ``int | None``, ``'fp32' | 'fp16' | 'bf16'``, ``tuple[float, ...]``."""
    origin = typing.get_origin(t)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(t))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(t))
    if origin is tuple:
        args = typing.get_args(t)
        inner = (
            f"{type_name(args[0])}, ..." if len(args) == 2 and args[1] is Ellipsis else ", ".join(map(type_name, args))
        )
        return f"tuple[{inner}]"
    if t is type(None):
        return "None"
    return getattr(t, "__name__", str(t))


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def sections() -> list[tuple[str, str, list[tuple[str, Any]]]]:
    """(dotted prefix, class name, its leaf fields as (key, annotation)), top level first, in schema order."""
    out = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        own = [
            (prefix + f.name, hints[f.name])
            for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(hints[f.name])
        ]
        if own:
            out.append((prefix.rstrip("."), cls.__name__, own))
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(config.Config, "")
    top = [s for s in out if s[0] == ""]
    return top + [s for s in out if s[0] != ""]


def generate() -> str:
    docs, defaults = config.field_docs(), config.Config()
    lines = [HEAD.read_text().rstrip("\n"), "", GENERATED_NOTE, "## Every setting", ""]
    lines.append(
        "One table per section of `dist_bot/config.py`. *range*: the interval a value must lie in; *on resume*: "
        '"may change" for the fields declared `param(..., resumable=True)`, which may differ from the run folder\'s '
        "`config.yaml` when a run resumes; any other difference is refused. `dist-bot config CONFIG --explain` "
        "prints the same with a recipe's values."
    )
    resumable, ranges = config.resumable_keys(), config.ranges()
    for prefix, cls_name, fields in sections():
        title = f"`{prefix}`" if prefix else "top level"
        lines += ["", f"### {title} ({cls_name})", ""]
        lines += ["| key | type | default | range | on resume | meaning |", "|---|---|---|---|---|---|"]
        for key, annotation in fields:
            row = [
                f"`{key}`",
                f"`{cell(type_name(annotation))}`",
                f"`{cell(config.show(config.get_key(defaults, key)))}`",
                cell(ranges.get(key, "")),
                "may change" if key in resumable else "fixed",
                cell(docs.get(key, "")),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(REPO)} instead of printing it")
    args = parser.parse_args(argv)
    text = generate()
    if args.write:
        PAGE.write_text(text)
        print(f"wrote {PAGE.relative_to(REPO)}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
