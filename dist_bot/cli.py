"""The `dist-bot` command.

    dist-bot models [--image-size 224]          every model: parameters and multiply-adds
    dist-bot config CONFIG [key=value ...]      the resolved config of a recipe plus overrides, as YAML

Bad input (an unknown key, a wrongly typed value, an unknown model) ends with one line on stderr that
names the problem and the fix, and exit status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import sys

from dist_bot import __version__
from dist_bot.config import ConfigError, load_config, to_yaml


def cmd_models(args: argparse.Namespace) -> int:
    from dist_bot.models.profile import model_table  # imports torch: only for the commands that need it

    print(model_table(image_size=args.image_size, num_classes=args.num_classes))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-bot", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"dist-bot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list every model with its parameters and multiply-adds")
    p.add_argument("--image-size", type=int, default=224, help="input resolution in pixels (default 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="width of the classifier (default 1000)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("config", help="print the resolved config of a recipe and overrides as YAML")
    p.add_argument("config", help="recipe YAML, e.g. configs/resnet50d_bs1024.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. schedule.epochs=90"
    )
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dist-bot {args.command}: error: {e}", file=sys.stderr)
        return 2
