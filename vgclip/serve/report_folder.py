"""The threshold page's data: a `vgclip zeroshot` report folder (report.json, scores.csv, thresholds.json),
the evaluated images by id, tuning on the shown split, and saving a thresholds file `vgclip predict` reads."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vgclip.data.images import open_image_checked
from vgclip.data.voc import IMAGE_SUFFIXES, find_voc_root
from vgclip.errors import VgclipError
from vgclip.eval.metrics import sweep
from vgclip.eval.records import ReportSettings, ZeroshotReport
from vgclip.eval.thresholds import FORMAT_VERSION, MODES, load_thresholds, save_thresholds, tune_thresholds

__all__ = ["ReportData", "curve", "index_images", "load_report", "page_data", "page_json", "read_report_json",
           "read_scores_csv", "save", "thresholds_to_save", "thumbnail_jpeg", "tune_on_report"]

THUMBNAIL_SIDE = 256
CURVE_POINTS = 201


@dataclass
class ReportData:
    """A zero-shot report as the page shows it: scores [N, C], labels [N, C], valid [N, C] of the evaluated split."""

    folder: Path
    report: ZeroshotReport
    image_ids: list[str]
    classes: list[str]
    scores: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    tuned: dict[str, Any] | None
    save_path: Path
    images: dict[str, Path] = field(default_factory=dict)
    gallery_note: str = ""
    page_bytes: bytes | None = field(default=None, repr=False)

    @property
    def settings(self) -> ReportSettings:
        return self.report.settings


def read_scores_csv(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, classes, scores, labels, valid) from a report's scores.csv (an empty label = ignored)."""
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError) as exc:
        raise VgclipError(f"{path}: cannot read ({exc})") from None
    if not rows or not rows[0] or rows[0][0] != "image_id" or len(rows) < 2:
        raise VgclipError(f"{path}: not a vgclip scores.csv (needs an image_id header and at least one row)")
    head = rows[0]
    classes = [h[len("score_") :] for h in head if h.startswith("score_")]
    if head[1:] != [f"score_{c}" for c in classes] + [f"label_{c}" for c in classes]:
        raise VgclipError(f"{path}: columns must be image_id, score_<class>..., label_<class>...")
    c = len(classes)
    try:
        body = rows[1:]
        ids = [r[0] for r in body]
        scores = np.array([[float(x) for x in r[1 : 1 + c]] for r in body], dtype=np.float64)
        raw = [r[1 + c : 1 + 2 * c] for r in body]
        valid = np.array([[x != "" for x in r] for r in raw], dtype=bool)
        labels = np.array([[int(x) if x else 0 for x in r] for r in raw], dtype=np.int64)
    except (ValueError, IndexError) as exc:
        raise VgclipError(f"{path}: bad row ({exc})") from None
    if scores.shape != (len(ids), c) or labels.shape != scores.shape:
        raise VgclipError(f"{path}: every row needs {2 * c + 1} fields")
    if not np.isfinite(scores).all():
        row = int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
        raise VgclipError(f"{path}: image {ids[row]!r} has a score that is not a finite number")
    return ids, classes, scores, labels, valid


