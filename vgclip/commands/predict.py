"""`vgclip predict`: score free-text labels for images (files, folders, --list, shards) and keep the predicted
label set of each: printed for a few images, written in resumable parts with embeddings to --out for a
collection; --embeddings re-tags a finished --out folder for new labels without the images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip predict`."""
    p = subparsers.add_parser(
        "predict",
        help="zero-shot scores and predicted labels for images, a folder or a whole collection",
        description="Score each label for each image with a trained run; a label is predicted when its score "
        "reaches its threshold (from --thresholds written by `vgclip zeroshot`, or --threshold). "
        "Without a threshold the top-scoring label is predicted. Inputs: image files, folders (searched "
        "recursively for jpg/jpeg/png/webp/bmp/gif, any case), --list FILE and --data SOURCE, in a fixed order "
        "(as given, a folder's images sorted by path; then shards in order, their samples in order). A file "
        "that cannot be used is skipped with its reason, never fatal: exit 0 when any image was scored, 2 when "
        "none was. Without --out the results are printed (up to a few hundred images). With --out DIR: "
        "DIR/predictions.parquet (one row per image: key, path, shard, width, height, labels, "
        "score:<label>...), DIR/embeddings/ (float16 img_emb_N.npy + metadata_N.parquet, clip-retrieval's "
        "layout), DIR/skipped.csv and DIR/summary.json, written in parts: the same command run again "
        "continues after the last complete part. Re-tag: --embeddings DIR --labels ... scores the stored "
        "embeddings for new labels (no images, no image encoding) into DIR/retag-<hash>/ (or --out NEWDIR). "
        "Several processes: torchrun --nproc_per_node N -m vgclip.cli predict ... --out DIR.",
    )
    p.add_argument("--checkpoint", help="run folder (or its model.safetensors), or an open_clip export folder "
                   "(required, except with --embeddings: then the one the embeddings were made with)")
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
    p.add_argument("--crops", choices=("centre", "multi"),
                   help="centre: one centre crop per image; multi: 8 crops averaged (default: the thresholds "
                   "file's, else eval.crops of the run; a re-tag uses the stored embeddings' crops)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (without --out)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders (recursive) or http(s) URLs")
    p.add_argument("--list", type=Path, dest="list_file", metavar="FILE",
                   help="file with one image path or http(s) URL per line (# comments skipped)")
    p.add_argument("--data", action="append", default=[], metavar="SOURCE",
                   help="shards, as `vgclip train --data` takes them: a prepared folder (every split), "
                   "http(s)/s3/gs folder, a .tar or brace pattern, pipe:COMMAND (repeatable); rows are "
                   "named by the samples' keys")
    _add_output_options(p)
    p.set_defaults(run=run)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write predictions, embeddings, skipped.csv and summary.json here, in resumable parts")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet",
                   help="predictions file format (default parquet; csv joins each row's labels with '|')")
    p.add_argument("--workers", type=int,
                   help="image decoding processes (default: one per CPU, at most 8; 0: in this process)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--part-size", type=int, default=5000,
                   help="images per output part of files / URLs (each shard is one part; default 5000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of a run with other settings in --out instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--embeddings", type=Path, metavar="OUT",
                   help="re-tag: score the embeddings stored in a finished --out folder for these labels "
                   "(writes OUT/retag-<hash>/predictions.parquet and summary.json, or into --out NEWDIR)")


def run(args: argparse.Namespace) -> int:
    """Re-tag, or load the run and score the images: print them, or write --out."""
    from vgclip.errors import VgclipError
    from vgclip.eval.tagging import read_labels

    labels = read_labels(args.labels, args.labels_file)
    if args.embeddings is not None:
        if args.images or args.list_file or args.data:
            raise VgclipError("--embeddings re-tags stored embeddings: give no images, --list or --data with it")
        return _retag(args, labels)
    if args.checkpoint is None:
        raise VgclipError("--checkpoint RUN is required (except with --embeddings OUT)")
    if not (args.images or args.list_file or args.data):
        raise VgclipError("no images given: image files, folders, --list FILE or --data SOURCE")
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise VgclipError("--batch-size must be at least 1 and --workers at least 0")
    return _predict(args, labels)


