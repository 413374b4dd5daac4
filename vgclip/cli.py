"""The `vgclip` command line: one sub-command per module in `vgclip.commands`.

Each command module defines `add_parser(subparsers)` (which sets `run=` as a default) and keeps
its heavy imports inside `run`, so `vgclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except VgclipError as exc:
        print(f"vgclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vgclip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
