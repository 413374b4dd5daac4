"""`vgclip serve`: a web app (tag images, tune thresholds) and a JSON API on a trained run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vgclip.errors import VgclipError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip serve`."""
    p = subparsers.add_parser(
        "serve",
        help="web app and JSON API: tag images, tune thresholds on a zero-shot report, browse a tagged collection",
        description="Serve a trained run on http://HOST:PORT/: the tag page (/), the threshold page (/thresholds, "
        "with --report), the collection page (/collection, with --collection) and the JSON API (/api/..., documented "
        "at /docs). Needs `pip install 'vgclip[serve]'`.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="run folder (or its model.safetensors), or an open_clip export folder")
    p.add_argument("--report", type=Path, help="a `vgclip zeroshot` output folder for the threshold page")
    p.add_argument("--thresholds", type=Path, help="thresholds.json for the default labels and thresholds "
                   "(default: the report's thresholds.json)")  # fmt: skip
    p.add_argument("--collection", type=Path, help="a `vgclip predict --out` folder for the collection page "
                   "(/collection): browse, filter by label, search by text")  # fmt: skip
    p.add_argument("--voc-root", type=Path, help="VOC folder of the report's images (default: the one it names)")
    p.add_argument("--save-thresholds", type=Path,
                   help="where 'Save thresholds' writes (default: REPORT/saved/thresholds.json)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "any other address needs a token)")  # fmt: skip
    p.add_argument("--token", help="the token browsers and API clients must present (default: $VGCLIP_SERVE_TOKEN, "
                   "else a random one, printed in the URL, when --host is not a loopback address)")  # fmt: skip
    p.add_argument("--no-token", action="store_true",
                   help="serve beyond this machine with no token: anyone who can reach it can use it")  # fmt: skip
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20 MiB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (pixels) accepted")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the run once, then serve until Ctrl-C."""
    try:  # FastAPI and uvicorn are the optional `serve` extra: imported when the command runs
        from vgclip.serve.auth import TOKEN_ENV, choose_token
        from vgclip.serve.startup import ServeSettings, build_app, open_lines, serve
    except ImportError as exc:
        raise VgclipError(f"serving needs FastAPI and uvicorn: pip install 'vgclip[serve]' ({exc})") from None
    # Before the model loads: a contradictory or weak token should not cost a minute of loading first.
    token, generated = choose_token(args.host, args.token, args.no_token, os.environ.get(TOKEN_ENV))
    setup = ServeSettings(args.checkpoint, args.report, args.thresholds, args.voc_root, args.save_thresholds,
                       args.device, args.max_upload_mb, args.max_pixels, batch_wait_ms=args.batch_wait_ms,
                       token=token, collection=args.collection)  # fmt: skip
    app = build_app(setup)
    for line, warning in open_lines(args.host, args.port, token, generated, args.no_token):
        print(line, file=sys.stderr if warning else sys.stdout, flush=True)
    serve(app, args.host, args.port)
    return 0
