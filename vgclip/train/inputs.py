"""What a run reads: its training and validation shards, checked before anything is built, and what
reading them skipped (the run summary's `skipped` and `failed_shards`).

`--data` and `--val-data` take any location `vgclip.data.shard_locations` reads (a prepared folder, the
same behind http(s) / s3 / gs, a brace pattern of tar files, `pipe:`). Validation reads, in order:
`--val-data` (a folder's val split, or every shard of a pattern), else the val split of the
`--data` folder when it has one; a pattern given as `--data` has no val split of its own.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vgclip.config import DataConfig, parse_pairing
from vgclip.data.loader import count_samples, list_shards
from vgclip.data.shard_locations import Shard, as_location, is_pattern, pattern_split
from vgclip.errors import VgclipError


@dataclass(frozen=True)
class ValSource:
    """Where validation reads: a location and the split of it that `list_shards` / `make_loader` take."""

    location: Shard
    split: str


def check_shards(data: str | Path, data_cfg: DataConfig, val_data: str | Path | None = None
                 ) -> tuple[int, ValSource | None]:
    """(number of training samples, where validation reads or None); one-line VgclipErrors naming the
    location for a missing folder, no shards, no usable samples or a pairing these shards cannot give."""
    data = _checked("--data", data, data_cfg.pairing)
    list_shards(data, "train")  # one-line VgclipError when there are none
    n_train = count_samples(data, "train", data_cfg.tar_reader)
    if n_train <= 0:
        raise VgclipError(f"--data {data}: the train shards hold no usable samples")
    if val_data is not None:
        location = _checked("--val-data", val_data, data_cfg.pairing)
        val = ValSource(location, pattern_split(location, "val"))
        if count_samples(val.location, val.split, data_cfg.tar_reader) <= 0:
            raise VgclipError(f"--val-data {location}: the {val.split} shards hold no usable samples")
        return n_train, val
    if is_pattern(data):
        return n_train, None  # train without validation (give --val-data for some)
    try:
        has_val = count_samples(data, "val", data_cfg.tar_reader) > 0
    except VgclipError:  # the folder has no val split: train without validation
        has_val = False
    return n_train, ValSource(data, "val") if has_val else None


def _checked(flag: str, location: str | Path, pairing: str) -> Shard:
    """`location` as the loader takes it, after the checks that need no read."""
    location = as_location(location)
    if isinstance(location, Path) and not location.is_dir():
        raise VgclipError(f"{flag} {location}: no such folder (create shards with `vgclip prepare`)")
    kind = parse_pairing(pairing).kind
    if is_pattern(location) and kind != "single":
        need = "region boxes" if kind == "region" else "several region phrases per image"
        raise VgclipError(f"data.pairing={pairing} needs {need}, but {flag} {location} is a shard pattern, read as "
                          "img2dataset / open_clip shards that have only captions (one per image): "
                          "use data.pairing=single")
    return location


@runtime_checkable
class SkipSource(Protocol):
    """What a loader tells about its reads (`vgclip.data.loader.ShardLoader`)."""

    @property
    def skipped(self) -> dict[str, int]: ...

    @property
    def failed_shards(self) -> list[str]: ...


class DataReport:
    """Skipped samples by reason and unreadable shards over this session's loaders (every training
    epoch and validation pass: a bad sample read in three epochs counts three times)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.failed: set[str] = set()
        self._open: list[SkipSource] = []

    def track(self, loader: object) -> None:
        """Count `loader`'s skips once it is done (the loaders tracked before are done by now); a plain
        iterable of batches, which reports no skips, adds nothing."""
        self._fold()
        if isinstance(loader, SkipSource):
            self._open.append(loader)

    def _fold(self) -> None:
        for loader in self._open:
            self.skipped.update(loader.skipped)
            self.failed.update(loader.failed_shards)
        self._open.clear()  # drop the references: a finished epoch's loader holds pipes

    def summary(self, gather: Callable[[bytes], list[bytes]] | None = None) -> dict[str, Any]:
        """{"skipped": {reason: n}, "failed_shards": [url, ...]}; with `gather` (bytes -> every rank's
        bytes, a collective), over all ranks."""
        self._fold()
        mine = json.dumps({"skipped": dict(self.skipped), "failed": sorted(self.failed)}).encode()
        skipped: Counter[str] = Counter()
        failed: set[str] = set()
        for blob in gather(mine) if gather is not None else [mine]:
            part = json.loads(blob)
            skipped.update(part["skipped"])
            failed.update(part["failed"])
        return {"skipped": dict(sorted(skipped.items())), "failed_shards": sorted(failed)}