def read_report_json(path: Path) -> ZeroshotReport:
    """report.json parsed once into the record; a file that is no zero-shot report is a one-line error."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VgclipError(f"{path}: cannot read a zero-shot report ({exc})") from None
    if not isinstance(raw, dict) or "settings" not in raw:
        raise VgclipError(f"{path}: not a vgclip zero-shot report (no settings)")
    try:
        return ZeroshotReport.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise VgclipError(f"{path}: not a vgclip zero-shot report ({exc})") from None


def load_report(folder: str | Path, *, save_path: str | Path | None = None,
                voc_root: str | Path | None = None) -> ReportData:  # fmt: skip
    """Read a `vgclip zeroshot` output folder; the gallery maps its image ids to files in the VOC JPEGImages folder."""
    folder = Path(folder)
    report = read_report_json(folder / "report.json")
    ids, classes, scores, labels, valid = read_scores_csv(folder / "scores.csv")
    tuned = load_thresholds(folder / "thresholds.json") if (folder / "thresholds.json").is_file() else None
    target = Path(save_path) if save_path else folder / "saved" / "thresholds.json"
    data = ReportData(folder, report, ids, classes, scores, labels, valid, tuned, target)
    data.images, data.gallery_note = index_images(ids, voc_root or report.settings.voc_root)
    return data


def index_images(ids: Sequence[str], voc_root: str | Path | None) -> tuple[dict[str, Path], str]:
    """Image id -> file in the VOC folder's JPEGImages, for the ids of the report only (nothing else is served)."""
    if not voc_root:
        return {}, "the report names no VOC folder (start with --voc-root)"
    try:
        folder = (find_voc_root(voc_root) / "JPEGImages").resolve()
    except VgclipError as exc:
        return {}, f"gallery unavailable: {exc} (start with --voc-root)"
    on_disk = {p.name: p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    found = {}
    for image_id in ids:
        path = next((on_disk[image_id + s] for s in IMAGE_SUFFIXES if image_id + s in on_disk), None)
        if path is not None:
            found[image_id] = path
    note = "" if found else f"gallery unavailable: no image of the report found in {folder}"
    return found, note


def thumbnail_jpeg(path: Path, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG no larger than `side` on its longer edge (safe opening: pixel limit, allowed formats)."""
    img = open_image_checked(path, draft_size=(side, side))
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def curve(data: ReportData) -> dict[str, list[float | None]]:
    """Micro and macro rates against a global threshold over the range of the report's scores."""
    lo, hi = float(data.scores.min()), float(data.scores.max())
    if data.settings.score in ("softmax", "sigmoid"):
        lo, hi = 0.0, max(hi, 1e-6)
    out = sweep(data.scores, data.labels, data.valid, np.linspace(lo, hi, CURVE_POINTS))
    return {k: [None if not np.isfinite(x) else round(float(x), 6) for x in v] for k, v in out.items()}


def page_data(data: ReportData) -> dict[str, Any]:
    """Everything the threshold page needs in one JSON document."""
    s = data.settings
    return {
        "available": True,
        "folder": str(data.folder),
        "split": s.split,
        "score": s.score,
        "templates": s.templates,
        "classes": data.classes,
        "class_texts": s.class_texts or {c: c for c in data.classes},
        "image_ids": data.image_ids,
        "scores": np.round(data.scores, 7).tolist(),
        "labels": np.where(data.valid, data.labels, -1).tolist(),  # -1: ignored (difficult only)
        "mAP": data.report.mAP,
        "chance_mean": data.report.chance_mean,
        "AP": data.report.AP or None,  # null for a report without per-class APs, as before
        "tuned": data.tuned,
        "curve": curve(data),
        "save_path": str(data.save_path),
        "gallery": sorted(data.images),
        "gallery_note": data.gallery_note,
    }


def page_json(data: ReportData) -> bytes:
    """`page_data` as compact JSON bytes, built on the first call and kept: the report does not change while
    the server runs, and FastAPI's generic encoder walks the N x C score lists on every request."""
    if data.page_bytes is None:
        data.page_bytes = json.dumps(_json_safe(page_data(data)), separators=(",", ":"), ensure_ascii=False,
                                     allow_nan=False).encode("utf-8")
    return data.page_bytes


def _json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity as None (null: JSON has no such numbers; a report.json may hold them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def tune_on_report(data: ReportData, objective: str, mode: str) -> dict[str, Any]:
    """Thresholds tuned on the report's own (evaluation) split, in the thresholds.json format."""
    info = tune_thresholds(data.scores, data.labels, data.valid, data.classes, mode, objective)
    return _with_provenance(data, info)


def _with_provenance(data: ReportData, info: dict[str, Any]) -> dict[str, Any]:
    s = data.settings
    info.update(score=s.score, templates=s.templates, crops=s.crops,
                class_texts=s.class_texts or {c: c for c in data.classes},
                tuned_on={"split": s.split, "images": len(data.image_ids), "skipped_images": 0,
                          "is_eval_split": True, "chosen_in": "vgclip serve"})  # fmt: skip
    return info


def thresholds_to_save(data: ReportData, mode: str, global_t: float, per_class: dict[str, float],
                       objective: str) -> dict[str, Any]:  # fmt: skip
    """A thresholds.json document (the format `vgclip predict --thresholds` reads) for the page's current choice."""
    if mode not in MODES:
        raise VgclipError(f"threshold mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not np.isfinite(global_t):
        raise VgclipError("the global threshold must be a finite number")
    missing = [c for c in data.classes if c not in per_class]
    if mode == "per_class" and missing:
        raise VgclipError(f"per-class thresholds miss {', '.join(missing)}")
    values = {c: float(per_class[c]) if mode == "per_class" else float(global_t) for c in data.classes}
    if not all(np.isfinite(v) for v in values.values()):
        raise VgclipError("every per-class threshold must be a finite number")
    info = {"version": FORMAT_VERSION, "mode": mode, "objective": objective or "manual", "classes": data.classes,
            "global": float(global_t), "per_class": values, "tuning_rates": {}, "fallback_classes": []}  # fmt: skip
    return _with_provenance(data, info)


def save(data: ReportData, info: dict[str, Any]) -> Path:
    """Write the thresholds atomically to the path fixed at start (never a client-chosen path)."""
    save_thresholds(info, data.save_path)
    return data.save_path
