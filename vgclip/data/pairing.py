"""Pairing strategies: which text (and which part of the image) a shard sample becomes this epoch.

A shard sample is one image with many region descriptions. Each epoch the loader turns it into
exactly one (image, text) training pair, chosen with an RNG seeded by (seed, epoch, image key) so
the choice does not depend on worker count, shuffle order or where a resumed epoch starts:

- ``single``: one phrase, whole image (the seed's method).
- ``combine:K``: K distinct phrases joined into one sentence ("a red car, a tall tree and a dog."),
  whole image. Images with fewer phrases use all they have.
- ``region``: one region; the image is cropped to its box plus a context margin. Boxes smaller than
  ``min_size`` px on a side are not used; a null box means the whole image. An image whose regions
  are all too small falls back to ``single`` so every image still gives one pair per epoch.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Any

from vgclip.config import Pairing  # the data.pairing grammar (parse_pairing) lives in config, which checks it

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, for PIL's crop


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text`, the same in every process and on every machine (unlike hash() of a str).

    The loader's seeds and `vgclip prepare`'s train/val split both come from it.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from `parts` (their repr), the same in every process."""
    return stable_hash(repr(parts))


def metadata_problem(meta: Any) -> str | None:
    """Why a sample's JSON cannot be used (a skip reason), or None when it is fine."""
    if not isinstance(meta, dict):
        return "bad_json"
    regions = meta.get("regions")
    if not isinstance(regions, list) or not phrases_of(regions):
        return "no_phrases"
    return None


def phrases_of(regions: list[Any]) -> list[str]:
    """The usable (non-empty string) phrases of `regions`, in order."""
    out = []
    for region in regions:
        phrase = region.get("phrase") if isinstance(region, dict) else None
        if isinstance(phrase, str) and phrase.strip():
            out.append(phrase.strip())
    return out


def join_phrases(phrases: list[str]) -> str:
    """["a red car", "a tall tree", "a dog"] -> "a red car, a tall tree and a dog." """
    parts = [p.strip().rstrip(".").strip() for p in phrases]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def choose_pair(
    meta: dict[str, Any],
    pairing: Pairing,
    rng: random.Random,
    *,
    image_size: tuple[int, int],
    margin: float,
    min_size: int,
) -> tuple[str, Box | None]:
    """(text, crop box or None for the whole image) for one image this epoch.

    `image_size` is the decoded image's (width, height); boxes are clipped to it.
    `meta` must have passed `metadata_problem`.
    """
    regions = meta["regions"]
    if pairing.kind == "combine":
        distinct = list(dict.fromkeys(phrases_of(regions)))  # keeps first spelling, drops repeats
        return join_phrases(rng.sample(distinct, min(pairing.k, len(distinct)))), None
    if pairing.kind == "region":
        eligible = []
        for region in regions:
            phrase = phrases_of([region])
            if not phrase:
                continue
            box = region.get("box")
            if box is None:
                eligible.append((phrase[0], None))
                continue
            crop = region_crop(box, margin, image_size, min_size)
            if crop is not None:
                eligible.append((phrase[0], crop))
        if eligible:
            return rng.choice(eligible)
    return rng.choice(phrases_of(regions)), None


def region_crop(box: Any, margin: float, image_size: tuple[int, int], min_size: int) -> Box | None:
    """Crop box for region `box` = [x, y, w, h] widened by `margin` x its size on each side.

    None when the box is malformed or, after clipping to the image, smaller than `min_size`.
    """
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None
    width, height = image_size
    x, y, w, h = box
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 - x0 < min_size or y1 - y0 < min_size or x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(0, math.floor(x0 - dx)), max(0, math.floor(y0 - dy))
    right, bottom = min(width, math.ceil(x1 + dx)), min(height, math.ceil(y1 + dy))
    return left, top, right, bottom


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_text(text: str) -> str:
    """Swap the words left and right (keeping case): the phrase of a horizontally flipped image."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, text)
