"""`vgclip synth`: write built-in synthetic data as a Visual Genome folder and a Pascal VOC2007 folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vgclip.errors import VgclipError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip synth`."""
    p = subparsers.add_parser(
        "synth",
        help="write procedurally drawn shape scenes as OUT/vg (Visual Genome) and OUT/voc (VOC2007)",
        description="Write synthetic scenes (coloured shapes) in the real dataset layouts: OUT/vg is a "
        "Visual Genome v1.2 folder for training, OUT/voc/VOCdevkit/VOC2007 a held-out Pascal VOC folder "
        "for zero-shot evaluation. Deterministic for a given seed.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (gets vg/ and voc/)")
    p.add_argument("--train-images", type=int, default=2000, help="Visual Genome images (default 2000)")
    p.add_argument("--voc-images", type=int, default=500, help="VOC images, half trainval, half test (default 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--image-size", type=int, default=320, metavar="PX",
        help="largest image side; each side is drawn from [PX/2, PX] (default 320)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/vg and OUT/voc")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write both folders and print where they went with their counts."""
    # the command's library, imported when it runs (the CLI and `vgclip --help` stay light)
    from vgclip.synthetic.writers import SYNTH_CLASSES, write_synthetic_vg, write_synthetic_voc

    if args.image_size < 64:
        raise VgclipError(f"--image-size must be at least 64 pixels, got {args.image_size}")
    max_side = args.image_size
    min_side = max(64, max_side // 2)
    start = time.perf_counter()
    vg_dir, voc_dir = args.out / "vg", args.out / "voc"
    # Check both targets up front so a refusal never leaves one folder new and the other old.
    for target in (vg_dir, voc_dir):
        if target.exists() and any(target.iterdir()) and not args.overwrite:
            raise VgclipError(f"{target} already exists and is not empty (pass --overwrite to replace it)")
    vg = write_synthetic_vg(vg_dir, args.train_images, args.seed,
                            min_side=min_side, max_side=max_side, overwrite=args.overwrite)
    print(f"Visual Genome: {vg_dir} ({vg['images']} images: {vg['VG_100K']} in VG_100K/, "
          f"{vg['VG_100K_2']} in VG_100K_2/; {vg['objects']} objects, {vg['regions']} region descriptions)")
    voc = write_synthetic_voc(voc_dir, args.voc_images, args.seed,
                              min_side=min_side, max_side=max_side, overwrite=args.overwrite)
    print(f"Pascal VOC:    {voc_dir / 'VOCdevkit' / 'VOC2007'} ({voc['images']} images: "
          f"{voc['trainval']} trainval, {voc['test']} test; {voc['objects']} objects, {voc['difficult']} difficult)")
    print(f"classes: {', '.join(SYNTH_CLASSES)}  ({time.perf_counter() - start:.1f} s)")
    return 0
