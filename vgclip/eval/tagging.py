"""Library side of `vgclip predict`: score free-text labels for image files with a trained model and
pick each image's label set (score >= threshold, else the top label)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgclip.errors import VgclipError
from vgclip.eval.prompts import build_text_classifier, readable_name, templates_for
from vgclip.eval.scoring import encode_images, logit_scale_of, score_embeddings
from vgclip.eval.thresholds import LabelThresholds, label_thresholds, load_thresholds
from vgclip.model.checkpoint import checkpoint_eval_config
from vgclip.names import read_name_file, split_comma_list

__all__ = ["LabelScorer", "PredictSettings", "format_table", "label_scorer", "predict", "predict_settings",
           "read_labels", "threshold_notes"]


@dataclass(frozen=True)
class PredictSettings:
    """How `vgclip predict` and `vgclip serve` score a label set: the score kind, prompt templates, crops,
    a threshold per label (None: predict the top label), class texts (None: the labels themselves),
    notices about how the thresholds file fits the labels (one line each), where the thresholds came from
    ("file PATH", "--threshold" or "none: top label") and the file's global threshold (or --threshold's)."""

    score: str
    templates: str
    crops: str
    thresholds: list[float] | None = None
    texts: dict[str, str] | None = None
    notices: tuple[str, ...] = ()
    threshold_source: str = "none: top label"
    global_threshold: float | None = None


@dataclass(frozen=True)
class LabelScorer:
    """A label set ready to score unit image embeddings: class embeddings [C, D], the score kind, the
    model's logit scale and bias, and a threshold per label (None: the top label is predicted)."""

    labels: tuple[str, ...]
    class_emb: torch.Tensor
    kind: str
    scale: float
    bias: float
    thresholds: tuple[float, ...] | None

    def scores(self, image_emb: torch.Tensor) -> np.ndarray:
        """Scores [N, C] (float64) of unit image embeddings [N, D]."""
        return score_embeddings(image_emb, self.class_emb, self.kind, self.scale, self.bias)[0]

    def chosen(self, row: Sequence[float]) -> list[str]:
        """The predicted labels of one image's scores: score >= threshold, else the top label."""
        if self.thresholds is None:
            return [self.labels[int(np.argmax(row))]]
        return [lab for lab, s, t in zip(self.labels, row, self.thresholds) if s >= t]


