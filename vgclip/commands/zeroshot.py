"""`vgclip zeroshot`: zero-shot multi-label evaluation of a trained run on a Pascal VOC folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip zeroshot`."""
    p = subparsers.add_parser(
        "zeroshot",
        help="zero-shot multi-label evaluation on Pascal VOC (mAP, chance, thresholds, plots)",
        description="Score every VOC class for every image of a split, report AP/mAP (and VOC07 11-point AP), "
        "ROC AUC, chance level and accuracy/sensitivity/specificity/precision/F1 at thresholds; tune thresholds "
        "on a separate split and apply them to the evaluation split. Writes report.json, report.md, scores.csv, "
        "thresholds.json and PNG plots to --out.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder (or its model.safetensors; its model card "
                   "README.md then quotes this report), or an open_clip export folder")  # fmt: skip
    p.add_argument("--voc-root", required=True, type=Path, help="VOC20xx folder, its VOCdevkit, or the folder above")
    p.add_argument("--split", default="test", help="evaluation split (ImageSets/Main/<split>.txt; default test)")
    p.add_argument("--tune-split", default="trainval", help="split to tune thresholds on ('none' to skip; default trainval)")
    p.add_argument("--tune-on-eval", action="store_true", help="allow tuning thresholds on the evaluation split (optimistic)")
    p.add_argument("--classes", default="auto",
                   help="auto (default), voc (standard 20), 'traffic light,stop sign', or a file with one name "
                   "per line (whole lines; blank lines and # comments skipped)")  # fmt: skip
    p.add_argument("--class-names", type=Path, help="YAML mapping class -> text used in prompts")
    p.add_argument("--strict-classes", action="store_true", help="fail on an annotated class outside the class list")
    p.add_argument("--score", choices=("softmax", "sigmoid", "cosine"), help="same as eval.score=...")
    p.add_argument("--templates", help="single, ensemble, or a file with one template per line ({} or {c} "
                   "for the class text); same as eval.templates=...")  # fmt: skip
    p.add_argument("--difficult", choices=("ignore", "positive"), help="same as eval.difficult=...")
    p.add_argument("--threshold-mode", choices=("global", "per_class"), default="per_class",
                   help="one threshold for all classes or one per class (default per_class)")  # fmt: skip
    p.add_argument("--objective", default="f1",
                   help="what tuning maximises: accuracy, youden (balanced accuracy), f1 (default), "
                   "sensitivity:T or specificity:T (reach the target, best of the other rate)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("overrides", nargs="*", metavar="eval.key=value", help="overrides of eval.* settings")
    p.set_defaults(run=run)



def run(args: argparse.Namespace) -> int:
    """Load the run, evaluate, write the report folder and print the summary table."""
    import vgclip
    from vgclip.errors import VgclipError
    from vgclip.eval.job import run_zeroshot
    from vgclip.eval.prompts import load_name_overrides
    from vgclip.eval.report_files import summary_table
    from vgclip.eval.voc_evaluation import ZeroshotSettings
    from vgclip.export.model_card import refresh_after_zeroshot
    from vgclip.model.checkpoint import checkpoint_eval_config

    overrides = list(args.overrides)
    for key in ("score", "templates", "difficult"):
        if getattr(args, key):
            overrides.append(f"eval.{key}={getattr(args, key)}")
    eval_cfg = checkpoint_eval_config(args.checkpoint, overrides)
    if args.workers < 0:
        raise VgclipError("--workers must be 0 or more")
    options = ZeroshotSettings(
        tune_split=None if args.tune_split == "none" else args.tune_split,
        tune_on_eval=args.tune_on_eval,
        classes=args.classes,
        class_names=load_name_overrides(args.class_names),
        threshold_mode=args.threshold_mode,
        objective=args.objective,
        strict_classes=args.strict_classes,
        num_workers=args.workers,
        plots=not args.no_plots,
        checkpoint=str(args.checkpoint),
    )
    model, image_transform, tokenizer = vgclip.load_checkpoint(args.checkpoint)
    report = run_zeroshot(model, image_transform, tokenizer, args.voc_root, args.split, eval_cfg, args.out,
                          options, device=args.device)  # fmt: skip
    print(summary_table(report))
    print(f"report: {args.out / 'report.md'}")
    card = refresh_after_zeroshot(args.checkpoint, args.out)
    if card is not None:
        print(f"model card: {card}")
    return 0
