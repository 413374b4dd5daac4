"""The `vgclip` command line: one sub-command per module in `vgclip.commands`.

Each command module defines `add_parser(subparsers)` (which sets `run=` as a default) and keeps
its heavy imports inside `run`, so `vgclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from vgclip.config import config_keys
from vgclip.errors import VgclipError

COMMANDS = (
    "synth",
    "download",
    "prepare",
    "train",
    "zeroshot",
    "predict",
    "export",
    "demo",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="vgclip", description="CLIP on Visual Genome, zero-shot multi-label classification with thresholds"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"vgclip.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; user errors become one line on stderr and exit code 2."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:  # the sub-command's own usage, not the top-level one argparse would print
        command = _subparser(parser, args.command)
        scope = _override_scope(command)
        hint = "" if scope is None else _override_hint(extras, argv, scope)
        command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    try:
        return int(args.run(args) or 0)
    except VgclipError as exc:
        print(f"vgclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vgclip {args.command}: interrupted", file=sys.stderr)
        return 130


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of sub-command `name`."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _override_scope(parser: argparse.ArgumentParser) -> str | None:
    """The key prefix a command's `key=value` overrides take ("" any, "eval." for zeroshot), None if none."""
    action = next((a for a in parser._actions if a.dest == "overrides"), None)
    return None if action is None else str(action.metavar or "").partition("key=")[0]


def _override_hint(extras: list[str], argv: list[str], scope: str) -> str:
    """' (did you mean `train.epochs=3`? ...)' when an unknown option looks like a config key, else ''."""
    keys = [k for k in config_keys() if k.startswith(scope)]
    for arg in extras:
        if not arg.startswith("--"):
            continue
        name, sep, value = arg[2:].partition("=")
        if not sep and arg in argv and argv.index(arg) + 1 < len(argv):
            following = argv[argv.index(arg) + 1]
            value = "" if following.startswith("-") else following
        name = name.replace("-", "_")
        leaf = [k for k in keys if k.rsplit(".", 1)[-1] == name]
        match = [name] if name in keys else leaf[:1] if len(leaf) == 1 else difflib.get_close_matches(name, keys, 1)
        if match:
            return (f" (did you mean `{match[0]}={value or '...'}`? config overrides are key=value, "
                    "with no dashes)")
    return ""


if __name__ == "__main__":
    sys.exit(main())
