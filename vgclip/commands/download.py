"""`vgclip download`: fetch Visual Genome or Pascal VOC into the layouts `prepare` and `zeroshot` read.

Archives are resumed after a dropped connection (HTTP range requests), retried with backoff, checked
(size, published checksum, or zip CRCs) before extraction, extracted into a hidden staging folder and
renamed into place. Rerunning finishes an interrupted run; once complete, it checks and does nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vgclip.errors import VgclipError

_DEFAULT_OUT = {"vg": Path("data/visual_genome"), "voc2007": Path("data"), "voc2012": Path("data")}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip download`."""
    p = subparsers.add_parser(
        "download", help="fetch Visual Genome / Pascal VOC (resumable, checked) into the readers' layouts",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=tuple(_DEFAULT_OUT), help="vg (about 15 GB with images), voc2007, voc2012")
    p.add_argument("--out", type=Path, help="output folder (default: data/visual_genome for vg, data for VOC, "
                   "which then holds VOCdevkit/VOC20xx)")
    p.add_argument("--version", choices=("1.2", "1.0"), help="Visual Genome version (default 1.2)")
    p.add_argument("--mirror", metavar="URL", help="fetch each archive from URL/<file name> instead of the "
                   "official host (default: $VGCLIP_MIRROR)")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=True,
                   help="vg: also fetch the two image archives (--no-images: the JSON annotations only)")
    p.add_argument("--keep-archives", action="store_true", help="keep the archives after installing them")
    p.add_argument("--retries", type=int, default=5, help="retries per file after a network error (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Download, verify and install one dataset, then print where the readers should look."""
    # the command's library, imported when it runs (the CLI and `vgclip --help` stay light)
    from vgclip.download.fetch import FetchSettings, format_bytes
    from vgclip.download.install import DownloadSettings, download_dataset
    from vgclip.download.archives import MIRROR_ENV, get_source

    if args.dataset != "vg" and not args.images:
        raise VgclipError("--no-images applies to vg only (VOC archives hold images and annotations together)")
    if args.retries < 0:
        raise VgclipError(f"--retries must be >= 0, got {args.retries}")
    source = get_source(args.dataset, args.version)
    out = args.out or _DEFAULT_OUT[args.dataset]
    echo = (lambda message: None) if args.quiet else print
    options = DownloadSettings(
        mirror=args.mirror or os.environ.get(MIRROR_ENV) or None, images=args.images,
        keep_archives=args.keep_archives, fetch=FetchSettings(retries=args.retries, progress=not args.quiet),
        echo=echo,
    )
    if not args.quiet:
        total = source.total_size(args.images)
        print(f"{source.title}: {len(source.selected(args.images))} archive(s), {format_bytes(total)} -> {out}")
    result = download_dataset(source, out, options)
    if not args.quiet:
        state = "installed" if result.installed else "already complete, nothing to do"
        print(f"{source.title}: {state}; use {source.reader_flag} {result.root}")
    return 0
