"""Zero-shot multi-label evaluation on a VOC split: score every class (scoring.py), compute the metrics,
tune thresholds on a separate split, and return the report as a `ZeroshotReport` (records.py).

`evaluate_zeroshot` writes nothing: the caller writes the report folder (report.py; job.py does both for
`vgclip zeroshot`, the demo and `vgclip train --voc-root`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vgclip.config import EvalConfig
from vgclip.data.voc import VocSplit, load_voc
from vgclip.errors import VgclipError
from vgclip.eval.metrics import ranking_metrics, threshold_metrics
from vgclip.eval.prompts import build_text_classifier, readable_name, templates_for
from vgclip.eval.records import DataNotes, ReportSettings, Tuning, ZeroshotReport
from vgclip.eval.scoring import EncodedImages, ScoredSplit, score_split
from vgclip.eval.thresholds import MODES, Objective, threshold_vector, tune_thresholds

__all__ = ["DIFFICULT_NOTES", "ZeroshotSettings", "ZeroshotResult", "build_report", "evaluate_zeroshot",
           "unused_classes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroshotSettings:
    """Choices of `vgclip zeroshot` that are not `eval.*` config keys."""

    tune_split: str | None = "trainval"
    tune_on_eval: bool = False
    classes: str | Sequence[str] | None = "auto"
    class_names: Mapping[str, str] | None = None
    threshold_mode: str = "per_class"
    objective: str = "f1"
    strict_classes: bool = False
    num_workers: int = 2
    plots: bool = True
    checkpoint: str | None = None


@dataclass(frozen=True)
class ZeroshotResult:
    """The report and the scored evaluation split it was computed from (what scores.csv and the plots show)."""

    report: ZeroshotReport
    evaluated: ScoredSplit


def evaluate_zeroshot(
    model: torch.nn.Module,
    image_transform: Callable,
    tokenizer: Callable,
    voc_root: str | Path,
    split: str = "test",
    eval_cfg: EvalConfig | None = None,
    options: ZeroshotSettings | None = None,
    device: torch.device | str | None = None,
    encode: Callable[[VocSplit], EncodedImages] | None = None,
) -> ZeroshotResult:
    """Evaluate `model` zero-shot on a VOC split and tune thresholds on the tuning split; nothing is written.

    `encode`: how a split's images become unit embeddings, if not `encode_images` with `model` (a caller that
    caches part of the image tower, train/zeroshot_tracking.py); the rest (texts, scores, metrics) is unchanged.
    """
    eval_cfg = eval_cfg or EvalConfig()
    opts = options or ZeroshotSettings()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    objective = _check_options(eval_cfg, opts)  # fail on a bad choice before any work
    model = model.to(device).eval()
    data = load_voc(voc_root, split, opts.classes, eval_cfg.difficult, opts.strict_classes)
    tune_data, tune_note = _tuning_split(data, voc_root, split, eval_cfg, opts)
    if tune_data is None or opts.tune_on_eval:
        log.warning(tune_note)
    texts = [readable_name(c, opts.class_names) for c in data.classes]
    templates = templates_for(eval_cfg.templates)
    class_emb = build_text_classifier(model, tokenizer, texts, templates, device)
    first_tokens = {k: v.to(device) for k, v in tokenizer([templates[0].format(texts[0])]).items()}
    kw = {"num_workers": opts.num_workers, "device": device, "tokens_for_scale": first_tokens}
    evaluated = score_split(model, image_transform, data, class_emb, eval_cfg, **kw,
                            encoded=encode(data) if encode else None)
    tuned = None
    if tune_data is not None:
        tuned = evaluated if tune_data is data else score_split(model, image_transform, tune_data, class_emb, eval_cfg,
                                                                **kw, encoded=encode(tune_data) if encode else None)
    report = build_report(evaluated, tuned, eval_cfg, opts, objective, texts, templates, tune_note)
    return ZeroshotResult(report, evaluated)


def _check_options(eval_cfg: EvalConfig, opts: ZeroshotSettings) -> Objective:
    """Check the options config.py does not see (eval.* settings were checked when the EvalConfig was made);
    a templates file is read now, so a bad one fails before any image is encoded."""
    if opts.threshold_mode not in MODES:
        raise VgclipError(f"threshold mode must be one of {', '.join(MODES)}, got {opts.threshold_mode!r}")
    templates_for(eval_cfg.templates)
    return Objective.parse(opts.objective)


def _tuning_split(
    data: VocSplit, voc_root: str | Path, split: str, eval_cfg: EvalConfig, opts: ZeroshotSettings
) -> tuple[VocSplit | None, str]:
    """The split thresholds are tuned on, or None with the reason tuning is skipped."""
    if opts.tune_on_eval:
        return data, "thresholds tuned on the evaluation split itself (--tune-on-eval): optimistic"
    if not opts.tune_split or opts.tune_split == "none":
        return None, "no tuning split given: thresholds not tuned"
    if data.split is None:
        return None, "no ImageSets, so no separate tuning split: thresholds not tuned (use --tune-on-eval to tune here)"
    if opts.tune_split == split:
        raise VgclipError(f"tuning split '{split}' is the evaluation split; pass --tune-on-eval to allow that")
    tune = load_voc(voc_root, opts.tune_split, list(data.classes), eval_cfg.difficult, opts.strict_classes)
    overlap = set(tune.image_ids) & set(data.image_ids)
    if overlap:
        raise VgclipError(
            f"tuning split '{opts.tune_split}' shares {len(overlap)} images with '{split}'; "
            "choose disjoint splits or pass --tune-on-eval"
        )
    return tune, f"thresholds tuned on split '{opts.tune_split}', applied to split '{split}'"


def build_report(
    ev: ScoredSplit,
    tune: ScoredSplit | None,
    eval_cfg: EvalConfig,
    opts: ZeroshotSettings,
    objective: Objective,
    texts: list[str],
    templates: Sequence[str],
    tune_note: str,
) -> ZeroshotReport:
    """The report: ranking metrics, the threshold sweep, tuned thresholds on both splits, data notes."""
    d, classes = ev.data, ev.data.classes
    settings = ReportSettings(
        checkpoint=opts.checkpoint,
        voc_root=str(d.root),
        split=d.split or "all annotated images (no ImageSets)",
        score=eval_cfg.score,
        templates=eval_cfg.templates,
        template_texts=list(templates),
        crops=eval_cfg.crops,
        difficult=eval_cfg.difficult,
        difficult_note=DIFFICULT_NOTES[eval_cfg.difficult],
        classes=list(classes),
        class_texts=dict(zip(classes, texts)),
        label_source=d.label_source,
    )
    unused = unused_classes(ev.data, tune.data if tune is not None else None)
    notes = _data_notes(ev, d)
    stray = sorted(set(opts.class_names or {}) - set(classes))
    if stray:
        notes.notices.append(f"names given --class-names texts but not in the class list (unused): "
                             f"{', '.join(stray)}")  # fmt: skip
    sweep = [threshold_metrics(ev.scores, d.labels, ev.valid, classes, t) for t in eval_cfg.thresholds]
    tuning = _tuning(ev, tune, eval_cfg, opts, objective, texts, tune_note)
    return ZeroshotReport(**ranking_metrics(ev.ranking, d.labels, ev.valid, classes), settings=settings,
                          unused_classes=unused, data=notes, sweep=sweep, tuning=tuning)  # fmt: skip


def _tuning(ev: ScoredSplit, tune: ScoredSplit | None, eval_cfg: EvalConfig, opts: ZeroshotSettings,
            objective: Objective, texts: list[str], tune_note: str) -> Tuning:  # fmt: skip
    """Thresholds tuned on `tune` (the thresholds.json document) and their rates on both splits."""
    if tune is None:
        return Tuning(note=tune_note, on_eval_split=bool(opts.tune_on_eval), tuned=False)
    d, classes = ev.data, ev.data.classes
    info = tune_thresholds(tune.scores, tune.data.labels, tune.valid, classes, opts.threshold_mode, objective)
    info.update(score=eval_cfg.score, templates=eval_cfg.templates, crops=eval_cfg.crops,
                class_texts=dict(zip(classes, texts)),
                tuned_on={"split": tune.data.split or "all annotated images", "images": len(tune.data.image_ids),
                          "skipped_images": len(tune.data.skipped),
                          "is_eval_split": bool(opts.tune_on_eval)})  # fmt: skip
    vec = threshold_vector(info, classes)
    return Tuning(
        note=tune_note, on_eval_split=bool(opts.tune_on_eval), tuned=True, thresholds=info,
        tune_split=threshold_metrics(tune.scores, tune.data.labels, tune.valid, classes, vec),
        eval_split=threshold_metrics(ev.scores, d.labels, ev.valid, classes, vec),
    )


def unused_classes(data: VocSplit, tune: VocSplit | None = None) -> list[str]:
    """Classes of the class list that no annotation of the splits read names (not even as difficult).

    Unlike a class without positives in the evaluation split only, such a name is most likely a typo
    or a name cut short (e.g. "traffic" for "traffic light"), so the report lists it.
    """
    splits = [data] if tune is None or tune is data else [data, tune]
    unused = [c for c in data.classes if not any(s.class_images.get(c, 0) for s in splits)]
    if unused:
        log.warning("no annotation uses class(es) %s: check their spelling against the annotated names",
                    ", ".join(repr(c) for c in unused))  # fmt: skip
    return unused


DIFFICULT_NOTES = {
    "ignore": "official VOC: a class present only as 'difficult' in an image is left out of that class's metrics",
    "positive": "CLIP_benchmark: 'difficult' objects count as positives",
}


def _data_notes(ev: ScoredSplit, d: VocSplit) -> DataNotes:
    return DataNotes(
        evaluated_images=len(d.image_ids),
        skipped_images=len(d.skipped),
        skipped=d.skipped,
        unreadable_images=len(ev.failed),
        unknown_class_objects=d.unknown_classes,
        ignored_entries=int(d.ignore.sum()),
        notices=list(d.notices),
    )
