"""HTTP download with range resume, retries with exponential backoff and a per-file progress bar.

torchvision's `download_url` (and urllib's `urlretrieve`) restart from byte 0 after a failure; a dropped
connection at 80 % of a 9 GB archive should cost the last few megabytes, not the whole file. Bytes go to
`NAME.part` beside the target, which is renamed to NAME only once the server's byte count is reached.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vgclip.errors import VgclipError

USER_AGENT = "vgclip-download/1"
CHUNK = 1 << 20
_MAX_BACKOFF_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadInterrupted(Exception):
    """The transfer stopped before the server's byte count was reached (worth a retry)."""


@dataclass(frozen=True)
class FetchSettings:
    """How hard to try: attempts after the first, backoff base in seconds, socket timeout, progress bar."""

    retries: int = 5
    backoff_s: float = 2.0
    timeout_s: float = 60.0
    progress: bool = True


def part_path(dest: Path) -> Path:
    """Where the bytes of `dest` accumulate until the download is complete."""
    return dest.with_name(dest.name + ".part")


def fetch(url: str, dest: str | Path, size: int | None = None, settings: FetchSettings = FetchSettings()) -> Path:
    """Download `url` to `dest`, resuming `dest`.part; VgclipError naming the URL when it cannot.

    `size` (when known) is the expected byte count: a server offering a different size is refused.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, size, settings)
            break
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):
                raise VgclipError(f"{url}: HTTP {exc.code} {exc.reason}; the host may have moved the file: "
                                  "pass --mirror URL (or set VGCLIP_MIRROR) to fetch it elsewhere") from None
            error: Exception = exc
        except (OSError, http.client.HTTPException, DownloadInterrupted) as exc:
            error = exc
        attempt += 1
        if attempt > settings.retries:
            have = part.stat().st_size if part.exists() else 0
            kept = f"{part.name} keeps the {have} bytes received, rerun to resume" if have else "rerun to retry"
            raise VgclipError(f"{url}: download failed after {attempt} attempt(s) ({_describe(error)}); {kept}, "
                              "or pass --mirror URL (or set VGCLIP_MIRROR)") from None
        time.sleep(min(settings.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
    os.replace(part, dest)
    return dest


def _describe(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _open(url: str, part: Path, start: int, timeout: float) -> tuple[http.client.HTTPResponse | None, int]:
    """The response and the offset it starts at (None: the part file already holds the whole file).

    When the server cannot continue from `start`, the part file is dropped and the next attempt starts over.
    """
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not start:
            raise
        total = (exc.headers.get("Content-Range") or "").rpartition("/")[2]
        exc.close()
        if total == str(start):
            return None, start  # the range starts at the end: nothing is missing
        part.unlink()
        raise DownloadInterrupted("the server refused to resume; starting over") from None
    if start and response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range") or "")
        if match and int(match.group(1)) == start:
            return response, start
        response.close()
        part.unlink()
        raise DownloadInterrupted("the server answered a different byte range; starting over")
    return response, 0  # a 200 to a range request: the server sends the whole file again


def _fetch_once(url: str, part: Path, size: int | None, settings: FetchSettings) -> None:
    name = part.name.removesuffix(".part")
    start = part.stat().st_size if part.exists() else 0
    if size is not None and start > size:
        part.unlink()  # longer than the real file: not a prefix of it
        start = 0
    if size is not None and start == size:
        return
    response, start = _open(url, part, start, settings.timeout_s)
    if response is None:
        return
    with response:
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None and length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise VgclipError(f"{url}: the server offers {total} bytes but {name} has {size} (a different file?); "
                              "pass --mirror URL to fetch it elsewhere")
        if total is not None:
            ensure_free_space(part.parent, total - start, f"to download {name}")
        _copy(response, part, start, total, settings.progress)
    got = part.stat().st_size
    if total is not None and got < total:
        raise DownloadInterrupted(f"connection closed at byte {got} of {total}")


def _copy(response: http.client.HTTPResponse, part: Path, start: int, total: int | None, progress: bool) -> None:
    """Append the response body to `part` (or rewrite it from 0) with a progress bar."""
    from tqdm import tqdm

    name = part.name.removesuffix(".part")
    with open(part, "ab" if start else "wb") as fh, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
        disable=not progress, leave=True,
    ) as bar:
        while True:
            chunk = response.read(CHUNK)
            if not chunk:
                break
            try:
                fh.write(chunk)
            except OSError as exc:
                raise VgclipError(f"{part}: cannot write ({exc.strerror or exc}); {start + bar.n} bytes kept, "
                                  "free some space and rerun to resume") from None
            bar.update(len(chunk))


def ensure_free_space(folder: str | Path, needed: int, what: str) -> None:
    """VgclipError saying how much is needed when `folder`'s file system has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise VgclipError(f"not enough free space in {folder} {what}: {format_bytes(needed)} needed, "
                          f"{format_bytes(free)} free; free some space or choose another --out")


def format_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the hosts state their sizes)."""
    if n < 1000:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"
