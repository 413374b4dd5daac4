"""Decoding a job's images in DataLoader workers: whole units per worker, batches that never span two
units, every bad image a counted skip with its reason (never an exception out of a worker).

A batch holds up to `batch_size` decoded images of one unit, in the unit's order; the unit's last batch
says so (`last`), so the main process writes a part as soon as its last batch arrives. A unit of files /
URLs is cut into batches of `batch_size` records (a record that fails leaves its batch one image short),
and the workers share those batches (worker w of W decodes batches w, w + W, ... of the job's file batches,
so one part of 5000 files keeps every worker busy); a shard is read whole by one worker (its batches hold
`batch_size` decoded images). The DataLoader hands the workers' batches on in turn, so every unit's batches
arrive in order. Batches are cut the same way on every run, so a resumed or multi-process run encodes
exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import itertools
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vgclip.data.decoding import BadImageError, decode_image
from vgclip.data.samples import RETRY_WAIT_S, SHARD_RETRIES
from vgclip.data.shard_locations import READ_ERRORS, is_remote, read_samples
from vgclip.data.transforms import PixelTransform, stack_images
from vgclip.errors import VgclipError
from vgclip.tagging.inputs import ImageRecord, Unit

__all__ = ["SHARD_IMAGE_SUFFIXES", "DecodedBatch", "Skip", "TaggingDataset", "make_loader"]

SHARD_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
URL_RETRIES = 2  # extra tries of a URL that failed, RETRY_WAIT_S apart (doubling)
URL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Skip:
    """An image that was not scored: its key, a short reason (`missing_file`, `not_an_image`, ...), detail."""

    key: str
    reason: str
    detail: str = ""
    shard: str | None = None


@dataclass
class DecodedBatch:
    """Up to batch_size decoded images of one unit, with what the rows need, and the unit's skips met."""

    unit: int
    last: bool
    keys: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    shard: str | None = None
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    images: torch.Tensor | None = None  # uint8 pixels (normalized=False) or the model input
    normalized: bool = False
    skips: list[Skip] = field(default_factory=list)


class _Failed(Exception):
    """An image that cannot be used, as a skip reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def read_local(record: ImageRecord) -> bytes:
    """The bytes of a local file, or _Failed(missing_file / empty_file / unreadable)."""
    try:
        data = Path(record.path or record.key).read_bytes()
    except FileNotFoundError:
        raise _Failed("missing_file", "no such file") from None
    except IsADirectoryError:
        raise _Failed("unreadable", "is a directory") from None
    except OSError as exc:
        raise _Failed("unreadable", exc.strerror or str(exc)) from None
    if not data:
        raise _Failed("empty_file", "0 bytes")
    return data


def fetch_url(url: str, retries: int = URL_RETRIES, wait_s: float = RETRY_WAIT_S) -> bytes:
    """The body of an http(s) URL, tried again `retries` times; then _Failed(url_failed)."""
    for attempt in itertools.count():
        try:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
                data = response.read()
            if not data:
                raise _Failed("empty_file", "empty response")
            return data
        except urllib.error.HTTPError as exc:
            detail = f"HTTP {exc.code}"
            if exc.code < 500 and exc.code != 429:  # a client error will not change on a retry
                raise _Failed("url_failed", detail) from None
        except (OSError, ValueError) as exc:
            detail = str(getattr(exc, "reason", None) or exc)
        if attempt >= retries:
            raise _Failed("url_failed", f"{detail} after {retries + 1} tries")
        time.sleep(wait_s * 2**attempt)
    raise AssertionError("unreachable")


class _Decoder:
    """Bytes -> (transformed image, (width, height) of the file); failures become _Failed."""

    def __init__(self, transform: PixelTransform | Callable) -> None:
        self.transform = transform
        self.ours = isinstance(transform, PixelTransform)

    def __call__(self, key: str, data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
        size: list[tuple[int, int]] = []

        def note_size(found: tuple[int, int]) -> None:  # called once with the header's size: no crop
            size.append(found)

        try:
            pixels = decode_image(key, data, draft_size=self.transform.draft_size if self.ours else None,
                                  tensor_ok=self.ours, crop_for=note_size)  # fmt: skip
            image = self.transform.pixels(pixels, flip=False) if self.ours else self.transform(pixels)
        except BadImageError as exc:
            raise _Failed(exc.reason, _detail(str(exc), key, exc.reason)) from None
        except VgclipError as exc:
            raise _Failed("decode_error", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a worker never dies of one image; the reason is kept
            raise _Failed("decode_error", f"{type(exc).__name__}: {exc}") from None
        return image, size[0]


def _detail(message: str, key: str, reason: str) -> str:
    """The detail of a BadImageError's "KEY: reason (detail)" message ("" when it has none)."""
    rest = message.partition(f"{key}: ")[2] or message
    if rest.startswith(f"{reason} (") and rest.endswith(")"):
        return rest[len(reason) + 2 : -1]
    return "" if rest == reason else rest


