"""Records spooled to disk behind an array index, and the train/val order computed from that index.

`prepare` must see every record before it can split (the split orders all keys by a seeded hash), but
must not hold the records: the full Visual Genome is 108k images with 5.4M regions. Records go to a
JSON-lines file; memory keeps per record only its byte offset, length and split hash, in numpy arrays
(24 bytes a record), and the keys are read back from the file where they are needed.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vgclip.data.pairing import stable_hash
from vgclip.prepare.cleaning import Skips

__all__ = ["Spool", "item_of_key", "split_order", "spool_records"]


@dataclass(frozen=True)
class Spool:
    """The JSON-lines file of spooled records and, per record in file order, where its line is and its split hash."""

    path: Path
    offsets: np.ndarray  # int64: byte offset of the record's line
    lengths: np.ndarray  # int64: bytes of the line
    hashes: np.ndarray  # uint64: stable_hash(f"{seed}:{key}"), the split's sort key

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, positions: Sequence[int] | np.ndarray) -> list[dict]:
        """The records at these positions (file order numbers), in the order given."""
        records = []
        with open(self.path, "rb") as fh:
            for position in positions:
                fh.seek(int(self.offsets[position]))
                records.append(json.loads(fh.read(int(self.lengths[position]))))
        return records

    def keys(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """The record keys at these positions."""
        return [record["key"] for record in self.read(positions)]


def item_of_key(key: str) -> str:
    """The skip-list spelling of a record key: "vg-000000123" -> "vg:123" (as the readers write it)."""
    source, _, number = key.rpartition("-")
    return f"{source}:{int(number)}" if number.isdigit() else key


def spool_records(records: Iterable[dict], path: Path, seed: int, excluded: set[str], skips: Skips) -> Spool:
    """Write records as JSON lines to `path` and index them; excluded ids become skips."""
    offsets, lengths, hashes = array("q"), array("q"), array("Q")
    position = 0
    with open(path, "wb") as fh:
        for record in records:
            key = record["key"]
            if str(record["image_id"]) in excluded or key in excluded:
                skips.add(item_of_key(key), "excluded_id")
                continue
            line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
            fh.write(line)
            offsets.append(position)
            lengths.append(len(line))
            hashes.append(stable_hash(f"{seed}:{key}"))
            position += len(line)
    return Spool(path, np.frombuffer(offsets, dtype=np.int64), np.frombuffer(lengths, dtype=np.int64),
                 np.frombuffer(hashes, dtype=np.uint64))  # fmt: skip


def split_order(spool: Spool, skips: Skips) -> np.ndarray:
    """Positions of the distinct keys ordered by (split hash, key), as `cleaning.assign_split` orders keys.

    A key spooled twice keeps its first record; the later ones are `duplicate_image_id` skips. Equal hashes
    (a duplicate, or a 64-bit collision of two keys) are the only records whose keys are read back.
    """
    order = np.argsort(spool.hashes, kind="stable")  # stable: equal hashes stay in file order
    ordered = spool.hashes[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])  # i where hash i equals hash i + 1
    if not same.size:
        return order
    breaks = np.flatnonzero(np.diff(same) > 1)
    starts, stops = np.r_[same[0], same[breaks + 1]], np.r_[same[breaks], same[-1]] + 2
    pieces, done = [], 0
    for start, stop in zip(starts, stops):
        pieces += [order[done:start], _order_tied(spool, order[start:stop], skips)]
        done = stop
    pieces.append(order[done:])
    return np.concatenate(pieces)


def _order_tied(spool: Spool, positions: np.ndarray, skips: Skips) -> np.ndarray:
    """Records of one hash: ordered by key, each key's first record kept, the others counted as skips."""
    kept: list[int] = []
    previous = None
    for key, position in sorted(zip(spool.keys(positions), positions.tolist())):
        if key == previous:
            skips.add(item_of_key(key), "duplicate_image_id")
            continue
        kept.append(position)
        previous = key
    return np.asarray(kept, dtype=np.int64)
