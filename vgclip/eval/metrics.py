"""Multi-label metrics: ranking (AP, 11-point AP, ROC AUC, chance) and thresholded (accuracy ... F1).

All functions take `scores` [N, C], `labels` [N, C] in {0, 1} and `valid` [N, C] (False = left out of
that class's metrics, e.g. a "difficult"-only object under the official VOC protocol).
A metric that is undefined (no positives, 0/0) is None, never a silent 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

RATE_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "balanced_accuracy")


def voc07_ap(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """VOC2007 11-point interpolated AP: mean over recall r in {0, .1, ..., 1} of max precision at recall >= r."""
    if labels.sum() == 0:
        return None
    precision, recall, _ = precision_recall_curve(labels, scores)
    # sklearn appends (recall 0, precision 1), which is not a real cut-off; the VOC devkit has no such point.
    precision, recall = precision[:-1], recall[:-1]
    points = []
    for r in np.linspace(0.0, 1.0, 11):
        reached = precision[recall >= r - 1e-12]
        points.append(float(reached.max()) if reached.size else 0.0)
    return float(np.mean(points))


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def ranking_metrics(
    scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Per-class AP (sklearn: area under the PR curve), 11-point AP, ROC AUC and chance, with their means.

    Chance is the class prevalence (the AP of a random ranking); classes without positives are left out
    of every mean and listed under `undefined_classes`.
    """
    ap, ap11, auc, chance, counts = {}, {}, {}, {}, {}
    for c, name in enumerate(classes):
        keep = valid[:, c]
        y, s = labels[keep, c].astype(int), scores[keep, c]
        pos = int(y.sum())
        counts[name] = {"positives": pos, "negatives": int(len(y) - pos), "ignored": int((~keep).sum())}
        chance[name] = pos / len(y) if len(y) and pos else None
        ap[name] = float(average_precision_score(y, s)) if pos else None
        ap11[name] = voc07_ap(s, y) if pos else None
        auc[name] = float(roc_auc_score(y, s)) if 0 < pos < len(y) else None
    return {
        "mAP": _mean(list(ap.values())),
        "AP": ap,
        "mAP_voc07_11pt": _mean(list(ap11.values())),
        "AP_voc07_11pt": ap11,
        "mean_roc_auc": _mean(list(auc.values())),
        "roc_auc": auc,
        "chance_mean": _mean(list(chance.values())),
        "chance": chance,
        "counts": counts,
        "undefined_classes": [n for n in classes if ap[n] is None],
    }


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def rates(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity (recall), specificity, precision, F1 and balanced accuracy from counts (NaN = 0/0)."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    sens = _safe_div(tp, tp + fn)
    spec = _safe_div(tn, tn + fp)
    return {
        "accuracy": _safe_div(tp + tn, tp + fp + tn + fn),
        "sensitivity": sens,
        "specificity": spec,
        "precision": _safe_div(tp, tp + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,
    }


def confusion(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """TP/FP/TN/FN per class [C] for predictions `score >= threshold` (threshold scalar or one per class)."""
    pred = scores >= np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (scores.shape[1],))[None, :]
    pos = labels.astype(bool)
    return {
        "tp": (pred & pos & valid).sum(0),
        "fp": (pred & ~pos & valid).sum(0),
        "tn": (~pred & ~pos & valid).sum(0),
        "fn": (~pred & pos & valid).sum(0),
    }


def exact_match(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, thresholds: np.ndarray) -> float:
    """Fraction of images whose predicted label set equals the true set (ignored entries not compared)."""
    pred = scores >= np.asarray(thresholds, dtype=np.float64)[None, ...]
    correct = (pred == labels.astype(bool)) | ~valid
    return float(correct.all(axis=1).mean())


def _clean(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def threshold_metrics(
    scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, classes: Sequence[str], thresholds: float | np.ndarray
) -> dict[str, Any]:
    """Every rate per class, macro (mean of per-class rates) and micro (rates of summed counts), plus exact match."""
    counts = confusion(scores, labels, valid, thresholds)
    per_class_rates = rates(**counts)
    micro = rates(*(counts[k].sum() for k in ("tp", "fp", "tn", "fn")))
    per_class = {
        name: {**{k: _clean(v[c]) for k, v in per_class_rates.items()}, **{k: int(counts[k][c]) for k in counts}}
        for c, name in enumerate(classes)
    }
    macro = {k: _mean([_clean(x) for x in v]) for k, v in per_class_rates.items()}
    thr = np.asarray(thresholds, dtype=np.float64)
    return {
        "threshold": float(thr) if thr.ndim == 0 else {n: float(t) for n, t in zip(classes, thr)},
        "macro": macro,
        "micro": {k: _clean(v) for k, v in micro.items()},
        "per_class": per_class,
        "exact_match": exact_match(scores, labels, valid, np.broadcast_to(thr, (scores.shape[1],))),
    }


def sweep(
    scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, thresholds: Sequence[float]
) -> dict[str, np.ndarray]:
    """Micro and macro accuracy/sensitivity/specificity/F1 at many global thresholds (for the curve plot)."""
    out: dict[str, list[float]] = {f"{avg}_{k}": [] for avg in ("micro", "macro") for k in RATE_NAMES}
    for t in thresholds:
        counts = confusion(scores, labels, valid, np.float64(t))
        micro = rates(*(counts[k].sum() for k in ("tp", "fp", "tn", "fn")))
        per = rates(**counts)
        for k in RATE_NAMES:
            out[f"micro_{k}"].append(float(micro[k]))
            out[f"macro_{k}"].append(float(np.nanmean(per[k])) if np.isfinite(per[k]).any() else np.nan)
    return {"threshold": np.asarray(thresholds, dtype=np.float64), **{k: np.asarray(v) for k, v in out.items()}}
