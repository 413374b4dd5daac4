"""Lists of names (class names, labels): a file with one name per line, or a comma list on the command line.

One reader for every such list, so `vgclip zeroshot --classes` and `vgclip predict --labels-file` agree:
a name is the whole line, trimmed, so multi-word names ("traffic light") stay whole. Blank lines and
lines starting with `#` are skipped; a repeated name is an error naming the file and the names.
(ImageSets/Main lists are a different format, `id` or `id  1`, read by `vgclip.data.voc`.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vgclip.errors import VgclipError

# Suffixes that make a --classes value a file name even when the file is missing (then: an error,
# rather than a one-class list called "classes.txt").
LIST_FILE_SUFFIXES = (".txt", ".lst", ".list", ".names", ".csv")


def check_unique(names: list[str], source: str) -> list[str]:
    """`names` unchanged; VgclipError naming `source` and every repeated name if any repeats."""
    dupes = [n for n, k in Counter(names).items() if k > 1]
    if dupes:
        raise VgclipError(f"{source}: repeated name(s): {', '.join(repr(n) for n in dupes)}")
    return names


def parse_name_lines(text: str, source: str) -> list[str]:
    """Names from text with one name per line (whole line, trimmed; blank and `#` lines skipped)."""
    lines = (line.strip() for line in text.splitlines())
    return check_unique([line for line in lines if line and not line.startswith("#")], source)


def read_name_file(path: str | Path, what: str = "name list") -> list[str]:
    """Names from a file with one name per line; VgclipError naming the file if unreadable, empty or repetitive.

    Read as UTF-8 with an optional byte-order mark (editors on Windows write one; it must not become
    part of the first name).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise VgclipError(f"{path}: cannot read {what} ({exc})") from None
    names = parse_name_lines(text, str(path))
    if not names:
        raise VgclipError(f"{path}: {what} is empty (one name per line expected)")
    return names


def split_comma_list(text: str, source: str = "comma list") -> list[str]:
    """Names from "a, b c ,d" (each item trimmed, empty items dropped); repeats are an error."""
    return check_unique([n.strip() for n in text.split(",") if n.strip()], source)


def looks_like_list_file(spec: str) -> bool:
    """Whether a command-line value names a file rather than being a (one-item) comma list."""
    if "," in spec:
        return False
    path = Path(spec)
    return path.is_file() or "/" in spec or path.suffix.lower() in LIST_FILE_SUFFIXES

