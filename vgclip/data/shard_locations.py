"""Where shards live, and reading one shard's samples from there.

`--data` (and every place that reads shards) takes:

- a local folder written by `vgclip prepare` (its manifest.json, else SPLIT/*.tar);
- the same folder behind a URL: `http(s)://host/path/` (stdlib urllib), `s3://`, `gs://` or any
  other fsspec protocol (`pip install 'vgclip[remote]'` for s3fs / gcsfs); the folder's
  manifest.json lists the shards;
- a tar file or a brace pattern of them (`DIR_OR_URL/train-{000000..000099}.tar`), local or remote,
  for shards that vgclip did not write (img2dataset / open_clip layout), and `pipe:COMMAND` (the
  shard is the command's standard output), as webdataset spells it. A pattern has no val split.

Every shard is read as a forward-only byte stream, so all of these go through the same tar reader.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import shlex
import subprocess
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from vgclip.data.tar_reader import group_samples, iter_tar_samples
from vgclip.errors import VgclipError

logger = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 60.0
Shard = str | Path  # a local path, or a URL / `pipe:` command
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(location: str | Path) -> bool:
    """True for URLs and `pipe:` commands (read as streams; a broken read is worth retrying)."""
    text = str(location)
    return text.startswith("pipe:") or bool(_URL.match(text))


def is_pattern(location: str | Path) -> bool:
    """True for a tar file, a brace pattern of tar files or a `pipe:` command (no manifest, no splits)."""
    text = str(location)
    return text.startswith("pipe:") or "{" in text or text.rstrip("/").endswith(".tar")


def as_location(data: str | Path) -> Shard:
    """`--data` as the loader takes it: a URL, `pipe:` command or pattern stays a str (Path would fold
    `s3://` into `s3:/`), a local folder becomes a Path."""
    text = str(data)
    return text if is_remote(text) or is_pattern(text) else Path(text)


def pattern_split(location: str | Path, split: str) -> str:
    """The split to read at `location` for `split`: a pattern's shards are all one split, "train"."""
    return "train" if is_pattern(location) else split


