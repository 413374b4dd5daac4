"""Decision thresholds: tuned on one split, saved to JSON, applied to another split or by `vgclip predict`.

A prediction is positive when `score >= threshold`. Candidate thresholds are the midpoints between
consecutive distinct tuning scores, so the chosen value splits the tuning set exactly as evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vgclip.errors import VgclipError
from vgclip.eval.metrics import rates
from vgclip.io import atomic_write_text

MODES = ("global", "per_class")
OBJECTIVES = ("accuracy", "youden", "f1", "sensitivity", "specificity")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Objective:
    """What to maximise: accuracy, Youden's J (balanced accuracy), F1, or a target sensitivity/specificity."""

    name: str
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> Objective:
        """"accuracy", "youden" (or "balanced_accuracy"), "f1", "sensitivity:0.9", "specificity:0.95"."""
        name, _, target = text.partition(":")
        name = {"balanced_accuracy": "youden", "balanced": "youden", "j": "youden"}.get(name.strip(), name.strip())
        if name not in OBJECTIVES:
            raise VgclipError(f"threshold objective {text!r}: use one of accuracy, youden, f1, sensitivity:T, specificity:T")
        if name in ("sensitivity", "specificity"):
            try:
                value = float(target)
            except ValueError:
                raise VgclipError(f"threshold objective {text!r} needs a target in [0, 1], e.g. {name}:0.9") from None
            if not 0.0 <= value <= 1.0:
                raise VgclipError(f"threshold objective {text!r}: target must lie in [0, 1]")
            return cls(name, value)
        if target:
            raise VgclipError(f"threshold objective {text!r} takes no target")
        return cls(name)

    def __str__(self) -> str:
        return self.name if self.target is None else f"{self.name}:{self.target:g}"


def candidate_curve(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate thresholds (descending) with TP/FP/TN/FN of `score >= t` at each, for 1-D scores and 0/1 labels."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.sort(scores[labels.astype(bool)])
    neg = np.sort(scores[~labels.astype(bool)])
    uniq = np.unique(scores)[::-1]  # descending distinct values
    mids = (uniq[:-1] + uniq[1:]) / 2
    mids = np.where(mids > uniq[1:], mids, uniq[:-1])  # adjacent floats: fall back to the upper value itself
    cuts = np.concatenate([[np.nextafter(uniq[0], np.inf)], mids, [uniq[-1]]])
    # Positive set of cut k is {score >= uniq[k-1]}; counting against `cuts` gives the same sets.
    tp = len(pos) - np.searchsorted(pos, cuts, side="left")
    fp = len(neg) - np.searchsorted(neg, cuts, side="left")
    return {"threshold": cuts, "tp": tp, "fp": fp, "tn": len(neg) - fp, "fn": len(pos) - tp}


def choose(curve: dict[str, np.ndarray], objective: Objective) -> tuple[float, dict[str, float]]:
    """The threshold on `curve` that is best for `objective`, and the tuning-set rates there."""
    r = rates(curve["tp"], curve["fp"], curve["tn"], curve["fn"])
    r = {k: np.nan_to_num(v, nan=-1.0) for k, v in r.items()}
    if objective.name in ("accuracy", "f1"):
        key = r[objective.name]
    elif objective.name == "youden":
        key = r["balanced_accuracy"]
    else:
        other = "specificity" if objective.name == "sensitivity" else "sensitivity"
        feasible = r[objective.name] >= objective.target - 1e-12
        # Best of the other rate among the cuts that meet the target; an infeasible cut ranks below all.
        key = np.where(feasible, r[other], -2.0)
    best = int(np.argmax(key))  # ties: the first (highest) threshold
    chosen = {k: float(v[best]) for k, v in r.items()}
    return float(curve["threshold"][best]), {k: (v if v >= 0 else None) for k, v in chosen.items()}


def tune_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    classes: Sequence[str],
    mode: str = "global",
    objective: Objective | str = "f1",
) -> dict[str, Any]:
    """Tune a global threshold (on all valid entries pooled) and, in per_class mode, one threshold per class.

    A class with no positive or no negative tuning entries cannot be tuned; it falls back to the global value.
    """
    if mode not in MODES:
        raise VgclipError(f"threshold mode must be one of {', '.join(MODES)}, got {mode!r}")
    objective = Objective.parse(objective) if isinstance(objective, str) else objective
    pooled_labels = labels[valid].astype(bool)
    if not pooled_labels.any() or pooled_labels.all():
        raise VgclipError("cannot tune thresholds: the tuning split needs both positive and negative labels")
    global_t, global_rates = choose(candidate_curve(scores[valid], pooled_labels), objective)
    per_class: dict[str, float] = {}
    tuning_rates: dict[str, dict[str, float | None]] = {}
    fallback: list[str] = []
    for c, name in enumerate(classes):
        y = labels[valid[:, c], c].astype(bool)
        if mode == "global":
            per_class[name] = global_t
        elif y.any() and not y.all():
            per_class[name], tuning_rates[name] = choose(candidate_curve(scores[valid[:, c], c], y), objective)
        else:
            per_class[name] = global_t
            fallback.append(name)
    return {
        "version": FORMAT_VERSION,
        "mode": mode,
        "objective": str(objective),
        "classes": list(classes),
        "global": global_t,
        "per_class": per_class,
        "tuning_rates": {"global (micro)": global_rates, **tuning_rates},
        "fallback_classes": fallback,
    }


