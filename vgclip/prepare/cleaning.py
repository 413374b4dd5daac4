"""Cleaning of phrases and boxes, the skip ledger, and the deterministic train/val split."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from vgclip.data.pairing import stable_hash

_REPLACEMENT_CHAR = "\ufffd"  # what the UTF-8 sanitiser puts where the file had invalid bytes


@dataclass(frozen=True)
class CleaningSettings:
    """Knobs of the phrase and box cleaning (recorded verbatim in the manifest)."""

    min_phrase_chars: int = 1
    max_phrase_chars: int = 200
    # A box whose clipped part is under this many pixels wide or high is treated as outside.
    min_box_side: float = 1.0


# Examples kept per skip reason: the counts are exact, but millions of duplicate phrases must not
# make the manifest (and the memory holding it) grow with them.
MAX_EXAMPLES_PER_REASON = 1000


@dataclass
class Skips:
    """A count per skip reason, and the first `MAX_EXAMPLES_PER_REASON` skipped items of each."""

    items: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, item: str, reason: str) -> None:
        """Record that `item` (e.g. "vg:12/region:345") was dropped because of `reason`."""
        self.counts[reason] += 1
        if self.counts[reason] <= MAX_EXAMPLES_PER_REASON:
            self.items.append((item, reason))

    def add_many(self, reason: str, count: int, items: Iterable[str]) -> None:
        """Record `count` items dropped for `reason`, reading from `items` (lazy) only the examples kept."""
        if count <= 0:
            return
        room = max(0, min(count, MAX_EXAMPLES_PER_REASON - self.counts[reason]))
        self.items.extend((item, reason) for item in itertools.islice(items, room))
        self.counts[reason] += count

    def extend(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record several (item, reason) pairs."""
        for item, reason in pairs:
            self.add(item, reason)

    def to_json(self) -> dict:
        """The manifest's view: summary counts (sorted) and the stored examples."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples_per_reason": MAX_EXAMPLES_PER_REASON,
            "items": [{"item": item, "reason": reason} for item, reason in self.items],
        }


def clean_phrase(text: object, settings: CleaningSettings) -> tuple[str | None, str]:
    """Return (cleaned phrase, "") or (None, reason) for a phrase that must be dropped."""
    if type(text) is not str:
        return None, "phrase_not_text"
    if not (text.isascii() and text.isprintable()):
        # Slow path only for text that may hold control characters or invalid-UTF-8 markers.
        if _REPLACEMENT_CHAR in text:
            return None, "phrase_invalid_utf8"
        # Drop control, format (zero-width, bidi, soft hyphen), private-use and unassigned
        # characters: they carry no meaning for a caption and confuse tokenisers. Whitespace of any
        # kind is kept here and normalised to single spaces just below.
        text = "".join(ch for ch in text if ch.isprintable() or ch.isspace())
    text = " ".join(text.split())
    if len(text) < settings.min_phrase_chars or not text:
        return None, "phrase_empty" if not text else "phrase_too_short"
    if len(text) > settings.max_phrase_chars:
        return None, "phrase_too_long"
    return text, ""


_BIG = 1e9  # coordinates beyond this are garbage; the chained comparison also rejects NaN and inf


def clean_box(
    x: object, y: object, w: object, h: object, width: float, height: float, settings: CleaningSettings
) -> tuple[list[float] | None, str]:
    """Return ([x, y, w, h] clipped to the image, "") or (None, reason).

    Boxes that slightly (or partly) overflow the image are clipped to it; boxes of zero or
    negative size, or with nothing left inside the image, are dropped.
    """
    try:
        x, y, w, h = float(x), float(y), float(w), float(h)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, "box_not_numeric"
    if not (-_BIG < x < _BIG and -_BIG < y < _BIG and -_BIG < w < _BIG and -_BIG < h < _BIG):
        return None, "box_not_numeric"
    if w <= 0 or h <= 0:
        return None, "box_nonpositive_size"
    x0 = x if x > 0.0 else 0.0
    y0 = y if y > 0.0 else 0.0
    x1 = x + w if x + w < width else float(width)
    y1 = y + h if y + h < height else float(height)
    if x1 - x0 < settings.min_box_side or y1 - y0 < settings.min_box_side:
        return None, "box_outside_image"
    return [x0, y0, x1 - x0, y1 - y0], ""


class PhraseDeduper:
    """Drops exact duplicate phrases within one image, ignoring case."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def is_duplicate(self, phrase: str) -> bool:
        """True if this phrase (case-insensitively) was already seen for this image."""
        key = phrase.casefold()
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


def split_sizes(available: int, train: int, val: int) -> tuple[int, int]:
    """How many images go to train and val when `available` images survive cleaning.

    With enough images: exactly (train, val). With fewer, both shrink proportionally to the
    requested ratio (10:1 for the defaults), keeping at least one val image when val > 0 and
    at least two images exist, and giving every remaining image to train.
    """
    if train < 0 or val < 0:
        raise ValueError("split sizes must be >= 0")
    if available >= train + val:
        return train, val
    if train + val == 0:
        return 0, 0
    n_val = round(available * val / (train + val))
    if val > 0 and available >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, available)
    return available - n_val, n_val


def assign_split(keys: Iterable[str], train: int, val: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split: order keys by a seeded stable hash; the first go to train, the next to val.

    The result depends only on the set of keys and the seed (not on their input order), and no
    key can be in both lists.
    """
    ordered = sorted(set(keys), key=lambda k: (stable_hash(f"{seed}:{k}"), k))
    n_train, n_val = split_sizes(len(ordered), train, val)
    return ordered[:n_train], ordered[n_train:n_train + n_val]
