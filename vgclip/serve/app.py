"""The `vgclip serve` web application: the tag page, the threshold page and the JSON API they use.

`create_app(engine, options, report)` builds the FastAPI app around an already loaded `ScoringEngine`
(the model loads once, before the server accepts a request). Every script and style the pages use is
served from `vgclip/serve/static` (no CDN: the page works offline).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from vgclip.data.images import BadImageError
from vgclip.errors import VgclipError
from vgclip.eval.tagging import threshold_notes
from vgclip.eval.prompts import readable_name
from vgclip.eval.thresholds import label_thresholds, match_class
from vgclip.serve import report_folder as rep
from vgclip.serve.auth import AccessGuard
from vgclip.serve.collection import Collection
from vgclip.serve.collection_routes import add_collection_routes
from vgclip.serve.engine import ImageTooLargeError, ScoringEngine, decode_upload, predicted_set
from vgclip.serve.limits import DRAIN_FACTOR, BodyLimit
from vgclip.serve.report_folder import ReportData

STATIC = Path(__file__).resolve().parent / "static"
GZIP_MINIMUM_BYTES = 1024
SCORE_KINDS = ("softmax", "sigmoid", "cosine")
TEMPLATE_SETS = ("single", "ensemble")
MAX_LABELS = 200


@dataclass
class AppSettings:
    """Start-time choices: default labels and thresholds, request limits."""

    labels: list[str]
    score: str
    templates: str
    thresholds: dict[str, float] | None = None  # per default label, from a thresholds file
    tuned: dict[str, Any] | None = None  # that thresholds file (labels it does not name get its global value)
    class_texts: dict[str, str] | None = None
    labels_source: str = "the 20 VOC classes"
    crops: str = "centre"  # eval.crops the engine's transform applies (fixed at start: thresholds were tuned on it)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_images: int = 64
    max_pixels: int = 40_000_000
    token: str | None = None  # when set, every route but /api/health needs it (vgclip.serve.auth)
    info: dict[str, Any] = field(default_factory=dict)  # shown by /api/health (checkpoint, device)


class TuneRequest(BaseModel):
    """Move the thresholds to a tuned objective: accuracy, youden, f1, sensitivity:T, specificity:T."""

    objective: str = "f1"
    mode: str = "global"


class SaveRequest(BaseModel):
    """The page's current thresholds, to be written as thresholds.json."""

    mode: str = "global"
    global_threshold: float
    per_class: dict[str, float] = {}
    objective: str = "manual"


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc), for the health check and the load test."""
    try:
        with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def parse_labels(text: str) -> list[str]:
    """Labels from the form: comma-separated or one per line; 422 when empty or repeated."""
    names = [n.strip() for line in text.splitlines() for n in line.split(",") if n.strip()]
    if not names:
        raise HTTPException(422, "the label list is empty: give labels separated by commas or one per line")
    if len(set(names)) != len(names):
        raise HTTPException(422, f"labels repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    if len(names) > MAX_LABELS:
        raise HTTPException(422, f"at most {MAX_LABELS} labels per request, got {len(names)}")
    return names


def parse_thresholds(text: str | None, labels: list[str]) -> list[float] | None:
    """A number (one for every label), a JSON object label -> value, or None when the field is empty."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise HTTPException(422, f"thresholds must be a number or a JSON object label -> number, got {text[:80]!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * len(labels)
    elif isinstance(value, dict):
        missing = [lab for lab in labels if lab not in value]
        if missing:
            raise HTTPException(422, f"thresholds miss labels: {', '.join(missing)}")
        values = [value[lab] for lab in labels]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise HTTPException(422, "every threshold must be a number")
    else:
        raise HTTPException(422, "thresholds must be a number or a JSON object label -> number")
    if not all(math.isfinite(v) for v in values):
        raise HTTPException(422, "thresholds must be finite numbers")
    return [float(v) for v in values]


def file_thresholds(labels: list[str], score: str, templates: str,
                    options: AppSettings) -> tuple[list[float] | None, list[str]]:  # fmt: skip
    """The start-time thresholds file applied to a request's labels, as `vgclip predict --thresholds` applies
    it (a label it does not name gets its global value), with the warnings the command prints; no thresholds
    (the top label) without a file, or when the request's score kind or templates are not the file's."""
    info = options.tuned
    if info is None:
        return None, []
    if (score, templates) != (options.score, options.templates):
        return None, [f"warning: the thresholds of {options.labels_source} were tuned on {options.score} scores "
                      f"with {options.templates} prompts, not applied to {score} / {templates}: the top label "
                      "is predicted"]  # fmt: skip
    try:
        applied = label_thresholds(info, labels, options.labels_source)
    except VgclipError as exc:
        raise HTTPException(422, str(exc).replace("--threshold T", "the thresholds field (a number)")) from None
    return applied.values, threshold_notes(info, applied, score, options.labels_source)


def scoring_texts(labels: list[str], options: AppSettings) -> list[str]:
    """The text each label is scored with: a label naming a class of the thresholds file (by name or class text)
    is scored with that class's recorded text, as it was tuned; any other label as `vgclip predict` words it."""
    recorded = dict(options.class_texts or {})
    if options.tuned is not None:
        for label in labels:
            cls = match_class(options.tuned, label)
            if cls is not None and cls in (options.class_texts or {}):
                recorded.setdefault(label, options.class_texts[cls])
    return [readable_name(label, recorded) for label in labels]


def validation_message(exc: RequestValidationError) -> str:
    """Pydantic's error list as one line: which field, what is wrong with it."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        msg = str(error.get("msg", "not valid"))
        what = "is missing" if error.get("type") == "missing" else f"is not valid ({msg})"
        parts.append(f"field {where!r} {what}" if where else msg)
    return "; ".join(parts) or "the request is not valid"


def _choice(value: str | None, default: str, allowed: tuple[str, ...], name: str) -> str:
    value = (value or "").strip() or default
    if value not in allowed:
        raise HTTPException(422, f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


async def read_images(files: list[UploadFile], engine: ScoringEngine, options: AppSettings) -> list[Any]:
    """Decode and transform every upload (in worker threads); 413 for a bomb, 415 naming a non-image."""
    if not files:
        raise HTTPException(422, "no image uploaded (multipart field 'images')")
    if len(files) > options.max_images:
        raise HTTPException(413, f"at most {options.max_images} images per request, got {len(files)}")
    tensors = []
    for index, upload in enumerate(files):
        name = upload.filename or f"image {index + 1}"
        data = await upload.read()
        try:
            tensors.append(await run_in_threadpool(decode_upload, name, data, engine.transform, options.max_pixels))
        except ImageTooLargeError as exc:
            raise HTTPException(413, f"{exc}") from None
        except BadImageError as exc:
            raise HTTPException(415, f"{name} is not a usable image ({exc.reason})") from None
    return tensors


def create_app(engine: ScoringEngine, options: AppSettings, report: ReportData | None = None,
               collection: Collection | None = None) -> FastAPI:  # fmt: skip
    """The web app: pages at /, /thresholds and /collection, the JSON API under /api, OpenAPI docs at /docs."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await engine.close()

    # fastapi-offline: the OpenAPI page (/docs) with Swagger UI served from the package, not from a CDN.
    app = FastAPIOffline(title="vgclip serve", lifespan=lifespan,
                  description="Zero-shot multi-label tagging with a trained vgclip run, and threshold tuning on a "
                              "`vgclip zeroshot` report.")  # fmt: skip
    # Innermost: JSON and pages go out compressed to a browser that accepts it (the threshold page's one
    # document of N x C scores shrinks several times); JPEG thumbnails are left as they are.
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MINIMUM_BYTES, compresslevel=6)
    app.add_middleware(BodyLimit, max_bytes=options.max_upload_bytes)
    # Added last, so outermost: a request without the token (or a write from another site) goes no further.
    app.add_middleware(AccessGuard, token=options.token, drain_limit=DRAIN_FACTOR * options.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    started = time.monotonic()

    @app.exception_handler(RequestValidationError)
    async def readable_422(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc)}, 422)  # one line, as every other refusal

    @app.get("/", include_in_schema=False)
    def tag_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/thresholds", include_in_schema=False)
    def threshold_page() -> FileResponse:
        return FileResponse(STATIC / "thresholds.html")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        """Liveness, the loaded run, batching counters and this process's resident memory."""
        return {"status": "ok", **options.info, "uptime_s": round(time.monotonic() - started, 1),
                "batches": engine.batcher.batches, "batched_images": engine.batcher.images,
                "text_builds": engine.text_builds,
                "rss_bytes": rss_bytes(), "report": report is not None,
                "collection": None if collection is None else len(collection)}  # fmt: skip

    @app.get("/api/labels")
    def labels() -> dict[str, Any]:
        """The default label list, score kind, templates and thresholds (from the start-time thresholds file:
        per label, and its global threshold)."""
        glob = options.tuned.get("global") if options.tuned else None
        return {"labels": options.labels, "source": options.labels_source, "score": options.score,
                "templates": options.templates, "crops": options.crops, "thresholds": options.thresholds,
                "global_threshold": glob,
                "score_kinds": list(SCORE_KINDS), "template_sets": list(TEMPLATE_SETS)}  # fmt: skip

    add_predict_route(app, engine, options)
    add_report_routes(app, report)
    add_collection_routes(app, engine, collection, STATIC)
    return app


