"""`vgclip predict`: score free-text labels for images and print the predicted label set of each."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip predict`."""
    p = subparsers.add_parser(
        "predict",
        help="zero-shot scores and predicted labels for images",
        description="Score each label for each image with a trained run; a label is predicted when its score "
        "reaches its threshold (from --thresholds written by `vgclip zeroshot`, or --threshold). "
        "Without a threshold the top-scoring label is predicted.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder (or its model.safetensors)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels, e.g. 'cat,dog,person'")
    labels.add_argument("--labels-file", type=Path, help="file with one label per line")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--thresholds", type=Path, help="thresholds.json from `vgclip zeroshot`")
    thr.add_argument("--threshold", type=float, help="one threshold for every label")
    p.add_argument("--score", choices=("softmax", "sigmoid", "cosine"),
                   help="score kind (default: the thresholds file's, else eval.score of the run)")  # fmt: skip
    p.add_argument("--templates", choices=("single", "ensemble"),
                   help="prompt templates (default: the thresholds file's, else eval.templates of the run)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.set_defaults(run=run)


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Labels from a comma list or a file (one per line, blank lines and #comments skipped)."""
    from vgclip.errors import VgclipError

    if labels_file is not None:
        try:
            lines = labels_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise VgclipError(f"{labels_file}: cannot read labels ({exc})") from None
        names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    else:
        names = [n.strip() for n in (labels or "").split(",") if n.strip()]
    if not names:
        raise VgclipError("no labels given (--labels 'a,b,c' or --labels-file FILE)")
    if len(set(names)) != len(names):
        raise VgclipError(f"labels repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
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
) -> list[dict[str, Any]]:
    """Per image: the score of every label and the predicted labels (score >= threshold, else the top one)."""
    import numpy as np
    import torch

    from vgclip.errors import VgclipError
    from vgclip.eval.prompts import build_text_classifier, readable_name, templates_for
    from vgclip.eval.zeroshot import encode_images, logit_scale_of, score_embeddings

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    texts = [readable_name(label, class_texts) for label in labels]
    prompts = templates_for(templates)
    class_emb = build_text_classifier(model, tokenizer, texts, prompts, dev)
    enc = encode_images(model, list(images), image_transform, batch_size=32, num_workers=0, device=dev)
    if enc.failed:
        index, reason = enc.failed[0]
        more = f" (and {len(enc.failed) - 1} more unreadable)" if len(enc.failed) > 1 else ""
        raise VgclipError(f"cannot read image {reason}{more}")
    tokens = {k: v.to(dev) for k, v in tokenizer([prompts[0].format(texts[0])]).items()}
    scale = logit_scale_of(model, enc.sample, tokens)
    bias = float(getattr(model, "logit_bias", 0.0) or 0.0)
    scores, _ = score_embeddings(enc.embeddings, class_emb.cpu(), score, scale, bias)
    results = []
    for path, row in zip(images, scores):
        if thresholds is None:
            chosen = [labels[int(np.argmax(row))]]
        else:
            chosen = [lab for lab, s, t in zip(labels, row, thresholds) if s >= t]
        results.append({"image": str(path), "scores": dict(zip(labels, map(float, row))), "predicted": chosen})
    return results


def _settings(args: argparse.Namespace, labels: list[str]) -> dict[str, Any]:
    """Score kind, templates, per-label thresholds and class texts from the flags, thresholds file and run config."""
    from vgclip.commands.zeroshot import eval_config_for
    from vgclip.errors import VgclipError
    from vgclip.eval.thresholds import load_thresholds, threshold_vector

    eval_cfg = eval_config_for(args.checkpoint, [])
    out: dict[str, Any] = {"score": eval_cfg.score, "templates": eval_cfg.templates, "thresholds": None, "texts": None}
    if args.thresholds is not None:
        info = load_thresholds(args.thresholds)
        for key in ("score", "templates"):
            flag, saved = getattr(args, key), info.get(key)
            if flag and saved and flag != saved:
                raise VgclipError(f"{args.thresholds} was tuned with {key}={saved}; --{key} {flag} would not match it")
            out[key] = saved or out[key]
        out["thresholds"] = threshold_vector(info, labels).tolist()
        out["texts"] = info.get("class_texts")
        if out["score"] == "softmax" and set(labels) != set(info.get("classes", labels)):
            print("vgclip predict: warning: softmax scores depend on the label set, which differs from the one the "
                  "thresholds were tuned on", file=sys.stderr)  # fmt: skip
    elif args.threshold is not None:
        out["thresholds"] = [args.threshold] * len(labels)
    out["score"] = args.score or out["score"]
    out["templates"] = args.templates or out["templates"]
    return out


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


def run(args: argparse.Namespace) -> int:
    """Load the run, score the images, print a table or JSON."""
    import vgclip

    labels = read_labels(args.labels, args.labels_file)
    settings = _settings(args, labels)
    model, image_transform, tokenizer = vgclip.load_checkpoint(args.checkpoint)
    results = predict(model, image_transform, tokenizer, args.images, labels, score=settings["score"],
                      templates=settings["templates"], thresholds=settings["thresholds"],
                      class_texts=settings["texts"], device=args.device)  # fmt: skip
    if args.json:
        thresholds = dict(zip(labels, settings["thresholds"])) if settings["thresholds"] else None
        print(json.dumps({"score": settings["score"], "templates": settings["templates"],
                          "thresholds": thresholds, "results": results}, indent=2))  # fmt: skip
    else:
        rule = "score >= threshold" if settings["thresholds"] else "top-scoring label (no threshold given)"
        print(f"score: {settings['score']}, templates: {settings['templates']}, predicted: {rule}")
        print(format_table(results, labels))
    return 0
