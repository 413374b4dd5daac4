"""The `prepare` pipeline: cleaned records -> split -> shards in parallel -> manifest.json.

0. The shard-writing processes are forked first, while this process is small: forked later, each would
   carry (and count in its resident memory) everything the steps below hold.
1. Records from a source (VG, COCO, CSV) are spooled to `SHARDS/.state/records.jsonl`, keeping
   only an array index (offset, length, split hash: 24 bytes a record) in memory (prepare/spool.py).
2. The split orders keys by a seeded stable hash (as cleaning.assign_split); shards are filled in
   that order, so each shard is a random-looking but reproducible sample of its split.
3. Shards are written by the process pool, one task (list of records) per shard. A shard whose
   final file and `.state/` result exist with the same keys and settings is kept (resume);
   everything else is (re)written.
4. manifest.json is written atomically with counts, settings, shard lists and every skip.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vgclip.prepare.cleaning import CleaningSettings, Skips, split_sizes
from vgclip.prepare.spool import Spool, item_of_key, split_order, spool_records
from vgclip.data.images import DEFAULT_MAX_PIXELS
from vgclip.prepare.shard_writer import (
    FORMATS, SAMPLE_MEMBERS, ShardResult, ShardTask, result_from_json, shard_name, state_path, tfrecord_writer_class,
    write_shard,
)
from vgclip.errors import VgclipError
from vgclip.io import atomic_path

SPLITS = ("train", "val")


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that shapes the output; recorded verbatim in manifest.json."""

    max_side: int = 512
    shard_size: int = 1000
    workers: int = 1
    format: str = "webdataset"
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    train_images: int = 80_000
    val_images: int = 8_000
    seed: int = 0
    exclude_ids_file: str | None = None
    cleaning: CleaningSettings = field(default_factory=CleaningSettings)

    def fingerprint(self) -> str:
        """Hash of the settings that change a shard's bytes (not workers, not split sizes)."""
        keys = {"max_side": self.max_side, "format": self.format, "jpeg_quality": self.jpeg_quality,
                "max_pixels": self.max_pixels, "cleaning": asdict(self.cleaning),
                "members": SAMPLE_MEMBERS}  # shards of an earlier layout (plain `json`) are rewritten on resume
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def read_exclude_ids(path: str | Path | None) -> set[str]:
    """Ids from a file with one id per line (blank lines and '#' comments ignored)."""
    if path is None:
        return set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise VgclipError(f"--exclude-ids {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise VgclipError(f"--exclude-ids {path}: not UTF-8 text") from None
    return {line.split("#", 1)[0].strip() for line in lines} - {""}


def run_prepare(records: Iterable[dict], out: str | Path, settings: PrepareSettings, skips: Skips,
                inputs: dict, progress: bool = True) -> dict:
    """Run the whole pipeline over `records` into `out`; return the manifest (also written to disk)."""
    if settings.format not in FORMATS:
        raise VgclipError(f"--format {settings.format}: choose one of {', '.join(FORMATS)}")
    if settings.format == "tfrecord":
        tfrecord_writer_class()  # fail fast, before any work, if the package is missing
    if settings.max_side < 16 or settings.shard_size < 1:
        raise VgclipError("--max-side must be >= 16 and --shard-size >= 1")
    out = Path(out)
    state_dir = out / ".state"
    state_dir.mkdir(parents=True, exist_ok=True)
    excluded = read_exclude_ids(settings.exclude_ids_file)
    spool_path = state_dir / "records.jsonl"
    try:
        with _worker_pool(settings.workers) as pool:
            spool = spool_records(records, spool_path, settings.seed, excluded, skips)
            if not len(spool):
                raise VgclipError(nothing_usable(skips, inputs))
            split_positions = _split(spool, settings, skips)
            # From here shards change: a manifest left by an earlier run would no longer describe them.
            (out / "manifest.json").unlink(missing_ok=True)
            results = _write_all_shards(out, spool, split_positions, settings, pool, progress)
    finally:
        spool_path.unlink(missing_ok=True)
    manifest = _build_manifest(results, settings, skips, inputs)
    if not any(entry["images"] for entry in manifest["splits"].values()):
        raise VgclipError(nothing_usable(skips, inputs))
    with atomic_path(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        os.chmod(tmp, 0o644)  # the temp file is created 0600; the manifest is meant to be shared
    return manifest


def _split(spool: Spool, settings: PrepareSettings, skips: Skips) -> dict[str, np.ndarray]:
    """Spool positions of each split's records, in shard order; the rest are `beyond_split_sizes` skips."""
    order = split_order(spool, skips)
    n_train, n_val = split_sizes(len(order), settings.train_images, settings.val_images)
    rest = np.sort(order[n_train + n_val:])
    skips.add_many("beyond_split_sizes", len(rest), (item_of_key(key) for key in _keys_lazily(spool, rest)))
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val]}