def add_predict_route(app: FastAPI, engine: ScoringEngine, options: AppSettings) -> None:
    """POST /api/predict: the tag page's one call to the model."""

    @app.post("/api/predict")
    async def predict(images: list[UploadFile] | None = File(None, description="one or more image files"),
                      labels: str | None = Form(None, description="labels, comma-separated or one per line"),
                      score: str | None = Form(None, description="softmax, sigmoid or cosine"),
                      templates: str | None = Form(None, description="single or ensemble"),
                      thresholds: str | None = Form(None, description="a number, or JSON {label: threshold}; "
                                                    "default: the start-time thresholds file's"),
                      ) -> dict[str, Any]:  # fmt: skip
        """Per image: every label's score and the predicted set (score >= threshold, else the top label), and
        `warnings` about the thresholds (labels the file has no value for, softmax on another label set)."""
        names = parse_labels(labels or "")
        kind = _choice(score, options.score, SCORE_KINDS, "score")
        prompts = _choice(templates, options.templates, TEMPLATE_SETS, "templates")
        limits, notes = parse_thresholds(thresholds, names), []
        if limits is None:
            limits, notes = file_thresholds(names, kind, prompts, options)
        tensors = await read_images(images or [], engine, options)
        scores = await engine.score(torch.stack(tensors), scoring_texts(names, options), kind, prompts)
        results = [{"image": f.filename, "scores": dict(zip(names, map(float, row))),
                    "predicted": predicted_set(names, row, limits)} for f, row in zip(images or [], scores)]  # fmt: skip
        return {"labels": names, "score": kind, "templates": prompts, "warnings": notes,
                "thresholds": dict(zip(names, limits)) if limits else None, "results": results}  # fmt: skip


