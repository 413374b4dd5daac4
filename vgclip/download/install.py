"""One `vgclip download` run: fetch, verify, extract into staging, rename into place, mark installed.

Layout of the output folder OUT while and after it runs:

    OUT/.vgclip-download/archives/NAME(.part|.verified|.bad)   downloads (removed once installed unless kept)
    OUT/.vgclip-download/staging-SOURCE/                       extraction; .extracted-NAME marks a finished one
    OUT/.vgclip-download/installed/NAME.json                   written last, once NAME's paths are in place
    OUT/<paths the archives provide>                           e.g. VG_100K/, region_descriptions.json

A rerun skips whatever the markers say is done, so it resumes a download, redoes an interrupted extraction
from its verified archive, and does nothing at all once every archive is installed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vgclip.download.extract import extract_into, extracted_size
from vgclip.download.fetch import FetchSettings, ensure_free_space, fetch, format_bytes, part_path
from vgclip.download.archives import Archive, DatasetSource
from vgclip.download.verify import verified_marker, verify_archive
from vgclip.errors import VgclipError
from vgclip.io import atomic_write_text

WORK_DIR = ".vgclip-download"


def _quiet(message: str) -> None:
    del message


@dataclass(frozen=True)
class DownloadSettings:
    """Where to fetch from, what to fetch, and how to report it."""

    mirror: str | None = None
    images: bool = True
    keep_archives: bool = False
    fetch: FetchSettings = FetchSettings()
    echo: Callable[[str], None] = _quiet


@dataclass
class DownloadResult:
    """What a run did; `root` is the folder to hand to the reader (`--vg-root` / `--voc-root`)."""

    source: DatasetSource
    out_dir: Path
    root: Path
    downloaded: list[str] = field(default_factory=list)
    installed: list[str] = field(default_factory=list)


def installed_marker(out_dir: Path, archive: Archive) -> Path:
    """The file recording that `archive` is installed in `out_dir`."""
    return out_dir / WORK_DIR / "installed" / f"{archive.filename}.json"


def is_installed(out_dir: Path, archive: Archive) -> bool:
    """True when `archive`'s marker exists and every path it provides is still there."""
    return installed_marker(out_dir, archive).is_file() and all((out_dir / p).exists() for p in archive.provides)


def download_dataset(source: DatasetSource, out_dir: str | Path, options: DownloadSettings = DownloadSettings()
                     ) -> DownloadResult:
    """Make `out_dir` hold `source` in the readers' layout; a second call checks the markers and does nothing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = DownloadResult(source, out_dir, out_dir / source.root if source.root else out_dir)
    pending = [a for a in source.selected(options.images) if not is_installed(out_dir, a)]
    if not pending:
        return result
    work = out_dir / WORK_DIR
    archive_dir, stage = work / "archives", work / f"staging-{source.name}"
    archive_dir.mkdir(parents=True, exist_ok=True)
    journal = work / f"installing-{source.name}.json"
    paths = _install_order(pending)
    _check_conflicts(out_dir, journal, paths)
    ensure_free_space(out_dir, _space_needed(pending, archive_dir, stage), "for the download and extraction")
    for archive in pending:
        if _download(archive, archive_dir, options):
            result.downloaded.append(archive.filename)
    for archive in pending:
        _extract(archive, archive_dir / archive.filename, stage, options)
    _install(pending, paths, stage, out_dir, journal, options.mirror)
    result.installed = [a.filename for a in pending]
    shutil.rmtree(stage)
    if not options.keep_archives:
        for archive in pending:
            (archive_dir / archive.filename).unlink(missing_ok=True)
            verified_marker(archive_dir / archive.filename).unlink(missing_ok=True)
    return result


def _install_order(pending: list[Archive]) -> list[str]:
    """Paths to rename into place, each once, in table order (annotations come last in the table)."""
    return list(dict.fromkeys(p for a in pending for p in a.provides))


def _journal_paths(journal: Path) -> set[str]:
    try:
        return set(json.loads(journal.read_text())["paths"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _check_conflicts(out_dir: Path, journal: Path, paths: list[str]) -> None:
    """Refuse, before downloading anything, to replace a path vgclip did not put there."""
    ours = _journal_paths(journal)  # renamed by an install that was interrupted before its markers
    for rel in paths:
        if (out_dir / rel).exists() and rel not in ours:
            raise VgclipError(f"{out_dir / rel} already exists and was not installed by `vgclip download` "
                              "(no marker); move it away or choose another --out")


def _space_needed(pending: list[Archive], archive_dir: Path, stage: Path) -> int:
    """Bytes still to download plus at least as much again to extract (JPEG archives barely compress)."""
    needed = 0
    for archive in pending:
        size = archive.size or 0
        path = archive_dir / archive.filename
        if not path.exists():
            part = part_path(path)
            needed += size - (part.stat().st_size if part.exists() else 0)
        if not (stage / f".extracted-{archive.filename}").exists():
            needed += size
    return max(needed, 0)


def _download(archive: Archive, archive_dir: Path, options: DownloadSettings) -> bool:
    """Fetch (or resume) and verify one archive; True when bytes were fetched in this run."""
    path = archive_dir / archive.filename
    fetched = False
    if not path.exists():
        url = archive.url_from(options.mirror)
        size = f" ({format_bytes(archive.size)})" if archive.size else ""
        options.echo(f"{archive.filename}{size}: downloading {url}")
        fetch(url, path, archive.size, options.fetch)
        fetched = True
    if verify_archive(path, archive):
        check = "sha256" if archive.sha256 else "md5" if archive.md5 else f"{archive.kind} integrity"
        options.echo(f"{archive.filename}: verified ({'size, ' if archive.size else ''}{check})")
    return fetched


def _extract(archive: Archive, path: Path, stage: Path, options: DownloadSettings) -> None:
    """Extract into the staging folder unless a previous run finished this archive already."""
    done = stage / f".extracted-{archive.filename}"
    if done.exists():
        return
    stage.mkdir(parents=True, exist_ok=True)
    ensure_free_space(stage, extracted_size(path, archive.kind), f"to extract {archive.filename}")
    options.echo(f"{archive.filename}: extracting")
    extract_into(path, archive, stage)
    done.touch()


def _install(pending: list[Archive], paths: list[str], stage: Path, out_dir: Path, journal: Path,
             mirror: str | None) -> None:
    """Rename each staged path into `out_dir`, then write the markers; the journal makes this rerunnable."""
    atomic_write_text(journal, json.dumps({"paths": paths}))
    for rel in paths:
        src, dst = stage / rel, out_dir / rel
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.replace(dst)
        elif not dst.exists():
            raise VgclipError(f"{src}: missing from the staging folder; delete {stage} and rerun")
    for archive in pending:
        record = {"filename": archive.filename, "url": archive.url_from(mirror), "size": archive.size,
                  "md5": archive.md5, "sha256": archive.sha256, "provides": list(archive.provides),
                  "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(installed_marker(out_dir, archive), json.dumps(record, indent=1) + "\n")
    journal.unlink()
