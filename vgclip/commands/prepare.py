"""`vgclip prepare`: Visual Genome (or COCO captions, or a path,caption CSV) -> cleaned WebDataset shards.

Writes SHARDS/{train,val}/shard-NNNNNN.tar and SHARDS/manifest.json (docs/design.md). Rerunning
with the same arguments resumes: complete shards are kept, partial ones rewritten.

--captions-csv FILE: rows `image path,caption` (quote a caption holding the delimiter), first
line `path,caption` optional; relative paths are relative to FILE's folder. Skips in manifest.json
name FILE:LINE.

No usable image at all (e.g. --vg-root without its image folders) is an error: nothing is written.
--format tfrecord writes the same samples as TFRecord files for other tools; `vgclip train` reads
webdataset shards only.

Split: image keys are ordered by a seeded stable hash; the first --train-images go to train, the
next --val-images to val. With fewer usable images than requested, both shrink in proportion to
the requested ratio (10:1 for the defaults), with at least one val image.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vgclip.errors import VgclipError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="clean Visual Genome / COCO / CSV captions into WebDataset shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vg-root", type=Path, help="Visual Genome folder: image_data.json, "
                     "region_descriptions.json, VG_100K/, VG_100K_2/")
    src.add_argument("--coco-captions", type=Path, help="COCO captions_*.json (needs --coco-images)")
    src.add_argument("--captions-csv", type=Path, help="UTF-8 CSV (comma or tab; .tsv: tab) of two columns, image "
                     "path and caption, one caption per row (repeat the path for more); optional first line "
                     "'path,caption'; relative paths are relative to the CSV file's folder")
    p.add_argument("--coco-images", type=Path, help="folder with the COCO images named in --coco-captions")
    p.add_argument("--out", type=Path, required=True, help="output folder SHARDS")
    p.add_argument("--max-side", type=int, default=512, help="cap on the longer image side in pixels")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes writing shards")
    p.add_argument("--format", choices=("webdataset", "tfrecord"), default="webdataset",
                   help="tfrecord is an export format for other tools (needs the 'tfrecord' package): "
                        "vgclip trains and evaluates from webdataset shards only")
    p.add_argument("--train-images", type=int, default=80_000)
    p.add_argument("--val-images", type=int, default=8_000)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split hash")
    p.add_argument("--exclude-ids", type=Path, help="file with one image id per line to leave out")
    p.add_argument("--min-phrase-chars", type=int, default=1)
    p.add_argument("--max-phrase-chars", type=int, default=200, help="longer phrases are dropped")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="larger images are skipped (bomb guard)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the command's library, imported when it runs (the CLI and `vgclip --help` stay light)
    from vgclip.prepare.cleaning import CleaningSettings, Skips
    from vgclip.prepare.pipeline import PrepareSettings, format_summary, run_prepare

    if args.train_images < 0 or args.val_images < 0 or args.train_images + args.val_images == 0:
        raise VgclipError("--train-images and --val-images must be >= 0 and not both 0")
    if not 1 <= args.jpeg_quality <= 100:
        raise VgclipError("--jpeg-quality must be between 1 and 100")
    cleaning = CleaningSettings(min_phrase_chars=args.min_phrase_chars, max_phrase_chars=args.max_phrase_chars)
    settings = PrepareSettings(
        max_side=args.max_side, shard_size=args.shard_size, workers=args.workers, format=args.format,
        jpeg_quality=args.jpeg_quality, max_pixels=args.max_pixels, train_images=args.train_images,
        val_images=args.val_images, seed=args.seed,
        exclude_ids_file=str(args.exclude_ids) if args.exclude_ids else None, cleaning=cleaning,
    )
    skips = Skips()
    records, inputs = _source(args, cleaning, skips)
    manifest = run_prepare(records, args.out, settings, skips, inputs, progress=not args.quiet)
    if not args.quiet:
        print(format_summary(manifest, args.out))
    return 0


def _source(args: argparse.Namespace, cleaning, skips):
    """The record iterator of the chosen source and a description of the inputs for the manifest."""
    # the command's library, imported when it runs (the CLI and `vgclip --help` stay light)
    from vgclip.prepare.caption_sources import iter_coco_records, iter_csv_records
    from vgclip.prepare.visual_genome import iter_vg_records

    if args.vg_root is not None:
        return iter_vg_records(args.vg_root, cleaning, skips), {
            "source": "vg", "vg_root": str(args.vg_root),
            "images_expected": f"<image id>.jpg in {args.vg_root / 'VG_100K'} or {args.vg_root / 'VG_100K_2'}"}
    if args.coco_captions is not None:
        if args.coco_images is None:
            raise VgclipError("--coco-captions needs --coco-images DIR")
        return (iter_coco_records(args.coco_captions, args.coco_images, cleaning, skips),
                {"source": "coco", "coco_captions": str(args.coco_captions), "coco_images": str(args.coco_images),
                 "images_expected": f"the file_name of each image of {args.coco_captions} in {args.coco_images}"})
    return iter_csv_records(args.captions_csv, cleaning, skips), {
        "source": "csv", "captions_csv": str(args.captions_csv),
        "images_expected": f"the paths of {args.captions_csv}, relative to {args.captions_csv.parent}"}