@torch.inference_mode()
def label_scorer(model: Any, tokenizer: Callable, labels: Sequence[str], settings: PredictSettings,
                 device: torch.device | str, sample: torch.Tensor | None = None) -> LabelScorer:
    """Encode `labels` (their class texts, `settings.templates`) and read the model's logit scale and bias.
    `sample` (one model input) is needed only by models without get_logit_scale()."""
    texts = [readable_name(label, settings.texts) for label in labels]
    prompts = templates_for(settings.templates)
    class_emb = build_text_classifier(model, tokenizer, texts, prompts, device)
    tokens = {k: v.to(device) for k, v in tokenizer([prompts[0].format(texts[0])]).items()}
    scale = logit_scale_of(model, sample, tokens)
    bias = float(getattr(model, "logit_bias", 0.0) or 0.0)
    limits = None if settings.thresholds is None else tuple(settings.thresholds)
    return LabelScorer(tuple(labels), class_emb.float().cpu(), settings.score, scale, bias, limits)


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Labels from a comma list or a file (one per line, whole lines, blank lines and #comments skipped)."""
    if labels_file is not None:
        return read_name_file(labels_file, "label list")
    names = split_comma_list(labels or "", "--labels")
    if not names:
        raise VgclipError("no labels given (--labels 'a,b,c' or --labels-file FILE)")
    return names


def predict(
    model: Any,
    image_transform: Callable,
    tokenizer: Callable,
    images: Sequence[Path],
    labels: Sequence[str],
    *,
    score: str = "softmax",
    templates: str = "single",
    thresholds: Sequence[float] | None = None,
    class_texts: dict[str, str] | None = None,
    device: str | None = None,
    crops: str = "centre",
) -> list[dict[str, Any]]:
    """Per image: the score of every label and the predicted labels (score >= threshold, else the top one)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    enc = encode_images(model, list(images), image_transform, batch_size=32, num_workers=0, device=dev, crops=crops)
    if enc.failed:
        index, reason = enc.failed[0]
        more = f" (and {len(enc.failed) - 1} more unreadable)" if len(enc.failed) > 1 else ""
        raise VgclipError(f"cannot read image {reason}{more}")
    settings = PredictSettings(score, templates, crops, None if thresholds is None else list(thresholds), class_texts)
    scorer = label_scorer(model, tokenizer, labels, settings, dev, enc.sample)
    results = []
    for path, row in zip(images, scorer.scores(enc.embeddings)):
        results.append({"image": str(path), "scores": dict(zip(labels, map(float, row))),
                        "predicted": scorer.chosen(row)})
    return results


def threshold_notes(info: dict[str, Any], applied: LabelThresholds, score: str, source: str) -> list[str]:
    """One line per thing to tell about a thresholds file applied to a label list: the labels it has no value
    for (they took its global threshold), and softmax scores on a label set other than the tuned one."""
    notes = []
    if applied.fallback:
        notes.append(f"notice: {source} has no threshold for {', '.join(map(repr, applied.fallback))}: "
                     f"they use its global threshold {float(info['global']):.4g}")  # fmt: skip
    if score == "softmax" and not applied.same_label_set(info):
        notes.append("warning: softmax scores depend on the label set, which differs from the one the "
                     "thresholds were tuned on")  # fmt: skip
    return notes


def predict_settings(checkpoint: str | Path, labels: Sequence[str], *, thresholds_file: Path | None = None,
                     threshold: float | None = None, score: str | None = None,
                     templates: str | None = None, crops: str | None = None) -> PredictSettings:
    """Score kind, templates, crops, per-label thresholds and class texts: explicit choices first, then the
    thresholds file, then the run's config. A choice that contradicts the thresholds file is an error
    (`crops`: centre or multi, a file from before eval.crops records none and takes any).
    A label the file does not name (by class name or class text) gets the file's global threshold."""
    eval_cfg = checkpoint_eval_config(checkpoint, [])
    kind, prompts, run_crops = eval_cfg.score, eval_cfg.templates, eval_cfg.crops
    if crops not in (None, "centre", "multi"):
        raise VgclipError(f"--crops {crops}: expected centre or multi")
    if thresholds_file is None:
        if threshold is None:
            return PredictSettings(score or kind, templates or prompts, crops or run_crops)
        return PredictSettings(score or kind, templates or prompts, crops or run_crops, [threshold] * len(labels),
                               threshold_source="--threshold", global_threshold=threshold)
    info = load_thresholds(thresholds_file)
    for key, flag in (("score", score), ("templates", templates), ("crops", crops)):
        saved = info.get(key)
        if flag and saved and flag != saved:
            raise VgclipError(f"{thresholds_file} was tuned with {key}={saved}; --{key} {flag} would not match it")
    kind, prompts = info.get("score") or kind, info.get("templates") or prompts
    # The scores the thresholds were tuned on came from these crops (files from before eval.crops: centre).
    crops = info.get("crops") or crops or "centre"
    applied = label_thresholds(info, labels, str(thresholds_file))
    # A label that names a class by its text is scored with that class's recorded text, as it was tuned.
    texts = {**(info.get("class_texts") or {}), **applied.texts}
    notes = threshold_notes(info, applied, kind, str(thresholds_file))
    found = info.get("global")
    return PredictSettings(kind, prompts, crops, applied.values, texts, tuple(notes), f"file {thresholds_file}",
                           None if found is None else float(found))


def format_table(results: list[dict[str, Any]], labels: Sequence[str]) -> str:
    """One row per image: the score of every label, then the predicted labels."""
    name_w = max(5, *(len(Path(r["image"]).name) for r in results))
    widths = [max(7, len(lab)) for lab in labels]
    head = f"{'image':<{name_w}}  " + "  ".join(f"{lab:>{w}}" for lab, w in zip(labels, widths)) + "  predicted"
    rows = [head]
    for r in results:
        cells = "  ".join(f"{r['scores'][lab]:>{w}.4f}" for lab, w in zip(labels, widths))
        rows.append(f"{Path(r['image']).name:<{name_w}}  {cells}  {', '.join(r['predicted']) or '(none)'}")
    return "\n".join(rows)

