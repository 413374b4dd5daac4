"""The zero-shot report as a typed record: built by the evaluation (zeroshot.py), written by report.py and
plots.py, read back from report.json by the threshold page (serve/report_folder.py) and model cards (export/).

JSON only at the edges: `ZeroshotReport.to_json()` is report.json, byte for byte in the key order readers
and tests rely on; `from_dict()` parses a report.json once (an older or partial file gets the defaults).
Per-class and per-threshold metric tables stay JSON-shaped dicts keyed by class name (metrics.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["DataNotes", "ReportSettings", "Tuning", "ZeroshotReport"]

Metrics = dict[str, Any]  # a metrics.threshold_metrics table: threshold, macro, micro, per_class, exact_match
_R = TypeVar("_R")


def _known(cls: type[_R], raw: Any, what: str) -> _R:
    """`cls` from a JSON object, keeping the keys it knows (an older report lacks some: defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"report {what} is not a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class ReportSettings:
    """How the report was made (report.json `settings`)."""

    checkpoint: str | None = None
    voc_root: str | None = None
    split: str | None = None
    score: str | None = None
    templates: str | None = None
    template_texts: list[str] = field(default_factory=list)
    crops: str = "centre"  # reports from before eval.crops were centre crops
    difficult: str | None = None
    difficult_note: str | None = None
    classes: list[str] = field(default_factory=list)
    class_texts: dict[str, str] = field(default_factory=dict)
    label_source: str | None = None


@dataclass(frozen=True)
class DataNotes:
    """What was evaluated and what was left out (report.json `data`)."""

    evaluated_images: int | None = None
    skipped_images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    unreadable_images: int = 0
    unknown_class_objects: dict[str, int] = field(default_factory=dict)
    ignored_entries: int = 0
    notices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Tuning:
    """Threshold tuning (report.json `tuning`): the thresholds.json document and its rates on both splits."""

    note: str = ""
    on_eval_split: bool = False
    tuned: bool = False
    thresholds: dict[str, Any] | None = None  # the thresholds.json document (thresholds.tune_thresholds)
    tune_split: Metrics | None = None
    eval_split: Metrics | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; the tuned entries only when thresholds were tuned."""
        out: dict[str, Any] = {"note": self.note, "on_eval_split": self.on_eval_split, "tuned": self.tuned}
        if self.thresholds is not None:
            out.update(thresholds=self.thresholds, tune_split=self.tune_split, eval_split=self.eval_split)
        return out


@dataclass(frozen=True)
class ZeroshotReport:
    """A zero-shot evaluation: ranking metrics (metrics.ranking_metrics), settings, data notes, the fixed-threshold
    sweep, tuning, and the files written beside report.json (None until written)."""

    mAP: float | None = None
    AP: dict[str, float | None] = field(default_factory=dict)
    mAP_voc07_11pt: float | None = None
    AP_voc07_11pt: dict[str, float | None] = field(default_factory=dict)
    mean_roc_auc: float | None = None
    roc_auc: dict[str, float | None] = field(default_factory=dict)
    chance_mean: float | None = None
    chance: dict[str, float | None] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    undefined_classes: list[str] = field(default_factory=list)
    settings: ReportSettings = field(default_factory=ReportSettings)
    unused_classes: list[str] = field(default_factory=list)
    data: DataNotes = field(default_factory=DataNotes)
    sweep: list[Metrics] = field(default_factory=list)
    tuning: Tuning = field(default_factory=Tuning)
    files: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report.json object (key order as written since the first version)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "tuning":
                out["tuning"] = value.to_dict()
            elif f.name in ("settings", "data"):
                out[f.name] = dataclasses.asdict(value)
            elif f.name != "files" or value is not None:
                out[f.name] = value
        return out

    def to_json(self) -> str:
        """report.json's text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ZeroshotReport:
        """Parse a report.json object; ValueError when a section is not an object."""
        if not isinstance(raw, Mapping):
            raise ValueError("a zero-shot report is a JSON object")
        sections = {"settings": ReportSettings, "data": DataNotes, "tuning": Tuning}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: _known(sections[k], v, k) if k in sections else v for k, v in raw.items() if k in names}
        return cls(**kwargs)
