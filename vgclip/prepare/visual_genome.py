"""Streaming Visual Genome reader: image_data.json + region_descriptions.json -> cleaned image records.

The region file of VG is ~700 MB (5.4M regions); it is parsed with ijson (the C yajl2 backend)
one image entry at a time, so memory stays bounded whatever the file size. Both the v1.0 keys
(`id` / `image` in regions, `id` in image_data) and the v1.2+ keys (`region_id` / `image_id`) work.

A record is a plain dict (cheap to pickle and to spool as JSON lines):
``{"key": "vg-000000123", "image_id": 123, "source": "vg", "path": ".../123.jpg",
"width": W, "height": H, "regions": [[phrase, x, y, w, h], ...]}`` with boxes in the
coordinates of image_data.json's (W, H).
"""

from __future__ import annotations

import codecs
import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import ijson
import numpy as np

from vgclip.prepare.cleaning import CleaningSettings, Skips, clean_box, clean_phrase
from vgclip.errors import VgclipError

IMAGE_DIRS = ("VG_100K", "VG_100K_2")
IMAGE_DATA = "image_data.json"
REGION_DESCRIPTIONS = "region_descriptions.json"
MAX_SIDE = 1 << 20  # a recorded width or height beyond this is a broken entry (image_data_bad_size), not a photo


def _backend():
    """The C backend when available: the pure-python one is ~20x slower on the 700 MB region file."""
    try:
        return ijson.get_backend("yajl2_c")
    except Exception:  # noqa: BLE001 - any import problem of the C extension: fall back, still correct
        return ijson


class Utf8SanitizingReader:
    """Binary reader that replaces invalid UTF-8 with U+FFFD and counts bytes read.

    yajl refuses a whole file at the first invalid byte; VG dumps contain a few such phrases, which
    should be dropped (the phrase cleaner drops text with U+FFFD), not abort the run.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.position = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def read(self, size: int = -1) -> bytes:
        """Read up to `size` bytes of the underlying file, sanitised."""
        chunk = self.raw.read(size)
        self.position += len(chunk)
        if not chunk:
            return self._decoder.decode(b"", final=True).encode("utf-8")
        if chunk.isascii() and not self._decoder.getstate()[0]:
            return chunk  # fast path: nothing to fix, no multi-byte sequence pending
        return self._decoder.decode(chunk).encode("utf-8")


def stream_json_array(path: str | Path, prefix: str = "item") -> Iterator[Any]:
    """Yield the elements of the JSON array at `prefix` ("item": the top level), one at a time.

    Malformed JSON raises VgclipError naming the file and the byte position.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head_raw = fh.read(64)
        head = head_raw.lstrip(b"\xef\xbb\xbf \t\r\n")
        opener = b"[" if prefix == "item" else b"{"
        if not head.startswith(opener):
            kind = "an array" if prefix == "item" else "an object"
            raise VgclipError(f"{path}: expected {kind} at the top level of the JSON")
        fh.seek(3 if head_raw.startswith(b"\xef\xbb\xbf") else 0)  # yajl rejects a UTF-8 BOM
        reader = Utf8SanitizingReader(fh)
        try:
            yield from _backend().items(reader, prefix, use_float=True)
        except ijson.JSONError as exc:
            arg = exc.args[0] if exc.args else exc
            detail = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
            first_line = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
            raise VgclipError(f"{path}: malformed JSON near byte {reader.position}: {first_line}") from None


def check_vg_root(vg_root: str | Path) -> tuple[Path, Path]:
    """Paths of image_data.json and region_descriptions.json; VgclipError naming whatever is missing."""
    root = Path(vg_root)
    if not root.is_dir():
        raise VgclipError(f"--vg-root {root}: no such directory")
    for name in (IMAGE_DATA, REGION_DESCRIPTIONS):
        if not (root / name).is_file():
            raise VgclipError(f"{root / name}: missing (expected in the Visual Genome folder)")
    if not any((root / d).is_dir() for d in IMAGE_DIRS):
        raise VgclipError(f"{root / IMAGE_DIRS[0]}: missing image folder (neither VG_100K/ nor VG_100K_2/ exists)")
    return root / IMAGE_DATA, root / REGION_DESCRIPTIONS


class ImageTable:
    """image_data.json as arrays: id -> (width, height, image sub-folder named by the url or None).

    About 25 bytes an image in numpy arrays instead of a few hundred in a dict of tuples: `prepare` holds it for
    the whole region pass. A repeated id keeps its last entry, as a dict would.
    """

    def __init__(self, ids: Sequence[int], widths: Sequence[int], heights: Sequence[int], subdirs: Sequence[int]) -> None:
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        ids_sorted = np.asarray(ids, dtype=np.int64)[order]
        last = np.ones(len(ids_sorted), dtype=bool)  # the last entry of each id
        last[:-1] = ids_sorted[1:] != ids_sorted[:-1]
        self.ids, order = ids_sorted[last], order[last]
        self.widths = np.asarray(widths, dtype=np.int64)[order]
        self.heights = np.asarray(heights, dtype=np.int64)[order]
        self.subdirs = np.asarray(subdirs, dtype=np.int8)[order]  # index into IMAGE_DIRS, -1: none

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, image_id: int) -> int | None:
        """Row of `image_id`, None when image_data.json does not list it."""
        row = int(np.searchsorted(self.ids, image_id))
        return row if row < len(self.ids) and self.ids[row] == image_id else None

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, int) and self.position(image_id) is not None

    def __getitem__(self, image_id: int) -> tuple[int, int, str | None]:
        row = self.position(image_id)
        if row is None:
            raise KeyError(image_id)
        return self.at(row)

    def at(self, row: int) -> tuple[int, int, str | None]:
        """(width, height, sub-folder or None) of the image at `row` (as `position` gives it)."""
        code = int(self.subdirs[row])
        return int(self.widths[row]), int(self.heights[row]), IMAGE_DIRS[code] if code >= 0 else None


