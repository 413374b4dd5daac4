"""Re-tagging a finished `vgclip predict --out OUT` for a new label set without the images: the stored float16
embeddings (OUT/embeddings/) are scored against the new labels' text embeddings, part by part.

The job's own scores were computed from the same float16 embeddings, so a re-tag gives the scores that
encoding the images again would (to float rounding). The labels are scored as the embeddings were made:
with the crops recorded in OUT/summary.json; a thresholds file tuned on other crops is refused.
Output: OUT/retag-<hash of labels and scoring>/ (or --out NEWDIR): predictions.parquet (or .csv) with the
columns of the job's own, and summary.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vgclip.errors import VgclipError
from vgclip.eval.tagging import LabelScorer, PredictSettings, label_scorer, predict_settings
from vgclip.io import atomic_write_text
from vgclip.load import load_checkpoint
from vgclip.tagging.resume import weights_sha256
from vgclip.tagging.summary_file import SUMMARY_FILE, StoredRun, read_summary, threshold_facts
from vgclip.tagging.writer import PREDICTIONS, PartResult, predictions_table, write_predictions

__all__ = ["RetagResult", "RetagSettings", "iter_stored", "retag_folder", "run_retag"]


@dataclass(frozen=True)
class RetagSettings:
    """A re-tag: the finished job's folder, the new labels and how to score them, where to write."""

    embeddings: Path
    labels: tuple[str, ...]
    thresholds_file: Path | None = None
    threshold: float | None = None
    score: str | None = None
    templates: str | None = None
    checkpoint: Path | None = None
    out: Path | None = None
    fmt: str = "parquet"
    device: str | None = None
    crops: str | None = None  # --crops: must name the stored embeddings' crops when given


@dataclass(frozen=True)
class RetagResult:
    """Where the new predictions went, how many rows, how long scoring took, and the scoring settings used."""

    out: Path
    rows: int
    seconds: float
    predict: PredictSettings


def retag_folder(embeddings: Path, labels: tuple[str, ...], predict: PredictSettings, checkpoint: str) -> Path:
    """OUT/retag-<10 hex digits of sha256 over labels, scoring and checkpoint>."""
    key = json.dumps([list(labels), predict.score, predict.templates, predict.crops, predict.thresholds,
                      predict.texts, checkpoint], sort_keys=True)  # fmt: skip
    return Path(embeddings) / f"retag-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def iter_stored(folder: Path) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """(float16 embeddings [n, D], metadata table) of every stored part, in part order."""
    emb_dir, meta_dir = Path(folder) / "embeddings" / "img_emb", Path(folder) / "embeddings" / "metadata"
    files = sorted(emb_dir.glob("img_emb_*.npy"))
    for emb_file in files:
        meta_file = meta_dir / emb_file.name.replace("img_emb_", "metadata_").replace(".npy", ".parquet")
        if not meta_file.is_file():
            raise VgclipError(f"{emb_file}: no {meta_file.name} beside it in {meta_dir}")
        emb = np.load(emb_file)
        meta = pq.read_table(meta_file)
        if len(emb) != meta.num_rows:
            raise VgclipError(f"{emb_file}: {len(emb)} embeddings but {meta.num_rows} metadata rows")
        yield emb, meta


def _checkpoint(settings: RetagSettings, stored: StoredRun) -> str:
    """The checkpoint whose text tower scores the labels: --checkpoint, else the one summary.json names;
    its weights must be the ones the embeddings were made with."""
    checkpoint = str(settings.checkpoint or stored.checkpoint)
    if not Path(checkpoint).exists():
        raise VgclipError(f"checkpoint {checkpoint} (from {settings.embeddings / SUMMARY_FILE}) does not exist: "
                          "give --checkpoint RUN")
    found = weights_sha256(checkpoint)
    if stored.weights_sha256 and found and found != stored.weights_sha256:
        raise VgclipError(f"--checkpoint {checkpoint} has other weights than the model the embeddings in "
                          f"{settings.embeddings} were made with (sha256 {found[:12]} != {stored.weights_sha256[:12]})")
    return checkpoint


def _settings(settings: RetagSettings, stored: StoredRun, checkpoint: str) -> PredictSettings:
    """Scoring settings for the labels, with the crops of the stored embeddings."""
    predict = predict_settings(checkpoint, settings.labels, thresholds_file=settings.thresholds_file,
                               threshold=settings.threshold, score=settings.score, templates=settings.templates)
    if settings.crops is not None and settings.crops != stored.crops:
        raise VgclipError(f"--crops {settings.crops}: the embeddings in {settings.embeddings} were made with "
                          f"crops={stored.crops} (re-tagging scores them as they are)")
    if settings.thresholds_file is not None and predict.crops != stored.crops:
        raise VgclipError(f"{settings.thresholds_file} was tuned with crops={predict.crops}; the embeddings in "
                          f"{settings.embeddings} were made with crops={stored.crops}")
    return replace(predict, crops=stored.crops)


def _tables(folder: Path, scorer: LabelScorer, labels: tuple[str, ...]) -> Iterator[pa.Table]:
    for emb, meta in iter_stored(folder):
        scores = scorer.scores(torch.from_numpy(emb.astype(np.float32)))
        columns = meta.to_pydict()
        part = PartResult(0, columns["key"], columns.get("path") or [None] * len(emb),
                          columns.get("shard") or [None] * len(emb), columns["width"], columns["height"],
                          emb, scores.astype(np.float32), [scorer.chosen(row) for row in scores])
        yield predictions_table(part, labels)


def run_retag(settings: RetagSettings) -> RetagResult:
    """Score the stored embeddings of `settings.embeddings` for the new labels; write predictions + summary."""
    stored = read_summary(settings.embeddings)
    checkpoint = _checkpoint(settings, stored)
    predict = _settings(settings, stored, checkpoint)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _, tokenizer = load_checkpoint(checkpoint)
    model = model.to(device).eval()
    sample = torch.zeros(1, 3, stored.image_size, stored.image_size, device=device)
    scorer = label_scorer(model, tokenizer, settings.labels, predict, device, sample)
    out = settings.out or retag_folder(settings.embeddings, settings.labels, predict, checkpoint)
    start = time.perf_counter()
    rows = write_predictions(out / f"{PREDICTIONS}.{settings.fmt}", _tables(settings.embeddings, scorer,
                             settings.labels), settings.labels, settings.fmt)  # fmt: skip
    seconds = time.perf_counter() - start
    summary = {
        "retag_of": str(Path(settings.embeddings).resolve()), "checkpoint": str(Path(checkpoint).resolve()),
        "weights_sha256": stored.weights_sha256, "labels": list(settings.labels), "score": predict.score,
        "templates": predict.templates, "class_texts": predict.texts, "crops": predict.crops,
        "image_size": stored.image_size, "thresholds": threshold_facts(settings.labels, predict),
        "counts": {"scored": rows}, "seconds": round(seconds, 3),
        "outputs": {"predictions": f"{PREDICTIONS}.{settings.fmt}"},
    }  # fmt: skip
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return RetagResult(out, rows, seconds, predict)