def list_shards(data: str | Path, split: str) -> list[Shard]:
    """The shards of `split`: local paths (a local folder) or URLs. One-line VgclipError if there are none."""
    if is_pattern(data):
        if split != "train":
            raise VgclipError(f"{data}: a shard pattern has no '{split}' split (give it its own --val-data)")
        shards = expand_pattern(str(data))
        missing = [s for s in shards if not is_remote(s) and not Path(s).is_file()]
        if missing:
            raise VgclipError(f"{data}: no such shard file(s): {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        return shards
    manifest = read_manifest(data)
    if manifest is None:
        if is_remote(data):
            raise VgclipError(f"{join(data, 'manifest.json')} not found: a remote shard folder needs the "
                              "manifest.json `vgclip prepare` writes (or give a brace pattern of its tar files)")
        shards: list[Shard] = sorted((Path(data) / split).glob("*.tar"))
    else:
        shards = _manifest_shards(data, manifest, split)
    if not shards:
        raise VgclipError(f"{data}: no shards for split '{split}' (run `vgclip prepare` first)")
    return shards


def _manifest_shards(data: str | Path, manifest: dict[str, Any], split: str) -> list[Shard]:
    where = join(data, "manifest.json")
    if manifest.get("format", "webdataset") != "webdataset":
        raise VgclipError(f"{where}: shards are in {manifest['format']!r} format, an export format; "
                          "the loader reads webdataset shards (prepare with the default --format)")
    names = manifest.get("splits", {}).get(split, {}).get("shards")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise VgclipError(f"{where}: no list of shards for split '{split}'")
    if is_remote(data):
        return [join(data, name) for name in names]
    shards = [Path(data) / name for name in names]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise VgclipError(f"{where} lists missing shard(s): {', '.join(missing[:3])}")
    return list(shards)


def manifest_count(data: str | Path, split: str) -> int | None:
    """The image count `vgclip prepare` recorded for `split`, or None (a pattern, or no manifest)."""
    if is_pattern(data):
        return None
    entry = (read_manifest(data) or {}).get("splits", {}).get(split, {})
    return entry["images"] if isinstance(entry.get("images"), int) else None


def expand_pattern(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> [a/000.tar, a/001.tar, a/002.tar] (webdataset's brace syntax)."""
    import braceexpand

    try:
        return list(braceexpand.braceexpand(pattern))
    except (ValueError, braceexpand.UnbalancedBracesError) as exc:
        raise VgclipError(f"--data {pattern}: bad brace pattern ({exc})") from None


def join(base: str | Path, name: str) -> str:
    """`name` inside the folder `base` (a path or a URL with or without its trailing slash)."""
    if is_remote(base):
        return str(base).rstrip("/") + "/" + name
    return str(Path(base) / name)


def read_manifest(data: str | Path) -> dict[str, Any] | None:
    """The folder's manifest.json as a dict, None when it has none; VgclipError when it is not JSON."""
    where = join(data, "manifest.json")
    if is_remote(data):
        try:
            with open_shard(where) as stream:
                raw = stream.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VgclipError(f"{where}: cannot read ({exc})") from None
    else:
        path = Path(where)
        if not path.is_file():
            return None
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise VgclipError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VgclipError(f"{where}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise VgclipError(f"{where}: expected a JSON object with 'splits'")
    return manifest


@contextmanager
def open_shard(location: Shard) -> Iterator[BinaryIO]:
    """A readable byte stream of a local file, an http(s) URL, a `pipe:` command or an fsspec URL.

    A missing file or an HTTP 404 raises FileNotFoundError; other failures OSError.
    """
    text = str(location)
    if text.startswith("pipe:"):
        with _pipe(text[5:]) as stream:
            yield stream
    elif text.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(text, timeout=HTTP_TIMEOUT_S)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{text}: HTTP 404") from None
            raise OSError(f"{text}: HTTP {exc.code}") from None
        with response:
            yield _WholeResponse(response)
    elif _URL.match(text):
        with _fsspec_open(text) as stream:
            yield stream
    else:
        with open(text, "rb") as stream:
            yield stream


class _WholeResponse:
    """An HTTP response body that raises IncompleteRead when the connection ends before
    Content-Length bytes (http.client then just returns short reads, which would look like a tar
    that stops between members)."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response

    def read(self, size: int = -1) -> bytes:
        data = self.response.read(size)
        remaining = self.response.length  # None: no Content-Length (chunked), nothing to check
        if remaining and (not data or size < 0):
            raise http.client.IncompleteRead(data, remaining)
        return data

    def seekable(self) -> bool:
        return False


@contextmanager
def _pipe(command: str) -> Iterator[BinaryIO]:
    """The standard output of `command` (run without a shell); a non-zero exit is an OSError."""
    proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE)
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        status = proc.wait()
    if status != 0:
        raise OSError(f"pipe:{command} exited with status {status}")


@contextmanager
def _fsspec_open(url: str) -> Iterator[BinaryIO]:
    try:  # fsspec is the optional `remote` extra (s3://, gs://)
        import fsspec
    except ImportError:
        raise VgclipError(f"{url}: reading this URL needs fsspec: pip install 'vgclip[remote]'") from None
    try:
        handle = fsspec.open(url, "rb")
        stream = handle.open()
    except ImportError as exc:  # e.g. s3fs / gcsfs not installed
        raise VgclipError(f"{url}: {exc} (pip install 'vgclip[remote]')") from None
    with stream:
        yield stream


def read_samples(location: Shard, reader: str = "direct", wanted: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample of one shard, with the tar reader `data.tar_reader` names
    ("direct" or "webdataset"; DataConfig checks the value).

    `wanted(suffix)` False: that member's bytes are skipped (b""), with the direct reader only.
    """
    with open_shard(location) as stream:
        if reader == "webdataset":
            from webdataset.tariterators import tar_file_iterator

            files = ((f["fname"], f["data"]) for f in tar_file_iterator(stream))
            yield from group_samples(files)
        else:
            yield from iter_tar_samples(stream, wanted, name=str(location))


# What a broken read raises: a file or socket error, tar damage, a cut HTTP response.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, tarfile.TarError, EOFError, http.client.HTTPException)
