"""Report figures (PNG, matplotlib's object API with the Agg canvas: no display, no global pyplot state)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from vgclip.eval.metrics import sweep
from vgclip.eval.records import ZeroshotReport
from vgclip.eval.scoring import ScoredSplit
from vgclip.io import atomic_path

__all__ = ["plot_ap_bars", "plot_pr_curves", "plot_roc_curves", "plot_threshold_curve", "write_plots"]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_threshold_curve(ev: ScoredSplit, report: ZeroshotReport, path: Path) -> None:
    """Accuracy, sensitivity and specificity (micro, all image-class pairs) against one global threshold."""
    lo, hi = float(ev.scores.min()), float(ev.scores.max())
    if report.settings.score in ("softmax", "sigmoid"):
        lo, hi = 0.0, 1.0
    grid = np.linspace(lo, hi, 201)
    curve = sweep(ev.scores, ev.data.labels, ev.valid, grid)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for key, style in (("accuracy", "-"), ("sensitivity", "--"), ("specificity", ":")):
        ax.plot(grid, curve[f"micro_{key}"], style, label=key)
    tuned = report.tuning.thresholds if report.tuning.tuned else None
    if tuned is not None and tuned["mode"] == "global":
        ax.axvline(tuned["global"], color="grey", lw=0.8, label="tuned threshold")
    ax.set_xlabel(f"threshold on {report.settings.score} score")
    ax.set_ylabel("rate (micro)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Accuracy / sensitivity / specificity vs threshold\nsplit: {report.settings.split}", fontsize=10)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _class_panels(ev: ScoredSplit) -> tuple[Figure, list[tuple[str, Any, np.ndarray, np.ndarray]]]:
    """A grid of axes, one per class, each with that class's (name, axes, labels, scores) over the
    images whose label counts for it (not "difficult only")."""
    n = len(ev.data.classes)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3 * cols, 2.8 * rows))
    panels = []
    for c, name in enumerate(ev.data.classes):
        keep = ev.valid[:, c]
        panels.append((name, fig.add_subplot(rows, cols, c + 1), ev.data.labels[keep, c], ev.ranking[keep, c]))
    return fig, panels


def plot_pr_curves(ev: ScoredSplit, report: ZeroshotReport, path: Path) -> None:
    """One precision-recall curve per class, with its AP and the chance level (prevalence)."""
    fig, panels = _class_panels(ev)
    for name, ax, y, scores in panels:
        if y.sum() > 0:
            precision, recall, _ = precision_recall_curve(y, scores)
            ax.step(recall, precision, where="post")
            ax.axhline(report.chance[name], color="grey", ls=":", lw=0.8)
        ax.set_title(_panel_title(name, f"AP={_fmt(report.AP[name])}"), fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    fig.suptitle("Precision-recall per class (dotted: chance)")
    _save(fig, path)


def plot_roc_curves(ev: ScoredSplit, report: ZeroshotReport, path: Path) -> None:
    """One ROC curve per class, with its AUC."""
    fig, panels = _class_panels(ev)
    for name, ax, y, scores in panels:
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, scores)
            ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
        ax.set_title(_panel_title(name, f"AUC={_fmt(report.roc_auc[name])}"), fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("ROC per class (sensitivity vs 1 - specificity)")
    _save(fig, path)


def plot_ap_bars(report: ZeroshotReport, path: Path) -> None:
    """AP per class as bars, chance (prevalence) as markers, mAP as a line."""
    classes = report.settings.classes
    ap = [report.AP[c] or 0.0 for c in classes]
    chance = [report.chance[c] or 0.0 for c in classes]
    x = np.arange(len(classes))
    fig = Figure(figsize=(max(6, 0.45 * len(classes) + 2), 4.5))
    ax = fig.add_subplot()
    ax.bar(x, ap, label="AP")
    ax.scatter(x, chance, color="black", marker="_", s=200, label="chance (prevalence)", zorder=3)
    if report.mAP is not None:
        ax.axhline(report.mAP, color="tab:red", lw=1, label=f"mAP {report.mAP:.3f}")
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("average precision")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def _panel_title(name: str, metric: str) -> str:
    """A panel's title; a long (multi-word) class name wraps rather than running into the next panel."""
    return textwrap.fill(f"{name} {metric}", width=32, break_long_words=True)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def write_plots(ev: ScoredSplit, report: ZeroshotReport, out_dir: Path) -> list[str]:
    """Write all figures into `out_dir`; return their file names."""
    plot_threshold_curve(ev, report, out_dir / "threshold_curve.png")
    plot_pr_curves(ev, report, out_dir / "pr_curves.png")
    plot_roc_curves(ev, report, out_dir / "roc_curves.png")
    plot_ap_bars(report, out_dir / "ap_per_class.png")
    return ["threshold_curve.png", "pr_curves.png", "roc_curves.png", "ap_per_class.png"]
