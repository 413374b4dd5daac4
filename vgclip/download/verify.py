"""Checks of a downloaded archive before anything is extracted from it.

In order: the byte count (when the table knows it), then the published checksum (SHA-256 or MD5), and when
no checksum is published, the archive's own integrity (CRC-32 of every zip member; every tar header). A file
that fails is renamed to NAME.bad, so a rerun downloads it again while the bad copy stays for inspection.
A passed check is remembered in NAME.verified (size and mtime), so a rerun does not hash 15 GB again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zipfile
from pathlib import Path

from vgclip.download.archives import Archive
from vgclip.errors import VgclipError
from vgclip.io import atomic_write_text


def archive_problem(path: Path, archive: Archive) -> str | None:
    """What is wrong with the downloaded file `path`, or None when it passes every check the table allows."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        return f"{size} bytes, expected {archive.size}"
    for algorithm, expected in (("sha256", archive.sha256), ("md5", archive.md5)):
        if expected:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, algorithm).hexdigest()
            return None if digest == expected.lower() else f"{algorithm} {digest}, expected {expected}"
    return zip_problem(path) if archive.kind == "zip" else tar_problem(path)


def zip_problem(path: Path) -> str | None:
    """The first damaged member of a zip (CRC-32 mismatch or unreadable), or None."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        return f"not a readable zip archive ({exc})"
    return None if bad is None else f"member {bad} fails its CRC-32 check"


def tar_problem(path: Path) -> str | None:
    """A tar that cannot be read to its end (truncated or not a tar), or None. Tar has no data checksums."""
    try:
        with tarfile.open(path) as tf:
            for _ in tf:
                pass
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"not a readable tar archive ({exc})"
    return None


def _stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def verified_marker(path: Path) -> Path:
    """The file recording that `path` passed its checks."""
    return path.with_name(path.name + ".verified")


def verify_archive(path: Path, archive: Archive) -> bool:
    """Check `path` (once per file version); on failure rename it to NAME.bad and raise VgclipError.

    Returns True when the checks ran now, False when an earlier run had already passed them.
    """
    marker = verified_marker(path)
    try:
        if json.loads(marker.read_text()) == _stamp(path):
            return False
    except (OSError, ValueError):
        pass
    problem = archive_problem(path, archive)
    if problem is not None:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        marker.unlink(missing_ok=True)
        raise VgclipError(f"{archive.filename}: damaged download ({problem}); kept aside as {bad}, rerun to "
                          "download it again (or pass --mirror URL to fetch it elsewhere)")
    atomic_write_text(marker, json.dumps(_stamp(path)))
    return True
