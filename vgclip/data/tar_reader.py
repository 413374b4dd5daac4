"""Speed path: reading shard tars directly, one header parse per member, from a forward-only stream.

What it buys: the loader reads every shard once per epoch, and Python's `tarfile` (which
webdataset uses) spends more time building `TarInfo` objects than reading the bytes, about a
tenth of a JPEG decode per sample. The loader's throughput is what `benchmarks/bench_loader.py`
reports (README, "What it does, measured"). Turn it off with `data.tar_reader=webdataset`
(webdataset's `tar_file_iterator`: the same samples from an intact shard; a damaged header there
may end the shard quietly instead of counting it).

Shards are plain tars (USTAR as `vgclip prepare` writes them, or GNU / PAX ones from other tools
such as webdataset's TarWriter and img2dataset), so a header is 512 bytes at fixed offsets. Names
come from PAX `path` records or GNU long-name members when present. Directories, links and other
special members are skipped, as webdataset does. The input is read strictly forward (an HTTP
response or a pipe works as well as a file; a local file seeks over unwanted members). Damage (a
bad checksum, a truncated member, a malformed size) raises `tarfile.ReadError` after the members
before it.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file (and contiguous file, which readers treat alike)
_CHECKSUM = slice(148, 156)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata files, not samples
_CHUNK = 1 << 20  # reads of skipped members over a stream


def iter_tar_samples(source: str | Path | BinaryIO, wanted: Callable[[str], bool] | None = None,
                     name: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample of the tar at `source` (a path or a readable byte stream).

    Files whose suffix `wanted` rejects are present with b"" (skipped, not kept). Grouping as in
    `group_samples`. `name` labels errors for a stream (default: its repr).
    """
    select = None if wanted is None else (lambda member: wanted((base_plus_ext(member)[1] or "").lower()))
    yield from group_samples(iter_tar_files(source, select, name))


def group_samples(files: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive files sharing a key ("a/b.jpg", "a/b.json") as one sample, grouped as webdataset
    does (suffix lower-cased, `__meta__` files skipped). A repeated suffix starts a new sample. On
    damage, the sample read so far is yielded and then the error raised."""
    key, parts = None, {}
    try:
        for name, data in files:
            prefix, suffix = base_plus_ext(name)
            if prefix is None or _META.match(name):
                continue
            suffix = suffix.lower()
            if prefix != key or suffix in parts:
                if key is not None:
                    yield key, parts
                key, parts = prefix, {}
            parts[suffix] = data
    except (OSError, tarfile.TarError):
        if key is not None:
            yield key, parts
        raise
    if key is not None:
        yield key, parts


def iter_tar_files(source: str | Path | BinaryIO, wanted: Callable[[str], bool] | None = None,
                   name: str | None = None) -> Iterator[tuple[str, bytes]]:
    """(member name, contents) of every regular file in the tar at `source`, in archive order.

    Files whose name `wanted` rejects come with b"" (their bytes are skipped, not kept).
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as stream:
            yield from _iter_stream(stream, wanted, str(source))
    else:
        yield from _iter_stream(source, wanted, name or repr(source))


def _iter_stream(stream: BinaryIO, wanted: Callable[[str], bool] | None, label: str) -> Iterator[tuple[str, bytes]]:
    long_name: str | None = None
    file_size = _local_size(stream)  # a local file may seek over unwanted members
    offset = 0
    while True:
        header = _read_exact(stream, BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:
            if header and header.count(0) != len(header):
                raise tarfile.ReadError(f"{label}: truncated header at byte {offset}")
            return  # end-of-archive blocks, or a tar that just stops between members
        _check_header(label, offset, header)
        size, kind = _number(label, header[124:136]), header[156:157]
        name = long_name or _ustar_name(header)
        if size < 0:  # base-256 allows it
            raise tarfile.ReadError(f"{label}: member {name} has a negative size")
        offset += BLOCK
        padded = size + (-size % BLOCK)  # members are padded to whole blocks
        if kind in _REGULAR and wanted is not None and not wanted(name):
            _skip(stream, size, padded, file_size, offset, f"{label}: member {name} truncated")
            offset += padded
            yield name, b""
            long_name = None
            continue
        data = _read_exact(stream, size)
        if len(data) < size:
            raise tarfile.ReadError(f"{label}: member {name} truncated")
        _read_exact(stream, padded - size)  # padding; a tar may end without it
        offset += padded
        if kind == b"x":  # PAX extended header: applies to the next member
            long_name = _pax_path(data) or long_name
        elif kind == b"L":  # GNU long name: applies to the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in _REGULAR:
            yield name, data
            long_name = None
        elif kind != b"g":  # directories, links, devices: not sample data
            long_name = None


def _local_size(stream: BinaryIO) -> int | None:
    """The size of a seekable local file, else None (a stream is only ever read forward)."""
    try:
        return os.fstat(stream.fileno()).st_size if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """`size` bytes, or fewer only at the end of the stream (a socket may return short reads)."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _skip(stream: BinaryIO, size: int, padded: int, file_size: int | None, offset: int, message: str) -> None:
    """Pass over a member's `padded` bytes (of which `size` must exist): seek in a file, read a stream."""
    if file_size is not None:
        if offset + size > file_size:
            raise tarfile.ReadError(message)
        stream.seek(padded, 1)
        return
    left = padded
    while left > 0:
        got = len(stream.read(min(left, _CHUNK)))
        if got == 0:
            break
        left -= got
    if padded - left < size:
        raise tarfile.ReadError(message)


def _check_header(path: str | Path, offset: int, header: bytes) -> None:
    """Raise ReadError unless the header's checksum matches (unsigned or signed, as tarfile accepts)."""
    stored = _number(path, header[_CHECKSUM])
    blanked = header[:148] + b" " * 8 + header[156:]
    if stored == sum(blanked):
        return
    if stored != sum(b - 256 if b > 127 else b for b in blanked):  # old tars summed signed chars
        raise tarfile.ReadError(f"{path}: bad tar header checksum at byte {offset}")


def _number(path: str | Path, field: bytes) -> int:
    """An octal header number (NUL/space padded), or GNU base-256 for large values."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"{path}: malformed number {field!r} in a tar header") from None


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(records: bytes) -> str | None:
    """The `path` value of PAX records ("<len> key=value\\n" each), if any."""
    pos, found = 0, None
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            found = value.decode("utf-8", "surrogateescape")
        pos += length
    return found
