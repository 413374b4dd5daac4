"""OUT/summary.json of a tagging job: counts, rate, and everything that reproduces its scores (written by rank
0 at the end; read back by re-tagging, which needs the checkpoint and the crops the embeddings were made with)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgclip.errors import VgclipError
from vgclip.eval.tagging import PredictSettings
from vgclip.io import atomic_write_text
from vgclip.tagging.inputs import Inputs
from vgclip.tagging.resume import JobSettings

__all__ = ["SUMMARY_FILE", "RunFacts", "StoredRun", "read_summary", "threshold_facts", "write_summary"]

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class RunFacts:
    """What summary.json reports about a finished job."""

    job: JobSettings
    predict: PredictSettings
    inputs: Inputs
    scored: int
    skipped: Counter
    images_per_s: float
    seconds: float
    ranks: int
    workers: int
    resumed_parts: int
    fmt: str


@dataclass(frozen=True)
class StoredRun:
    """What re-tagging needs of a finished job's summary.json."""

    checkpoint: str
    weights_sha256: str
    crops: str
    image_size: int
    scored: int


def threshold_facts(labels: tuple[str, ...] | list[str], predict: PredictSettings) -> dict[str, Any]:
    """Per-label thresholds, the global one and where they came from."""
    per_label = None if predict.thresholds is None else dict(zip(labels, predict.thresholds))
    return {"per_label": per_label, "global": predict.global_threshold, "source": predict.threshold_source}


def _version() -> str:
    from vgclip import __version__  # the package top level: its version string only

    return __version__


def write_summary(out: Path, facts: RunFacts) -> Path:
    """Write OUT/summary.json atomically; its path."""
    job = facts.job
    data = {
        "vgclip_version": _version(),
        "checkpoint": job.checkpoint, "weights_sha256": job.weights_sha256,
        "labels": list(job.labels), "score": job.score, "templates": job.templates,
        "class_texts": job.class_texts, "crops": job.crops, "image_size": job.image_size,
        "thresholds": threshold_facts(job.labels, facts.predict),
        "counts": {"scored": facts.scored, "skipped": sum(facts.skipped.values()),
                   "skipped_by_reason": dict(sorted(facts.skipped.items()))},
        "this_run": {"images_per_s": round(facts.images_per_s, 2), "seconds": round(facts.seconds, 3),
                     "ranks": facts.ranks, "workers": facts.workers, "resumed_parts": facts.resumed_parts},
        "inputs": {"files_and_urls": facts.inputs.files, "shards": facts.inputs.shards,
                   "parts": len(facts.inputs.units), "fingerprint": job.inputs},
        "batch_size": job.batch_size, "part_size": job.part_size,
        "outputs": {"predictions": f"predictions.{facts.fmt}", "skipped": "skipped.csv",
                    "embeddings": "embeddings/img_emb", "metadata": "embeddings/metadata"},
    }  # fmt: skip
    path = out / SUMMARY_FILE
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def read_summary(folder: Path) -> StoredRun:
    """The stored run in `folder` (a finished `vgclip predict --out`); one-line VgclipError otherwise."""
    path = Path(folder) / SUMMARY_FILE
    if not path.is_file():
        raise VgclipError(f"--embeddings {folder}: no {SUMMARY_FILE} (a finished `vgclip predict --out` folder; "
                          "an interrupted one finishes when its command is run again)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return StoredRun(str(data["checkpoint"]), str(data.get("weights_sha256") or ""), str(data["crops"]),
                         int(data["image_size"]), int(data["counts"]["scored"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VgclipError(f"{path}: not a vgclip predict summary ({type(exc).__name__}: {exc})") from None