def add_report_routes(app: FastAPI, report: ReportData | None) -> None:
    """The threshold page's API: the report's scores, tuning, saving and the gallery images."""
    def need() -> ReportData:
        if report is None:
            raise HTTPException(404, "no report: start `vgclip serve` with --report REPORT_DIR (zeroshot output)")
        return report

    @app.get("/api/report")
    def report_data() -> Response:
        """Scores, labels, tuned thresholds and the threshold curve of the report's evaluated split."""
        if report is None:
            return JSONResponse({"available": False, "reason": "start `vgclip serve` with --report REPORT_DIR"})
        return Response(rep.page_json(report), media_type="application/json")

    @app.post("/api/report/tune")
    def tune(body: TuneRequest) -> dict[str, Any]:
        """Thresholds that maximise an objective on the report's split (global or per class)."""
        try:
            return rep.tune_on_report(need(), body.objective, body.mode)
        except VgclipError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.post("/api/report/thresholds")
    def save(body: SaveRequest) -> dict[str, Any]:
        """Write the given thresholds as thresholds.json (atomically) to the path fixed at start."""
        data = need()
        try:
            info = rep.thresholds_to_save(data, body.mode, body.global_threshold, body.per_class, body.objective)
            path = rep.save(data, info)
        except VgclipError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"path": str(path), "thresholds": info}

    @app.get("/api/report/images/{image_id}")
    async def image(image_id: str) -> Response:
        """A thumbnail of an evaluated image, by its id in the report (nothing else is served)."""
        path = need().images.get(image_id)
        if path is None:
            raise HTTPException(404, f"no image {image_id!r} in the report")
        try:
            data = await run_in_threadpool(rep.thumbnail_jpeg, path)
        except BadImageError as exc:
            raise HTTPException(404, f"image {image_id!r} cannot be read ({exc.reason})") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