def read_image_data(path: str | Path, skips: Skips) -> ImageTable:
    """image id -> (width, height, image sub-folder named by the url or None), for ~108k images."""
    ids, widths, heights, subdirs = array("q"), array("q"), array("q"), array("b")
    for n, entry in enumerate(stream_json_array(path)):
        if not isinstance(entry, dict):
            skips.add(f"image_data[{n}]", "image_data_not_object")
            continue
        image_id = entry.get("image_id", entry.get("id"))
        width, height = entry.get("width"), entry.get("height")
        if not _is_int(image_id) or not _is_number(width) or not _is_number(height):
            skips.add(f"image_data[{n}]", "image_data_missing_keys")
            continue
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            skips.add(f"vg:{int(image_id)}", "image_data_bad_size")
            continue
        url = entry.get("url") or ""
        ids.append(int(image_id))
        widths.append(int(width))
        heights.append(int(height))
        subdirs.append(next((i for i, d in enumerate(IMAGE_DIRS) if f"/{d}/" in url), -1))
    return ImageTable(ids, widths, heights, subdirs)


def resolve_image_path(vg_root: Path, image_id: int, subdir: str | None) -> Path | None:
    """The image file: the folder the url names first, then both VG folders."""
    dirs = ([subdir] if subdir else []) + [d for d in IMAGE_DIRS if d != subdir]
    for d in dirs:
        candidate = vg_root / d / f"{image_id}.jpg"
        if os.path.isfile(candidate):
            return candidate
    return None


def iter_clean_regions(
    region_path: str | Path,
    meta: ImageTable,
    settings: CleaningSettings,
    skips: Skips,
) -> Iterator[tuple[int, list[list]]]:
    """Stream region_descriptions.json; yield (image id, cleaned regions) per image with any left."""
    seen = np.zeros(len(meta), dtype=bool)
    for n, entry in enumerate(stream_json_array(region_path)):
        image_id = _entry_image_id(entry)
        if image_id is None:
            skips.add(f"region_descriptions[{n}]", "regions_entry_missing_keys")
            continue
        row = meta.position(image_id)
        if row is None:
            skips.add(f"vg:{image_id}", "no_image_data")
            continue
        seen[row] = True
        if not isinstance(entry.get("regions"), list):
            skips.add(f"vg:{image_id}", "regions_entry_missing_keys")
            continue
        width, height, _ = meta.at(row)
        regions = _clean_regions(image_id, entry["regions"], width, height, settings, skips)
        if regions:
            yield image_id, regions
        else:
            skips.add(f"vg:{image_id}", "no_valid_regions")
    unseen = meta.ids[~seen]
    skips.add_many("no_regions_entry", len(unseen), (f"vg:{image_id}" for image_id in unseen.tolist()))


def iter_vg_records(vg_root: str | Path, settings: CleaningSettings, skips: Skips) -> Iterator[dict]:
    """Cleaned records of every usable VG image (missing image files are counted skips).

    The folder is checked right away (VgclipError naming a missing file); records are lazy.
    """
    root = Path(vg_root)
    image_data, region_file = check_vg_root(root)
    return _vg_records(root, image_data, region_file, settings, skips)


def _vg_records(root: Path, image_data: Path, region_file: Path, settings: CleaningSettings,
                skips: Skips) -> Iterator[dict]:
    meta = read_image_data(image_data, skips)
    for image_id, regions in iter_clean_regions(region_file, meta, settings, skips):
        width, height, subdir = meta[image_id]
        path = resolve_image_path(root, image_id, subdir)
        if path is None:
            skips.add(f"vg:{image_id}", "missing_image_file")
            continue
        yield {
            "key": f"vg-{image_id:09d}", "image_id": image_id, "source": "vg", "path": str(path),
            "width": width, "height": height, "regions": regions,
        }


def _clean_regions(
    image_id: int, raw: list, width: int, height: int, settings: CleaningSettings, skips: Skips
) -> list[list]:
    """Clean one image's regions: phrase, then box, then case-insensitive duplicates.

    This loop runs 5.4M times on the real data set: it binds names locally and builds the skip
    item string only for regions that are dropped.
    """
    seen: set[str] = set()
    out: list[list] = []
    add_skip = skips.add
    for n, region in enumerate(raw):
        try:
            phrase, x, y, w, h = region["phrase"], region["x"], region["y"], region["width"], region["height"]
        except (KeyError, TypeError):
            add_skip(_region_item(image_id, region, n), "region_missing_keys")
            continue
        phrase, reason = clean_phrase(phrase, settings)
        if phrase is not None:
            box, reason = clean_box(x, y, w, h, width, height, settings)
            if box is not None:
                key = phrase.casefold()
                if key not in seen:
                    seen.add(key)
                    out.append([phrase, *box])
                    continue
                reason = "phrase_duplicate"
        add_skip(_region_item(image_id, region, n), reason)
    return out


def _region_item(image_id: int, region: object, n: int) -> str:
    rid = region.get("region_id", region.get("id", f"[{n}]")) if isinstance(region, dict) else f"[{n}]"
    return f"vg:{image_id}/region:{rid}"


def _entry_image_id(entry: object) -> int | None:
    """Image id of a region_descriptions entry: top-level `id`/`image_id`, else the regions' own."""
    if not isinstance(entry, dict):
        return None
    image_id = entry.get("image_id", entry.get("id"))
    regions = entry.get("regions")
    if image_id is None and isinstance(regions, list) and regions and isinstance(regions[0], dict):
        image_id = regions[0].get("image_id", regions[0].get("image"))
    return int(image_id) if _is_int(image_id) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
