"""What `vgclip predict` reads, listed into work units: image files, folders (recursive), `--list` files of
paths and http(s) URLs, and shards (`--data`, every form `vgclip train --data` takes).

Files and URLs keep the order they were given in (a folder's images sorted by path, a --list file's in
its order, after the command line's; each key once) and are cut into units of `part_size` images; each
shard is one unit after them, in shard order, its samples in their order. A unit's index is its part
number: the order of the output files, the resume bookkeeping (a unit is done when its part exists) and
the split between ranks all follow it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vgclip.data.shard_locations import as_location, is_pattern, list_shards, read_manifest
from vgclip.errors import VgclipError

__all__ = ["IMAGE_EXTENSIONS", "ImageRecord", "Inputs", "Unit", "list_inputs", "read_list_file"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_HTTP = re.compile(r"^https?://", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRecord:
    """One image file or URL to score: `key` names its row (the path as given, or the URL); `path` is the
    absolute local path (None for a URL)."""

    key: str
    path: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Unit:
    """One part of the job: a run of file / URL records, or one whole shard."""

    index: int
    records: tuple[ImageRecord, ...] = ()
    shard: str | None = None

    @property
    def size(self) -> int | None:
        """Images in the unit (None for a shard: known once read)."""
        return None if self.shard is not None else len(self.records)


@dataclass(frozen=True)
class Inputs:
    """Every unit of the job, in part order."""

    units: tuple[Unit, ...]
    files: int
    shards: int

    @property
    def known_images(self) -> int:
        """Images known before reading (files and URLs; shards count as they are read)."""
        return self.files

    def fingerprint(self) -> str:
        """sha256 over the keys, the shards and the unit boundaries: the same inputs give the same value."""
        digest = hashlib.sha256()
        for unit in self.units:
            digest.update(f"unit {unit.index} {unit.shard}\n".encode())
            for record in unit.records:
                digest.update(f"{record.key}\n".encode())
        return digest.hexdigest()

    def for_rank(self, rank: int, world_size: int) -> list[Unit]:
        """The units rank `rank` of `world_size` encodes (every world_size-th, from its rank)."""
        return [u for u in self.units if u.index % world_size == rank]


def read_list_file(path: Path) -> list[str]:
    """The entries of a `--list` file: one path or http(s) URL per line; blank lines and # comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VgclipError(f"--list {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def folder_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively (by extension, case-insensitive; hidden entries skipped)."""
    found = []
    for root, dirs, files in os.walk(folder, onerror=None, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(root) / name)
    return found


def file_records(items: Sequence[str]) -> list[ImageRecord]:
    """Records of image files, folders and URLs in the order given, a folder's images in sorted order, each key
    once (its first place). A path that does not exist stays a record: reading it is a counted skip
    (missing_file), as any other bad file."""
    records: dict[str, ImageRecord] = {}
    for item in items:
        if _HTTP.match(item):
            records.setdefault(item, ImageRecord(key=item, url=item))
            continue
        path = Path(item)
        paths = sorted(folder_images(path), key=str) if path.is_dir() else [path]
        for found in paths:
            key = str(found)
            records.setdefault(key, ImageRecord(key=key, path=os.path.abspath(found)))
    return list(records.values())


def shard_list(source: str) -> list[str]:
    """Every shard of `--data SOURCE`: a pattern's files, or each split of a shard folder in turn."""
    location = as_location(source)
    if is_pattern(location):
        return [str(s) for s in list_shards(location, "train")]
    manifest = read_manifest(location)
    if manifest is not None:
        splits = list((manifest.get("splits") or {}).keys())
    else:
        folder = Path(location)
        if not folder.is_dir():
            raise VgclipError(f"--data {source}: no such folder, shard file or pattern")
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.tar")))
    if not splits:
        raise VgclipError(f"--data {source}: no shards found (a `vgclip prepare` folder, a .tar, a brace "
                          "pattern of them or pipe:COMMAND)")
    return [str(s) for split in splits for s in list_shards(location, split)]


def list_inputs(images: Sequence[str | Path], list_file: Path | None = None, data: Sequence[str] = (),
                part_size: int = 5000) -> Inputs:
    """Every unit of the job: file / URL records cut into parts of `part_size`, then one unit per shard."""
    if part_size < 1:
        raise VgclipError(f"--part-size must be at least 1, got {part_size}")
    items = [str(i) for i in images] + (read_list_file(list_file) if list_file is not None else [])
    records = file_records(items)
    shards = [shard for source in data for shard in shard_list(source)]
    if not records and not shards:
        raise VgclipError("no images to score: give image files, folders, --list FILE or --data SOURCE "
                          "(folders are searched for " + "/".join(e[1:] for e in IMAGE_EXTENSIONS) + " files)")
    units = [Unit(i, tuple(records[start:start + part_size]))
             for i, start in enumerate(range(0, len(records), part_size))]
    units += [Unit(len(units) + i, shard=shard) for i, shard in enumerate(shards)]
    return Inputs(tuple(units), len(records), len(shards))