def _predict(args: argparse.Namespace, labels: list[str]) -> int:
    from vgclip.errors import VgclipError
    from vgclip.eval.tagging import predict_settings
    from vgclip.tagging.job import TaggingSettings, default_workers, run_tagging

    settings = predict_settings(args.checkpoint, labels, thresholds_file=args.thresholds, threshold=args.threshold,
                                score=args.score, templates=args.templates, crops=args.crops)
    for note in settings.notices:
        print(f"vgclip predict: {note}", file=sys.stderr)
    job = TaggingSettings(Path(args.checkpoint), tuple(labels), settings, tuple(args.images), args.list_file,
                          tuple(args.data), args.out, args.format,
                          default_workers() if args.workers is None else args.workers, args.batch_size, args.part_size,
                          args.overwrite, args.quiet or args.out is None, args.device)  # fmt: skip

    def tell_skip(skip) -> None:
        print(f"vgclip predict: skipped {skip.key}: {skip.reason}" + (f" ({skip.detail})" if skip.detail else ""),
              file=sys.stderr)

    result = run_tagging(job, on_skip=tell_skip)
    skipped = sum(result.skipped.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items()))
    if args.out is not None and result.summary is None:
        return 0  # a rank other than 0: rank 0 reports
    if result.scored == 0:
        where = f"; see {args.out / 'skipped.csv'}" if args.out is not None else ""
        raise VgclipError(f"no image could be scored ({skipped} skipped: {reasons or 'none found'}{where})")
    if args.out is not None:
        print(f"vgclip predict: {result.scored} images scored, {skipped} skipped" + (f" ({reasons})" if reasons
              else "") + f", {result.images_per_s:.1f} images/s -> {args.out}")  # fmt: skip
        return 0
    _print_results(args, labels, settings, result)
    if skipped:
        print(f"vgclip predict: {result.scored} images scored, {skipped} skipped ({reasons})", file=sys.stderr)
    return 0


def _print_results(args: argparse.Namespace, labels: list[str], settings, result) -> None:
    """Today's table or JSON on stdout, from the rows the job kept."""
    from vgclip.eval.tagging import format_table

    rows = [{"image": key, "scores": dict(zip(labels, map(float, scores))), "predicted": chosen}
            for part in result.parts for key, scores, chosen in zip(part.keys, part.scores, part.chosen)]
    if args.json:
        thresholds = dict(zip(labels, settings.thresholds)) if settings.thresholds else None
        skipped = [{"image": s.key, "reason": s.reason, "detail": s.detail} for s in result.skips]
        print(json.dumps({"score": settings.score, "templates": settings.templates, "crops": settings.crops,
                          "thresholds": thresholds, "results": rows, "skipped": skipped}, indent=2))  # fmt: skip
        return
    rule = "score >= threshold" if settings.thresholds else "top-scoring label (no threshold given)"
    print(f"score: {settings.score}, templates: {settings.templates}, crops: {settings.crops}, predicted: {rule}")
    print(format_table(rows, labels))


def _retag(args: argparse.Namespace, labels: list[str]) -> int:
    from vgclip.tagging.retag import RetagSettings, run_retag

    settings = RetagSettings(args.embeddings, tuple(labels), args.thresholds, args.threshold, args.score,
                             args.templates, None if args.checkpoint is None else Path(args.checkpoint), args.out,
                             args.format, args.device, args.crops)  # fmt: skip
    result = run_retag(settings)
    for note in result.predict.notices:
        print(f"vgclip predict: {note}", file=sys.stderr)
    print(f"vgclip predict: re-tagged {result.rows} stored images in {result.seconds:.2f} s -> {result.out}")
    return 0