def _keys_lazily(spool: Spool, positions: np.ndarray, chunk: int = 256) -> Iterator[str]:
    for start in range(0, len(positions), chunk):
        yield from spool.keys(positions[start:start + chunk])


def _plan_tasks(out: Path, split_positions: dict[str, np.ndarray],
                settings: PrepareSettings) -> Iterator[tuple[str, int, np.ndarray]]:
    """(split, shard index, spool positions) of every shard, creating split folders and removing stale files."""
    for split in SPLITS:
        positions = split_positions[split]
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        n_shards = -(-len(positions) // settings.shard_size)
        _remove_stale(split_dir, out / ".state", split, n_shards, FORMATS[settings.format])
        for index in range(n_shards):
            yield split, index, positions[index * settings.shard_size:(index + 1) * settings.shard_size]


def _remove_stale(split_dir: Path, state_dir: Path, split: str, n_shards: int, suffix: str) -> None:
    """Delete partial temp files and shards outside the plan (left by a run with other settings)."""
    for path in split_dir.glob(".shard-*.tmp"):
        path.unlink()
    for path in list(split_dir.glob("shard-*")):
        index = path.name.split("-", 1)[1].split(".", 1)[0]
        if index.isdigit() and int(index) < n_shards and path.suffix == suffix:
            continue
        path.unlink()
        if index.isdigit():
            state_path(state_dir, split, int(index)).unlink(missing_ok=True)


def _completed(out: Path, split: str, index: int, keys: list[str], settings: PrepareSettings) -> ShardResult | None:
    """The stored result of a shard finished by an earlier run with the same keys and settings."""
    final = out / split / shard_name(index, settings.format)
    state = state_path(out / ".state", split, index)
    if not (final.is_file() and state.is_file()):
        return None
    try:
        result = result_from_json(json.loads(state.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError):
        return None
    if result.keys != keys or result.fingerprint != settings.fingerprint():
        return None
    return result


def _write_all_shards(out: Path, spool: Spool, split_positions: dict[str, np.ndarray], settings: PrepareSettings,
                      pool: cf.ProcessPoolExecutor | None, progress: bool) -> list[ShardResult]:  # fmt: skip
    """Keep completed shards, write the others (in the process pool when there is one)."""
    plan = list(_plan_tasks(out, split_positions, settings))
    results: list[ShardResult] = []
    bar = tqdm(total=len(plan), unit="shard", desc="writing shards", disable=not progress, file=sys.stderr)
    images = 0

    def keep(result: ShardResult) -> None:
        nonlocal images
        result.keys = []  # in the shard's .state file for resume; the manifest needs only the counts
        results.append(result)
        images += result.images
        bar.update(1)
        bar.set_postfix(images=images)

    def tasks() -> Iterator[ShardTask]:
        for split, index, positions in plan:
            records = spool.read(positions)
            done = _completed(out, split, index, [r["key"] for r in records], settings)
            if done is not None:
                keep(done)
            else:
                yield _make_task(out, records, split, index, settings)

    for result in _run_tasks(tasks(), pool, window=2 * settings.workers):
        keep(result)
    bar.close()
    return sorted(results, key=lambda r: (SPLITS.index(r.split), r.index))


def _make_task(out: Path, records: list[dict], split: str, index: int, settings: PrepareSettings) -> ShardTask:
    return ShardTask(split=split, index=index, out_dir=str(out / split), state_dir=str(out / ".state"),
                     records=records, fingerprint=settings.fingerprint(), max_side=settings.max_side,
                     jpeg_quality=settings.jpeg_quality, max_pixels=settings.max_pixels, fmt=settings.format)


@contextmanager
def _worker_pool(workers: int) -> Iterator[cf.ProcessPoolExecutor | None]:
    """The shard-writing processes, all started before the caller reads any record (None: write inline)."""
    if workers <= 1:
        yield None
        return
    # fork on Linux: workers only run PIL + tarfile, and spawn would re-import the caller's main
    # module (breaking scripts without a __main__ guard, stdin, notebooks). Elsewhere fork is
    # unsafe (macOS) or missing.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_interrupts)
    try:
        # The first task forks every worker (a fork pool starts them all at once): now, while the index is empty.
        pool.submit(int).result()
        yield pool
    except BrokenProcessPool:
        raise VgclipError("a shard-writing process died (out of memory?); rerun the same command to resume "
                           "(finished shards are kept), perhaps with fewer --workers") from None
    finally:
        # After an error or Ctrl-C, queued shards are dropped and the ones being written finish (each is atomic).
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    """Worker start-up: Ctrl-C reaches the whole process group; only the main process answers it (no traceback
    from every worker), and it stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_tasks(tasks: Iterator[ShardTask], pool: cf.ProcessPoolExecutor | None, window: int) -> Iterator[ShardResult]:
    """Run shard tasks inline (no pool) or in the pool with at most `window` shards of records pending."""
    if pool is None:
        yield from (write_shard(t) for t in tasks)
        return
    pending: set[cf.Future] = set()
    for task in tasks:
        pending.add(pool.submit(write_shard, task))
        if len(pending) >= window:
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            yield from (f.result() for f in done)
    for future in cf.as_completed(pending):
        yield future.result()


def _build_manifest(results: list[ShardResult], settings: PrepareSettings, skips: Skips, inputs: dict) -> dict:
    """manifest.json: counts and shard lists per split, exact settings, skips and notes."""
    notes = Skips()
    splits = {s: {"images": 0, "regions": 0, "shards": []} for s in SPLITS}
    for result in results:
        entry = splits[result.split]
        entry["images"] += result.images
        entry["regions"] += result.regions
        entry["shards"].append(f"{result.split}/{result.name}")
        skips.extend(result.skipped)
        notes.extend(result.notes)
    return {
        "format": settings.format,
        "inputs": inputs,
        "settings": asdict(settings),
        "splits": splits,
        "skipped": skips.to_json(),
        "notes": notes.to_json(),
    }


def nothing_usable(skips: Skips, inputs: dict) -> str:
    """The one-line error when no image survived: what was expected where, and the top skip reasons."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in skips.counts.most_common(3)) or "no records at all"
    where = inputs.get("images_expected", "")
    return f"no usable image ({reasons}){'; expected ' + where if where else ''}: nothing written"


def format_summary(manifest: dict, out: str | Path) -> str:
    """A few human-readable lines summarising a manifest."""
    lines = [f"wrote {out}"]
    for split, entry in manifest["splits"].items():
        lines.append(f"  {split}: {entry['images']} images, {entry['regions']} phrases, {len(entry['shards'])} shards")
    counts = manifest["skipped"]["counts"]
    lines.append(f"  skipped: {sum(counts.values())} items" + ("" if counts else " (none)"))
    lines.extend(f"    {reason}: {n}" for reason, n in counts.items())
    if counts.get("beyond_split_sizes"):
        lines.append(f"  {counts['beyond_split_sizes']} usable images are in neither split: raise --train-images / "
                     "--val-images to include them")
    for reason, n in manifest["notes"]["counts"].items():
        lines.append(f"  note {reason}: {n}")
    return "\n".join(lines)