class _BatchBuilder:
    """Collects one unit's decoded images into batches of `batch_size`."""

    def __init__(self, unit: Unit, batch_size: int, normalized: bool) -> None:
        self.unit, self.batch_size, self.normalized = unit, batch_size, normalized
        self.current = self._new()
        self.images: list[torch.Tensor] = []

    def _new(self) -> DecodedBatch:
        return DecodedBatch(self.unit.index, False, shard=self.unit.shard, normalized=self.normalized)

    def add(self, key: str, path: str | None, image: torch.Tensor, size: tuple[int, int],
            flush: bool = True) -> DecodedBatch | None:
        """Add one image; the full batch when this one filled it (and `flush`)."""
        batch = self.current
        batch.keys.append(key)
        batch.paths.append(path)
        batch.widths.append(size[0])
        batch.heights.append(size[1])
        self.images.append(image)
        return self.flush(last=False) if flush and len(self.images) >= self.batch_size else None

    def skip(self, key: str, reason: str, detail: str) -> None:
        self.current.skips.append(Skip(key, reason, detail, self.unit.shard))

    def flush(self, last: bool) -> DecodedBatch:
        batch, self.current = self.current, self._new()
        batch.last = last
        batch.images = stack_images(self.images) if self.images else None
        self.images = []
        return batch


class TaggingDataset(torch.utils.data.IterableDataset):
    """Decoded batches of `units`: worker w of W decodes file batches w, w + W, ... (counted over every file
    unit, in order), then shard units w, w + W, ... (whole shards)."""

    def __init__(self, units: Sequence[Unit], transform: PixelTransform | Callable, batch_size: int,
                 retry_wait_s: float = RETRY_WAIT_S) -> None:
        super().__init__()
        self.units = list(units)
        self.decoder = _Decoder(transform)
        self.batch_size = batch_size
        self.retry_wait_s = retry_wait_s

    def file_batches(self) -> list[tuple[Unit, int]]:
        """(unit, first record) of every file batch, in order."""
        return [(unit, first) for unit in self.units if unit.shard is None
                for first in range(0, max(len(unit.records), 1), self.batch_size)]

    @property
    def work_items(self) -> int:
        """File batches plus shard units: the most workers that can be kept busy."""
        return len(self.file_batches()) + sum(unit.shard is not None for unit in self.units)

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for unit, first in self.file_batches()[worker::workers]:
            yield self.file_batch(unit, first)
        shards = [unit for unit in self.units if unit.shard is not None]
        for unit in shards[worker::workers]:
            yield from self.unit_batches(unit)

    def file_batch(self, unit: Unit, first: int) -> DecodedBatch:
        """The batch of a file unit's records first .. first + batch_size (`last` on the unit's last one)."""
        builder = _BatchBuilder(unit, self.batch_size, normalized=not self.decoder.ours)
        records = unit.records[first : first + self.batch_size]
        for key, path, data in self._file_items(records):
            try:
                image, size = self.decoder(key, data())
            except _Failed as failed:
                builder.skip(key, failed.reason, failed.detail)
                continue
            builder.add(key, path, image, size, flush=False)
        return builder.flush(last=first + self.batch_size >= len(unit.records))

    def unit_batches(self, unit: Unit) -> Iterator[DecodedBatch]:
        """The batches of one shard unit; the last one (possibly without images) has `last` set."""
        builder = _BatchBuilder(unit, self.batch_size, normalized=not self.decoder.ours)
        for key, path, data in self._shard_items(unit, builder):
            try:
                image, size = self.decoder(key, data)
            except _Failed as failed:
                builder.skip(key, failed.reason, failed.detail)
                continue
            full = builder.add(key, path, image, size)
            if full is not None:
                yield full
        yield builder.flush(last=True)

    def _file_items(self, records: Sequence[ImageRecord]) -> Iterator[tuple[str, str | None, Callable[[], bytes]]]:
        for record in records:
            if record.url is not None:
                yield record.key, None, lambda url=record.url: fetch_url(url, wait_s=self.retry_wait_s)
            else:
                yield record.key, record.path, lambda rec=record: read_local(rec)

    def _shard_items(self, unit: Unit, builder: _BatchBuilder) -> Iterator[tuple[str, None, bytes]]:
        """(key, None, image bytes) of every sample of the unit's shard; a remote shard whose read breaks is
        read again from its start (passing the samples already given), then counted as one `bad_shard`."""
        shard = str(unit.shard)
        done = 0
        wanted = (lambda suffix: suffix in SHARD_IMAGE_SUFFIXES)
        for attempt in itertools.count():
            try:
                for index, (key, parts) in enumerate(read_samples(shard, wanted=wanted)):
                    if index < done:
                        continue
                    done += 1
                    image = next((parts[s] for s in SHARD_IMAGE_SUFFIXES if parts.get(s)), None)
                    if image is None:
                        builder.skip(key, "no_image", "sample has no jpg/png/webp member")
                    else:
                        yield key, None, image
                return
            except READ_ERRORS as exc:
                if is_remote(shard) and attempt < SHARD_RETRIES:
                    time.sleep(self.retry_wait_s * 2**attempt)
                    continue
                builder.skip(shard, "bad_shard", f"{type(exc).__name__}: {str(exc)[:300]} (after {done} samples)")
                return
            except VgclipError as exc:  # e.g. an fsspec protocol that is not installed
                builder.skip(shard, "bad_shard", str(exc))
                return


def _one(item: DecodedBatch) -> DecodedBatch:
    """The DataLoader's collate: batches are built by the dataset."""
    return item


def make_loader(dataset: TaggingDataset, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` with `workers` decoding processes (0: in this process)."""
    workers = max(0, min(workers, dataset.work_items))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_one,
                                       prefetch_factor=2 if workers else None, persistent_workers=False)
