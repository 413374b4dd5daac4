"""Writing a zero-shot report: report.json, report.md, scores.csv, thresholds.json and plots (all atomic)."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

from vgclip.eval.plots import write_plots
from vgclip.eval.records import ZeroshotReport
from vgclip.eval.scoring import ScoredSplit
from vgclip.eval.thresholds import save_thresholds
from vgclip.io import atomic_write_text

__all__ = ["markdown_report", "scores_csv", "summary_table", "write_outputs"]

RATE_COLUMNS = ("accuracy", "sensitivity", "specificity", "precision", "f1")


def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    """A class name or text as a Markdown table cell (a "|" in a name would split the row)."""
    return text.replace("|", "\\|")


def scores_csv(ev: ScoredSplit) -> str:
    """One row per evaluated image: image_id, score_<class>..., label_<class>... (empty label = ignored)."""
    classes = ev.data.classes
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", *(f"score_{c}" for c in classes), *(f"label_{c}" for c in classes)])
    for i, image_id in enumerate(ev.data.image_ids):
        labels = ["" if ev.data.ignore[i, c] else int(ev.data.labels[i, c]) for c in range(len(classes))]
        writer.writerow([image_id, *(f"{s:.9g}" for s in ev.scores[i]), *labels])
    return buf.getvalue()


def write_outputs(report: ZeroshotReport, ev: ScoredSplit, out_dir: Path, plots: bool = True) -> ZeroshotReport:
    """Write every report file into `out_dir`; returns the report with the list of files (`files`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["report.json", "report.md", "scores.csv"]
    atomic_write_text(out_dir / "scores.csv", scores_csv(ev))
    if report.tuning.tuned and report.tuning.thresholds is not None:
        save_thresholds(report.tuning.thresholds, out_dir / "thresholds.json")
        files.append("thresholds.json")
    else:  # never leave an earlier run's thresholds beside this report for `predict` to pick up
        (out_dir / "thresholds.json").unlink(missing_ok=True)
    if plots:
        files += write_plots(ev, report, out_dir)
    report = dataclasses.replace(report, files=files)
    atomic_write_text(out_dir / "report.json", report.to_json())
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    return report


def summary_table(report: ZeroshotReport) -> str:
    """Plain-text table: micro accuracy/sensitivity/specificity at each sweep threshold (and the tuned one), mAP vs chance."""
    s, tuning = report.settings, report.tuning
    lines = [f"Zero-shot on {s.split} ({report.data.evaluated_images} images, score={s.score}, "
             f"templates={s.templates}, difficult={s.difficult})",
             f"{'threshold':>16}  {'accuracy':>8}  {'sensitivity':>11}  {'specificity':>11}  {'F1':>6}  (micro: all image-class pairs)"]  # fmt: skip
    rows = [(f"{m['threshold']:g}", m) for m in report.sweep]
    if tuning.tuned and tuning.thresholds is not None and tuning.eval_split is not None:
        rows.append((f"tuned ({tuning.thresholds['mode']})", tuning.eval_split))
    for label, m in rows:
        mi = m["micro"]
        lines.append(f"{label:>16}  {_f(mi['accuracy']):>8}  {_f(mi['sensitivity']):>11}  "
                     f"{_f(mi['specificity']):>11}  {_f(mi['f1']):>6}")  # fmt: skip
    if not tuning.tuned:
        lines.append(f"(tuned thresholds: none — {tuning.note})")
    lines.append(f"mAP {_f(report.mAP)} (VOC07 11-point {_f(report.mAP_voc07_11pt)}), "
                 f"chance {_f(report.chance_mean)}, mean ROC AUC {_f(report.mean_roc_auc)}")  # fmt: skip
    if report.unused_classes:
        lines.append(f"warning: no annotation uses class(es) {', '.join(report.unused_classes)} (typo?)")
    return "\n".join(lines)


def _rates_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = ["| threshold | averaging | " + " | ".join(RATE_COLUMNS) + " | exact match |",
           "|---|---|" + "---|" * (len(RATE_COLUMNS) + 1)]  # fmt: skip
    for label, m in rows:
        for avg in ("macro", "micro"):
            cells = " | ".join(_f(m[avg][k]) for k in RATE_COLUMNS)
            exact = _f(m["exact_match"]) if avg == "macro" else ""
            out.append(f"| {label} | {avg} | {cells} | {exact} |")
    return out


def markdown_report(report: ZeroshotReport) -> str:
    """A readable report: settings, mAP vs chance, per-class table, threshold sweep, tuned thresholds, data notes."""
    s, d = report.settings, report.data
    lines = [
        "# Zero-shot multi-label classification report", "",
        f"- checkpoint: `{s.checkpoint}`" if s.checkpoint else "- checkpoint: (in-memory model)",
        f"- data: `{s.voc_root}`, split **{s.split}**, labels from {s.label_source}",
        f"- images evaluated: {d.evaluated_images} (skipped: {d.skipped_images}, "
        f"of which unreadable images: {d.unreadable_images})",
        f"- score: **{s.score}**; templates: **{s.templates}** ({len(s.template_texts)} prompt(s))",
        f"- difficult objects: **{s.difficult}** — {s.difficult_note}", "",
        "## Ranking metrics", "",
        f"- **mAP (area under PR curve, sklearn): {_f(report.mAP)}** — chance (mean class prevalence): "
        f"{_f(report.chance_mean)}",
        f"- mAP, VOC2007 11-point interpolated: {_f(report.mAP_voc07_11pt)}",
        f"- mean ROC AUC: {_f(report.mean_roc_auc)} (chance 0.5)", "",
        "| class | text | AP | AP 11-pt | ROC AUC | chance | positives | negatives | ignored |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in s.classes:
        n = report.counts[c]
        lines.append(f"| {_cell(c)} | {_cell(s.class_texts[c])} | {_f(report.AP[c])} | "
                     f"{_f(report.AP_voc07_11pt[c])} | {_f(report.roc_auc[c])} | {_f(report.chance[c])} | "
                     f"{n['positives']} | {n['negatives']} | {n['ignored']} |")  # fmt: skip
    if report.undefined_classes:
        lines += ["", f"Classes with no positives (left out of the means): {', '.join(report.undefined_classes)}"]
    if report.unused_classes:
        lines += ["", f"**Classes that no annotation uses** (a typo or a name cut short? compare with the annotated "
                  f"names): {', '.join(report.unused_classes)}"]  # fmt: skip
    lines += ["", "## Fixed thresholds (one global threshold, evaluation split)", "",
              "Macro: mean of the per-class rates; micro: rates of the counts summed over all image-class pairs; "
              "exact match: images whose whole predicted label set is right.", ""]  # fmt: skip
    lines += _rates_table([(f"{m['threshold']:g}", m) for m in report.sweep])
    lines += ["", "## Tuned thresholds", "", f"{report.tuning.note}.", ""]
    lines += _tuned_section(report)
    lines += ["", "## Data notes", ""]
    lines += [f"- {n}" for n in d.notices] or ["- none"]
    if d.skipped:
        lines += ["", f"Skipped images ({len(d.skipped)}):", ""]
        lines += [f"- `{x['image_id']}`: {x['reason']}" for x in d.skipped[:50]]
        if len(d.skipped) > 50:
            lines.append(f"- ... and {len(d.skipped) - 50} more (see report.json)")
    if report.files:
        lines += ["", "Files: " + ", ".join(f"`{f}`" for f in report.files)]
    return "\n".join(lines) + "\n"


def _tuned_section(report: ZeroshotReport) -> list[str]:
    tuning = report.tuning
    t, tune_rates, eval_rates = tuning.thresholds, tuning.tune_split, tuning.eval_split
    if not tuning.tuned or t is None or tune_rates is None or eval_rates is None:
        return []
    on = t["tuned_on"]
    warn = " **(the evaluation split itself — optimistic)**" if on["is_eval_split"] else ""
    lines = [f"Mode **{t['mode']}**, objective **{t['objective']}**, tuned on split `{on['split']}` "
             f"({on['images']} images){warn}; global threshold {t['global']:.6g}.", ""]  # fmt: skip
    if t["fallback_classes"]:
        lines += [f"Classes with too few tuning labels (global threshold used): {', '.join(t['fallback_classes'])}", ""]
    lines += _rates_table([("tuned, tuning split", tune_rates), ("tuned, evaluation split", eval_rates)])
    lines += ["", "| class | threshold | sensitivity (tune) | specificity (tune) | sensitivity (eval) | specificity (eval) | F1 (eval) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in report.settings.classes:
        tu, ev = tune_rates["per_class"][c], eval_rates["per_class"][c]
        lines.append(f"| {_cell(c)} | {t['per_class'][c]:.6g} | {_f(tu['sensitivity'])} | {_f(tu['specificity'])} | "
                     f"{_f(ev['sensitivity'])} | {_f(ev['specificity'])} | {_f(ev['f1'])} |")  # fmt: skip
    return lines
