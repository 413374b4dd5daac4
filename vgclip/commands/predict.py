"""`vgclip predict`: score free-text labels for images and print the predicted label set of each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip predict`."""
    p = subparsers.add_parser(
        "predict",
        help="zero-shot scores and predicted labels for images",
        description="Score each label for each image with a trained run; a label is predicted when its score "
        "reaches its threshold (from --thresholds written by `vgclip zeroshot`, or --threshold). "
        "Without a threshold the top-scoring label is predicted.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder (or its model.safetensors), or an open_clip export folder")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels, e.g. 'cat,traffic light,person'")
    labels.add_argument("--labels-file", type=Path,
                        help="file with one label per line (whole lines; blank lines and # comments skipped)")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--thresholds", type=Path,
                     help="thresholds.json from `vgclip zeroshot`; a label is matched to a class by its name or its "
                     "class text ('dining table' for diningtable), others get the file's global threshold")
    thr.add_argument("--threshold", type=float, help="one threshold for every label")
    p.add_argument("--score", choices=("softmax", "sigmoid", "cosine"),
                   help="score kind (default: the thresholds file's, else eval.score of the run)")  # fmt: skip
    p.add_argument("--templates", choices=("single", "ensemble"),
                   help="prompt templates (default: the thresholds file's, else eval.templates of the run)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the run, score the images, print a table or JSON."""
    import vgclip

    from vgclip.eval.tagging import format_table, predict, predict_settings, read_labels

    labels = read_labels(args.labels, args.labels_file)
    settings = predict_settings(args.checkpoint, labels, thresholds_file=args.thresholds, threshold=args.threshold,
                                score=args.score, templates=args.templates)
    for note in settings.notices:
        print(f"vgclip predict: {note}", file=sys.stderr)
    model, image_transform, tokenizer = vgclip.load_checkpoint(args.checkpoint)
    results = predict(model, image_transform, tokenizer, args.images, labels, score=settings.score,
                      templates=settings.templates, thresholds=settings.thresholds,
                      class_texts=settings.texts, device=args.device, crops=settings.crops)  # fmt: skip
    if args.json:
        thresholds = dict(zip(labels, settings.thresholds)) if settings.thresholds else None
        print(json.dumps({"score": settings.score, "templates": settings.templates, "crops": settings.crops,
                          "thresholds": thresholds, "results": results}, indent=2))  # fmt: skip
    else:
        rule = "score >= threshold" if settings.thresholds else "top-scoring label (no threshold given)"
        print(f"score: {settings.score}, templates: {settings.templates}, crops: {settings.crops}, "
              f"predicted: {rule}")
        print(format_table(results, labels))
    return 0
