"""Starting `vgclip serve`: load the run once, read the report and the collection, pick default labels and
thresholds, run uvicorn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vgclip
from vgclip.data.views import eval_transform
from vgclip.data.voc import STANDARD_CLASSES
from vgclip.errors import VgclipError
from vgclip.eval.tagging import predict_settings
from vgclip.eval.thresholds import load_thresholds
from vgclip.serve.app import AppSettings, create_app
from vgclip.serve.auth import TOKEN_ENV, is_loopback
from vgclip.serve.collection import load_collection
from vgclip.serve.collection_routes import check_collection
from vgclip.serve.engine import ScoringEngine
from vgclip.serve.report_folder import load_report, page_json


@dataclass(frozen=True)
class ServeSettings:
    """What `vgclip serve` was asked to serve."""

    checkpoint: Path
    report: Path | None = None
    thresholds: Path | None = None
    voc_root: Path | None = None
    save_thresholds: Path | None = None
    device: str | None = None
    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    token: str | None = None  # required by every route but /api/health when set (see vgclip.serve.auth)
    collection: Path | None = None  # a `vgclip predict --out` folder for the Collection page


def default_options(setup: ServeSettings) -> Any:
    """Labels, score kind, templates and thresholds the pages start with: the thresholds file's (given, or the
    report's thresholds.json), else the 20 VOC classes with the run's eval settings."""
    file = setup.thresholds
    if file is None and setup.report is not None and (setup.report / "thresholds.json").is_file():
        file = setup.report / "thresholds.json"
    labels, source, tuned = list(STANDARD_CLASSES), "the 20 VOC classes", None
    if file is not None:
        tuned = load_thresholds(file)
        labels, source = list(tuned.get("classes") or []), str(file)
        if not labels:
            raise VgclipError(f"{file}: lists no classes")
    chosen = predict_settings(setup.checkpoint, labels, thresholds_file=file)
    limits = dict(zip(labels, chosen.thresholds)) if chosen.thresholds else None
    if setup.max_upload_mb <= 0 or setup.max_pixels <= 0:
        raise VgclipError("--max-upload-mb and --max-pixels must be positive")
    return AppSettings(labels, score=chosen.score, templates=chosen.templates, thresholds=limits, tuned=tuned,
                        class_texts=chosen.texts, labels_source=source, crops=chosen.crops,
                        max_upload_bytes=int(setup.max_upload_mb * 1024 * 1024), max_pixels=setup.max_pixels,
                        token=setup.token, info={"checkpoint": str(setup.checkpoint)})  # fmt: skip


def build_app(setup: ServeSettings) -> Any:
    """The FastAPI app with the model loaded (once), the report and the collection read."""
    if not Path(setup.checkpoint).exists():
        raise VgclipError(f"{setup.checkpoint}: no such run folder or checkpoint")
    options = default_options(setup)
    report = None
    if setup.report is not None:
        report = load_report(setup.report, save_path=setup.save_thresholds, voc_root=setup.voc_root)
        page_json(report)  # built once here, so the threshold page's first request does not wait for it
    collection = load_collection(setup.collection) if setup.collection is not None else None
    model, transform, tokenizer = vgclip.load_checkpoint(setup.checkpoint)
    transform = eval_transform(transform, options.crops)
    engine = ScoringEngine(model, transform, tokenizer, device=setup.device, max_batch=setup.max_batch,
                           max_wait_s=setup.batch_wait_ms / 1000)  # fmt: skip
    options.info["device"] = str(engine.device)
    if collection is not None:
        collection.warnings = check_collection(collection, engine, setup.checkpoint)
    return create_app(engine, options, report, collection)


def open_lines(host: str, port: int, token: str | None, generated: bool, no_token: bool) -> list[tuple[str, bool]]:
    """What `vgclip serve` prints once the model is loaded, as (line, is_warning): where to open it, with the
    token when one was generated (a given one is not echoed into logs), or a warning when it is open to others."""
    import socket

    # A wildcard address is no URL to open: name this machine instead.
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    base = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
    pages = "threshold page: /thresholds, collection page: /collection, API docs: /docs"
    if token is not None and generated:
        url = f"{base}?token={token}"
        return [(f"vgclip serve: open {url} (the token sets a cookie; {pages}; API clients send Authorization: "
                 "Bearer TOKEN); Ctrl-C stops", False)]  # fmt: skip
    if token is not None:
        return [(f"vgclip serve: open {base}?token=TOKEN once, with the token of --token / ${TOKEN_ENV} ({pages}; "
                 "API clients send Authorization: Bearer TOKEN); Ctrl-C stops", False)]  # fmt: skip
    lines = [(f"vgclip serve: open {base} ({pages}); Ctrl-C stops", False)]
    if no_token and not is_loopback(host):
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines.append((f"vgclip serve: warning: --no-token: anyone who can reach {where} can tag images and "
                      "save thresholds here, with no token asked", True))  # fmt: skip
    return lines


def serve(app: Any, host: str, port: int) -> None:
    """Run uvicorn until Ctrl-C (uvicorn shuts down cleanly on SIGINT / SIGTERM)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
