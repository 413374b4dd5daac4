"""Shard writing (runs inside worker processes): records -> one WebDataset tar (or TFRecord file).

Sample format (docs/design.md): `__key__` = record key (feature "key" in TFRecord), `jpg` = RGB JPEG with the longer side
capped at `max_side`, `json.gz` = gzip of the compact JSON {"image_id", "source", "width", "height", "regions":
[{"phrase", "box": [x, y, w, h] | null}]} in the re-encoded image's pixels (webdataset's decoder inflates a `.gz`
member by itself; TFRecord keeps the plain JSON as feature "json"). Compressed, the regions of a VG image take about a
quarter of their JSON bytes, which keeps a shard within 1.1x of the JPEGs it holds.

A shard is written to a hidden temporary name, its result (counts, skips) saved beside it in
`.state/`, and only then renamed: a final name therefore always means a complete shard.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vgclip.data.images import DEFAULT_MAX_PIXELS, BadImageError, open_image_checked
from vgclip.errors import VgclipError
from vgclip.io import atomic_write_text

FORMATS = {"webdataset": ".tar", "tfrecord": ".tfrecord"}
SAMPLE_MEMBERS = ("jpg", "json.gz")  # a webdataset sample's members (TFRecord features: key, jpg, json)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard (picklable)."""

    split: str
    index: int
    out_dir: str  # SHARDS/<split>
    state_dir: str  # SHARDS/.state
    records: list[dict]
    fingerprint: str  # settings that change shard content; stored so resume can tell stale shards
    max_side: int = 512
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    fmt: str = "webdataset"


@dataclass
class ShardResult:
    """What one shard holds and what it had to skip."""

    split: str
    index: int
    name: str
    keys: list[str]
    images: int = 0
    regions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""


def shard_name(index: int, fmt: str = "webdataset") -> str:
    """File name of shard `index`: shard-000000.tar (or .tfrecord)."""
    return f"shard-{index:06d}{FORMATS[fmt]}"


def state_path(state_dir: str | Path, split: str, index: int) -> Path:
    """Where the result of a completed shard is kept (for resume and the manifest)."""
    return Path(state_dir) / f"{split}-{index:06d}.json"


def write_shard(task: ShardTask) -> ShardResult:
    """Encode every record of `task` and write the shard atomically. Bad images are counted skips."""
    name = shard_name(task.index, task.fmt)
    result = ShardResult(task.split, task.index, name, [r["key"] for r in task.records], fingerprint=task.fingerprint)
    final = Path(task.out_dir) / name
    tmp = Path(task.out_dir) / f".{name}.tmp"  # fixed name: a rerun overwrites a stale partial file
    _write_samples(tmp, _encoded_samples(task, result), task.fmt)
    atomic_write_text(state_path(task.state_dir, task.split, task.index), json.dumps(result_to_json(result)))
    os.replace(tmp, final)
    return result


def _encoded_samples(task: ShardTask, result: ShardResult):
    """Yield (key, jpeg bytes, json bytes) for each usable record; record skips and notes in `result`."""
    for record in task.records:
        key = record["key"]
        try:
            sample = encode_record(record, task.max_side, task.jpeg_quality, task.max_pixels)
        except BadImageError as exc:
            result.skipped.append((_item(record), f"image_{exc.reason}"))
            continue
        except Exception as exc:  # noqa: BLE001 - one odd file must never kill the worker
            result.skipped.append((_item(record), f"image_error_{type(exc).__name__}"))
            continue
        jpeg, meta, notes = sample
        if not meta["regions"]:
            result.skipped.append((_item(record), "no_regions_after_resize"))
            continue
        result.notes.extend((_item(record), n) for n in notes)
        result.images += 1
        result.regions += len(meta["regions"])
        yield key, jpeg, json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_record(record: dict, max_side: int, quality: int, max_pixels: int) -> tuple[bytes, dict, list[str]]:
    """Open, resize (longer side <= max_side) and JPEG-encode one record; rescale its boxes."""
    declared = (record["width"], record["height"]) if record.get("width") else None
    img = open_image_checked(record["path"], expected_size=declared, max_pixels=max_pixels,
                             draft_size=(max_side, max_side))
    notes = list(img.info.get("vgclip_notes", []))
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        new_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    width, height = img.size
    # Boxes are in the metadata's coordinate frame; map that frame onto the pixels we store.
    ref_w, ref_h = declared if declared else (width, height)
    sx, sy = width / ref_w, height / ref_h
    regions = []
    for phrase, *box in record["regions"]:
        if not box:
            regions.append({"phrase": phrase, "box": None})
            continue
        x0, y0 = min(box[0] * sx, width), min(box[1] * sy, height)
        x1, y1 = min((box[0] + box[2]) * sx, width), min((box[1] + box[3]) * sy, height)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            continue
        regions.append({"phrase": phrase, "box": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    meta = {"image_id": record["image_id"], "source": record["source"], "width": width, "height": height,
            "regions": regions}
    return buf.getvalue(), meta, notes


def _write_samples(path: Path, samples, fmt: str) -> None:
    """Stream samples into `path` in the chosen container format and flush it to disk."""
    if fmt == "webdataset":
        # Plain tarfile rather than webdataset.TarWriter: importing webdataset pulls in torch,
        # which costs seconds in every worker process. The layout is the same: <key>.<ext> members.
        with open(path, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, jpeg, meta in samples:
                    # mtime 0: the same input gives byte-identical shards (resume compares nothing else)
                    packed = gzip.compress(meta, compresslevel=6, mtime=0)
                    for ext, data in zip(SAMPLE_MEMBERS, (jpeg, packed)):
                        _add_member(tar, f"{key}.{ext}", data)
            fh.flush()
            os.fsync(fh.fileno())
    elif fmt == "tfrecord":
        writer = tfrecord_writer_class()(str(path))
        for key, jpeg, meta in samples:
            writer.write({"key": (key.encode("utf-8"), "byte"), "jpg": (jpeg, "byte"), "json": (meta, "byte")})
        writer.close()
    else:
        raise VgclipError(f"unknown shard format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one file; mtime and owner fixed so the same input gives byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "vgclip"
    tar.addfile(info, io.BytesIO(data))


def tfrecord_writer_class():
    """tfrecord.TFRecordWriter, or VgclipError saying what to install."""
    try:  # tfrecord is the optional `tfrecord` extra
        from tfrecord import TFRecordWriter
    except ImportError:
        raise VgclipError(
            "--format tfrecord needs the 'tfrecord' package: pip install 'tfrecord>=1.14' "
            "(or pip install 'vgclip[tfrecord]')"
        ) from None
    return TFRecordWriter


def result_to_json(result: ShardResult) -> dict:
    """A ShardResult as a JSON-ready dict."""
    return {
        "split": result.split, "index": result.index, "name": result.name, "keys": result.keys,
        "images": result.images, "regions": result.regions, "fingerprint": result.fingerprint,
        "skipped": [list(p) for p in result.skipped], "notes": [list(p) for p in result.notes],
    }


def result_from_json(data: dict) -> ShardResult:
    """Inverse of result_to_json."""
    return ShardResult(
        split=data["split"], index=data["index"], name=data["name"], keys=list(data["keys"]),
        images=data["images"], regions=data["regions"], fingerprint=data.get("fingerprint", ""),
        skipped=[tuple(p) for p in data["skipped"]], notes=[tuple(p) for p in data["notes"]],
    )


def _item(record: dict) -> str:
    return f"{record['source']}:{record['image_id']}"