def threshold_vector(info: dict[str, Any], classes: Sequence[str]) -> np.ndarray:
    """Per-class thresholds for `classes` from a tuned/loaded threshold dict (global mode: one value repeated)."""
    if info["mode"] == "global":
        return np.full(len(classes), float(info["global"]))
    missing = [c for c in classes if c not in info["per_class"]]
    if missing:
        # Quoted: names may hold spaces or commas.
        quoted, tuned = ", ".join(map(repr, missing)), ", ".join(map(repr, info["per_class"]))
        raise VgclipError(f"thresholds have no value for {quoted} (tuned classes: {tuned})")
    return np.array([float(info["per_class"][c]) for c in classes])


@dataclass(frozen=True)
class LabelThresholds:
    """A thresholds file applied to a label list: per label its threshold and the file's class it names
    (None: the file does not cover it), the class text that class was scored with, and the labels that
    took the file's global threshold because the file has no value of their own (per_class files only)."""

    labels: list[str]
    values: list[float]
    classes: list[str | None]
    texts: dict[str, str]
    fallback: list[str]

    def same_label_set(self, info: dict[str, Any]) -> bool:
        """Whether the labels are exactly the classes the file was tuned on (each once)."""
        return None not in self.classes and sorted(map(str, self.classes)) == sorted(_classes_of(info))


def _classes_of(info: dict[str, Any]) -> list[str]:
    return list(info.get("classes") or info["per_class"])


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def match_class(info: dict[str, Any], label: str) -> str | None:
    """The file's class that `label` names: a class name, else a class name or recorded class text equal to it
    with case and spacing ignored ("dining table" names `diningtable` when that is its text); None if none."""
    classes = _classes_of(info)
    if label in classes:
        return label
    texts, wanted = info.get("class_texts") or {}, _key(label)
    by_name = [c for c in classes if _key(c) == wanted]
    by_text = [c for c in classes if isinstance(texts.get(c), str) and _key(texts[c]) == wanted]
    return (by_name or by_text or [None])[0]


def label_thresholds(info: dict[str, Any], labels: Sequence[str], source: str = "the thresholds file") -> LabelThresholds:
    """Thresholds for `labels` from a loaded file: a label matched to a class (`match_class`) gets that class's
    value; any other label gets the file's global threshold, or an error when the file has none."""
    classes = [match_class(info, lab) for lab in labels]
    per_class = info["per_class"] if info["mode"] == "per_class" else {}
    fallback = [lab for lab, c in zip(labels, classes) if info["mode"] == "per_class" and c not in per_class]
    glob = info.get("global")
    if fallback and not isinstance(glob, (int, float)):
        quoted, tuned = ", ".join(map(repr, fallback)), ", ".join(map(repr, per_class))
        raise VgclipError(f"thresholds have no value for {quoted} (tuned classes: {tuned}) and {source} has no "
                          "global threshold for them: use --threshold T for one threshold for every label")  # fmt: skip
    values = [float(per_class[c]) if c in per_class else float(glob) for c in classes]
    recorded = info.get("class_texts") or {}
    texts = {lab: recorded[c] for lab, c in zip(labels, classes) if isinstance(recorded.get(c), str)}
    return LabelThresholds(list(labels), values, classes, texts, fallback)


def save_thresholds(info: dict[str, Any], path: str | Path) -> None:
    """Write thresholds JSON atomically."""
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def load_thresholds(path: str | Path) -> dict[str, Any]:
    """Read and check a thresholds JSON written by `vgclip zeroshot`."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VgclipError(f"{path}: cannot read thresholds ({exc})") from None
    ok = (
        isinstance(info, dict)
        and info.get("mode") in MODES
        and (isinstance(info.get("global"), (int, float)) or (info["mode"] == "per_class" and info.get("global") is None))
        and isinstance(info.get("per_class"), dict)
        and all(isinstance(v, (int, float)) for v in info["per_class"].values())
    )
    if not ok:
        raise VgclipError(f"{path}: not a vgclip thresholds file (needs mode, global, per_class; only a per_class "
                          "file may leave global out)")  # fmt: skip
    return info
