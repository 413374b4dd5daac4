"""Safe extraction of a verified archive into a staging folder.

torchvision's `extract_archive` calls `extractall` with no member filter (a tar can then write outside the
target through `../` names or links) and writes straight into the final folder. Here tar members go through
the standard library's "data" filter (no absolute paths, no links leaving the folder, no device files) and
zip member names are sanitised by `zipfile` itself; the caller extracts into a hidden staging folder and
renames the result into place, so an interrupted extraction is never mistaken for a complete one.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

from vgclip.download.archives import Archive
from vgclip.errors import VgclipError


def extracted_size(path: Path, kind: str) -> int:
    """Bytes the archive's members declare (zip: uncompressed sizes, tar: member sizes)."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                return sum(info.file_size for info in zf.infolist())
        with tarfile.open(path) as tf:
            return sum(member.size for member in tf if member.isfile())
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise VgclipError(f"{path}: cannot read the archive ({exc})") from None


def extract_into(path: Path, archive: Archive, dest: Path) -> None:
    """Extract `path` into `dest`, then check that everything `archive.provides` is there."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.kind == "zip":
            _extract_zip(path, archive, dest)
        else:
            with tarfile.open(path) as tf:
                tf.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise VgclipError(f"{archive.filename}: unsafe member refused ({exc}); nothing was installed") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise VgclipError(f"{archive.filename}: damaged archive ({exc}); nothing was installed") from None
    except OSError as exc:
        raise VgclipError(f"{dest}: cannot extract {archive.filename} ({exc.strerror or exc})") from None
    for rel in archive.provides:
        if not (dest / rel).exists():
            raise VgclipError(f"{archive.filename}: {rel} is not in the archive (a different file at this URL "
                              "or mirror?); nothing was installed")


def _extract_zip(path: Path, archive: Archive, dest: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        if not archive.single_file:
            zf.extractall(dest)
            return
        files = [info for info in zf.infolist() if not info.is_dir()]
        if len(files) != 1:
            raise VgclipError(f"{archive.filename}: expected one file inside, found {len(files)}")
        # The file goes under the name the readers expect, whatever it is called inside the zip.
        target = dest / archive.provides[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(files[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)

