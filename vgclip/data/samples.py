"""Which samples a shard holds, read as a forward-only stream: usable samples, ranges of them, counts.

A sample is usable when it has an image and a text (vgclip `json.gz` / `json` regions, or an img2dataset /
open_clip caption); others are skipped with a reason. Images are not decoded here.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from typing import Any, NamedTuple

from vgclip.data.pairing import metadata_problem
from vgclip.data.shard_locations import READ_ERRORS, Shard, is_remote, read_samples

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TEXT_SUFFIXES = ("json", "json.gz", "txt")  # vgclip regions (gzip-compressed as `prepare` writes them), or a caption
MAX_METADATA_BYTES = 16 << 20  # a `json.gz` member that inflates beyond this is refused, not inflated
SHARD_RETRIES = 2  # extra reads of a remote shard whose stream broke, before it counts as skipped
RETRY_WAIT_S = 0.5  # doubled after each retry
RawSample = tuple[str, bytes, dict[str, Any], str]  # key, image bytes, parsed metadata, shard url


class ShardRange(NamedTuple):
    """Usable samples [start, stop) of shards[shard] (stop None: to the shard's end); `counted`: this
    range reports the skips and failures it meets (False for a repeat, read twice in an epoch)."""

    shard: int
    start: int = 0
    stop: int | None = None
    counted: bool = True


_SIZES: dict[tuple[str, str, tuple[int, int] | None], int] = {}


def shard_sizes(shards: Iterable[Shard], tar_reader: str = "direct") -> list[int]:
    """Usable samples of each shard, as `raw_samples` gives them (tar headers and JSON, no image bytes).

    Counted once per process (every epoch plans over the same counts); a local file is counted
    again when its size or modification time changes.
    """
    sizes = []
    for shard in shards:
        stat = None if is_remote(shard) else os.stat(shard)
        key = (str(shard), tar_reader, None if stat is None else (stat.st_size, stat.st_mtime_ns))
        if key not in _SIZES:
            _SIZES[key] = scan_shard(shard, tar_reader, check_text=True)
        sizes.append(_SIZES[key])
    return sizes


def read_ranges(shards: list[Shard], ranges: Iterable[ShardRange], skip: Callable[..., None],
                tar_reader: str = "direct", fail_shard: Callable[[str], None] | None = None, *,
                retry_wait_s: float = RETRY_WAIT_S) -> Iterator[RawSample]:
    """The usable samples of each range of `shards`, in order (see `raw_samples`).

    Skips and failures go to `skip` / `fail_shard` only when met inside a counted range, so that
    workers reading different ranges of one shard report each bad sample once.
    """
    for shard, start, stop, counted in ranges:
        where = _Position(start, stop, counted)
        report_fail = None if fail_shard is None else where.only_inside(fail_shard)
        with closing(raw_samples([shards[shard]], where.only_inside(skip), tar_reader, report_fail,
                                 retry_wait_s=retry_wait_s)) as samples:
            for sample in samples:
                where.passed += 1
                if where.passed > start:
                    yield sample
                if stop is not None and where.passed >= stop:
                    break


class _Position:
    """How far a range's read has come in its shard (usable samples passed), and whether that is inside it."""

    def __init__(self, start: int, stop: int | None, counted: bool) -> None:
        self.start, self.stop, self.counted, self.passed = start, stop, counted, 0

    def inside(self) -> bool:
        return self.counted and self.start <= self.passed and (self.stop is None or self.passed < self.stop)

    def only_inside(self, report: Callable[..., None]) -> Callable[..., None]:
        """`report`, called only while the read is inside the range."""
        def call(*args: Any) -> None:
            if self.inside():
                report(*args)
        return call


def raw_samples(shards: list[Shard], skip: Callable[..., None], tar_reader: str = "direct",
                fail_shard: Callable[[str], None] | None = None, *,
                retry_wait_s: float = RETRY_WAIT_S) -> Iterator[RawSample]:
    """(key, image bytes, parsed metadata, shard) of the usable samples of `shards`; others go to `skip`.

    A damaged local shard counts one `bad_tar` and gives the samples before the damage. A remote
    one is first read again from its start (passing over the samples already given), up to
    `SHARD_RETRIES` times, `retry_wait_s` apart (doubling); a shard that stays broken is also
    passed to `fail_shard`.
    """
    for shard in shards:
        url, done = str(shard), 0  # done: samples of this shard already given or skipped
        for attempt in itertools.count():
            try:
                for index, (key, parts) in enumerate(read_samples(shard, tar_reader)):
                    if index < done:
                        continue
                    done += 1
                    reason, image, meta = sample_parts(parts)
                    if reason is None:
                        yield key, image, meta, url
                    else:
                        skip(reason, key, url)
                break
            except READ_ERRORS as exc:
                if is_remote(shard) and attempt < SHARD_RETRIES:
                    logger.warning("%s: read failed (%s); reading it again (%d of %d)", url, exc, attempt + 1,
                                   SHARD_RETRIES)
                    time.sleep(retry_wait_s * 2**attempt)
                    continue
                skip("bad_tar", "-", url, f"{type(exc).__name__}: {str(exc)[:300]}")
                if fail_shard is not None:
                    fail_shard(url)
                break


def sample_parts(parts: dict[str, bytes]) -> tuple[str | None, bytes, Any]:
    """(skip reason or None, image bytes, metadata) from the raw parts of one sample; no decoding.

    vgclip samples carry regions in `json.gz` (`json` from earlier versions); img2dataset / open_clip ones a
    caption (`txt`, or `caption` in `json`), which becomes one whole-image region.
    """
    if not any(suffix in parts for suffix in TEXT_SUFFIXES):
        return "missing_json", b"", None
    image = next((parts[suffix] for suffix in IMAGE_SUFFIXES if suffix in parts), None)
    if image is None:
        return "missing_jpg", b"", None
    meta: Any = None
    if "json" in parts or "json.gz" in parts:
        try:
            meta = json.loads(parts["json"] if "json" in parts else inflate_metadata(parts["json.gz"]))
        except (ValueError, UnicodeDecodeError, zlib.error):
            return "bad_json", image, None
        if isinstance(meta, dict) and "regions" in meta:
            return metadata_problem(meta), image, meta
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8", "replace")
    meta = {"regions": [{"phrase": caption, "box": None}]}
    return metadata_problem(meta), image, meta


def inflate_metadata(data: bytes) -> bytes:
    """The JSON inside gzip data (one member, or several one after another as `gzip` reads them), at most
    MAX_METADATA_BYTES of it (ValueError beyond, or when truncated)."""
    parts: list[bytes] = []
    room, rest = MAX_METADATA_BYTES, data
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
        parts.append(inflater.decompress(rest, room))
        room -= len(parts[-1])
        if inflater.unconsumed_tail or (inflater.unused_data and room <= 0):  # max_length 0 would mean no limit
            raise ValueError(f"metadata inflates beyond {MAX_METADATA_BYTES} bytes")
        if not inflater.eof:
            raise ValueError("truncated gzip metadata")
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)


def scan_shard(shard: Shard, tar_reader: str, *, check_text: bool) -> int:
    """Samples in one shard, as `raw_samples` gives them (with `check_text`: parsing the JSON / text,
    without: every sample with an image and a text member), reading no image bytes."""
    count = 0
    wanted = (lambda suffix: check_text and suffix in TEXT_SUFFIXES)
    try:
        for _key, parts in read_samples(shard, tar_reader, wanted=wanted):
            if check_text:
                count += sample_parts(parts)[0] is None
            else:
                count += any(s in parts for s in IMAGE_SUFFIXES) and any(s in parts for s in TEXT_SUFFIXES)
    except READ_ERRORS as exc:
        logger.warning("%s: unreadable tar (%s); counting the samples before the damage", shard, exc)
    return count
