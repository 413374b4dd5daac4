"""The Collection page's API: a `vgclip predict --out` folder paged, filtered by label and searched by text.

- `GET /api/collection`: what the page starts from (labels, score kind, the run's thresholds, row count);
- `POST /api/collection/items`: one page of rows (`limit` <= MAX_LIMIT) whose predicted set holds the chosen
  labels at the thresholds the page sends (numpy over the stored score columns), optionally ranked by a free-text
  query (the served run's text tower, cosine over the stored image embeddings, the best `k` <= MAX_K);
- `GET /api/collection/row?key=K`: one row with every label's score;
- `GET /api/collection/thumb/{row}`: a thumbnail of a row whose `path` is a local file of the collection (the
  path is the collection's, never the client's), a placeholder for a row without one, 404 for no such row.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from vgclip.data.images import BadImageError
from vgclip.errors import VgclipError
from vgclip.eval.prompts import build_text_classifier
from vgclip.serve.collection import Collection, Selection, label_counts, predicted_mask, rank_rows, select_rows
from vgclip.serve.engine import ScoringEngine
from vgclip.serve.report_folder import thumbnail_jpeg
from vgclip.tagging.resume import weights_sha256

__all__ = ["MAX_K", "MAX_LIMIT", "MAX_QUERY_CHARS", "CollectionRequest", "add_collection_routes",
           "check_collection", "query_embedding"]  # fmt: skip

MAX_LIMIT = 200  # rows per page
MAX_K = 1000  # rows a text query ranks
MAX_QUERY_CHARS = 300
TOP_SCORES = 5  # scores shown per row on a page
QUERY_TEMPLATE = ("{}",)  # a free-text query is encoded as written (labels get "a photo of a {}.")
PLACEHOLDER_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="256" height="192" viewBox="0 0 256 192">'
    '<rect width="256" height="192" fill="#eef0f3"/><text x="128" y="100" font-family="sans-serif" font-size="15" '
    'fill="#667085" text-anchor="middle">no local file</text></svg>'
)


class CollectionRequest(BaseModel):
    """One page of the collection: which rows (labels at thresholds, a text query) and where in them."""

    offset: int = Field(0, ge=0, description="first row of the page, in the filtered (or ranked) rows")
    limit: int = Field(48, ge=1, le=MAX_LIMIT, description="rows per page")
    labels: list[str] = Field([], description="keep rows whose predicted set holds these labels")
    match: Literal["all", "any"] = "all"
    rule: Literal["thresholds", "top"] | None = Field(None, description="predicted set: score >= threshold, or "
                                                      "the top label; default: as the predict run did")  # fmt: skip
    thresholds: dict[str, float] = Field({}, description="per label; labels not given keep the run's threshold")
    query: str = Field("", max_length=MAX_QUERY_CHARS, description="free text: rank rows by cosine to it")
    k: int = Field(100, ge=1, le=MAX_K, description="how many of the best matches a query keeps")


@torch.inference_mode()
def query_embedding(model: torch.nn.Module, tokenizer: Any, text: str, device: Any = "cpu") -> np.ndarray:
    """The unit text embedding [D] a query is ranked by (the text as written, no prompt template)."""
    emb = build_text_classifier(model, tokenizer, [text], QUERY_TEMPLATE, device)
    return emb[0].float().cpu().numpy()


def check_collection(collection: Collection, engine: ScoringEngine, checkpoint: Path) -> list[str]:
    """Refuse a collection whose embeddings the served run cannot query (another dimension); a warning (one
    line) when it was tagged with other weights (summary.json's `weights_sha256`, else its checkpoint path)."""
    dim = len(query_embedding(engine.model, engine.tokenizer, "a photo.", engine.device))
    if dim != collection.dim:
        raise VgclipError(f"{collection.folder}: its embeddings have {collection.dim} dimensions, the run "
                          f"{checkpoint} embeds in {dim}: serve it with the checkpoint that tagged it")  # fmt: skip
    tagged, digest = collection.summary.get("checkpoint"), collection.summary.get("weights_sha256")
    if isinstance(digest, str) and digest:
        served = weights_sha256(checkpoint)
        same = not served or served == digest
    else:
        same = not isinstance(tagged, str) or Path(tagged).resolve() == Path(checkpoint).resolve()
    if same:
        return []
    return [f"the collection was tagged with other weights ({tagged}) than the served {checkpoint}: text "
            "queries rank its embeddings with another model's text tower"]  # fmt: skip


def applied_thresholds(collection: Collection, request: CollectionRequest) -> np.ndarray | None:
    """Per-label thresholds of a request (the run's for labels it does not give), None for the top-label rule;
    422 for an unknown label or a rule the run cannot back."""
    unknown = [lab for lab in [*request.labels, *request.thresholds] if lab not in collection.labels]
    if unknown:
        named = ", ".join(collection.labels[:20]) + (", ..." if len(collection.labels) > 20 else "")
        raise HTTPException(422, f"no label {unknown[0]!r} in the collection (labels: {named})")
    rule = request.rule or ("top" if collection.thresholds is None else "thresholds")
    if rule == "top":
        return None
    base = collection.thresholds or [collection.global_threshold] * len(collection.labels)
    values = [request.thresholds.get(lab, base[i]) for i, lab in enumerate(collection.labels)]
    missing = [lab for lab, v in zip(collection.labels, values) if v is None]
    if missing:
        raise HTTPException(422, f"the predict run had no thresholds: give one for {missing[0]!r} (or rule 'top')")
    if not all(math.isfinite(v) for v in values):
        raise HTTPException(422, "thresholds must be finite numbers")
    return np.asarray(values, np.float64)


def row_item(collection: Collection, row: int, predicted: np.ndarray, similarity: float | None) -> dict[str, Any]:
    """What a page shows of a row: names, size, predicted labels, its best scores, the thumbnail URL."""
    scores = collection.scores[row]
    best = np.argsort(-scores, kind="stable")[:TOP_SCORES]
    path = collection.paths[row]
    key = collection.keys[row]
    return {"row": row, "key": key, "path": path, "name": Path(path).name if path else key,
            "width": int(collection.widths[row]), "height": int(collection.heights[row]),
            "predicted": [collection.labels[c] for c in np.flatnonzero(predicted)],
            "scores": {collection.labels[c]: round(float(scores[c]), 6) for c in best},
            "similarity": None if similarity is None else round(similarity, 6),
            "thumb": f"/api/collection/thumb/{row}"}  # fmt: skip


def page_of(collection: Collection, request: CollectionRequest, query: np.ndarray | None) -> dict[str, Any]:
    """The answer to POST /api/collection/items (numpy only: run in a worker thread)."""
    limits = applied_thresholds(collection, request)
    rows = select_rows(collection, Selection(tuple(request.labels), request.match,
                                             None if limits is None else tuple(limits)))  # fmt: skip
    sims = None
    if query is not None:
        rows, sims = rank_rows(collection, query, rows, request.k)
    page = rows[request.offset : request.offset + request.limit]
    top = collection.top_labels()[page] if limits is None else None
    mask = predicted_mask(collection.scores[page], limits, top)
    items = [row_item(collection, int(r), m, None if sims is None else float(sims[request.offset + i]))
             for i, (r, m) in enumerate(zip(page, mask))]  # fmt: skip
    return {"total": int(len(rows)), "offset": request.offset, "limit": request.limit,
            "rule": "top" if limits is None else "thresholds", "match": request.match, "labels": request.labels,
            "thresholds": None if limits is None else dict(zip(collection.labels, limits.tolist())),
            "counts": dict(zip(collection.labels, label_counts(collection, limits))),
            "query": request.query.strip() or None, "k": request.k if query is not None else None,
            "items": items}  # fmt: skip


class QueryCache:
    """Text queries encoded on the engine's model thread, the last few kept (paging a query encodes it once)."""

    def __init__(self, engine: ScoringEngine, size: int = 64) -> None:
        self.engine, self.size = engine, size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    async def embedding(self, text: str) -> np.ndarray:
        """The query's unit embedding (cached)."""
        if text not in self._cache:
            e = self.engine
            loop = asyncio.get_running_loop()
            self._cache[text] = await loop.run_in_executor(e.pool, query_embedding, e.model, e.tokenizer, text,
                                                           e.device)  # fmt: skip
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(text)
        return self._cache[text]


def collection_info(collection: Collection | None) -> dict[str, Any]:
    """GET /api/collection: what the page starts from."""
    if collection is None:
        return {"available": False, "reason": "start `vgclip serve` with --collection OUT (a `vgclip predict "
                "--out` folder)"}  # fmt: skip
    s, limits = collection.summary, collection.thresholds
    return {"available": True, "folder": str(collection.folder), "count": len(collection),
            "labels": collection.labels, "score": collection.score,
            "thresholds": None if limits is None else dict(zip(collection.labels, limits)),
            "global_threshold": collection.global_threshold, "templates": s.get("templates"), "crops": s.get("crops"),
            "checkpoint": s.get("checkpoint"), "dim": collection.dim, "warnings": collection.warnings,
            "max_limit": MAX_LIMIT, "max_k": MAX_K}  # fmt: skip


def add_collection_routes(app: FastAPI, engine: ScoringEngine, collection: Collection | None, static: Path) -> None:
    """The Collection page (/collection) and its API (see the module docstring)."""
    queries = QueryCache(engine)

    def need() -> Collection:
        if collection is None:
            raise HTTPException(404, "no collection: start `vgclip serve` with --collection OUT (predict's --out)")
        return collection

    @app.get("/collection", include_in_schema=False)
    def collection_page() -> FileResponse:
        return FileResponse(static / "collection.html")

    @app.get("/api/collection")
    def info() -> dict[str, Any]:
        """Labels, score kind, the predict run's thresholds and the number of rows of the served collection."""
        return collection_info(collection)

    @app.post("/api/collection/items")
    async def items(body: CollectionRequest) -> dict[str, Any]:
        """One page of rows whose predicted set holds `labels` (at `thresholds`), ranked by `query` when given."""
        data = need()
        text = body.query.strip()
        query = await queries.embedding(text) if text else None
        return await run_in_threadpool(page_of, data, body, query)

    @app.get("/api/collection/row")
    def row(key: str) -> dict[str, Any]:
        """One row by its key, with every label's score."""
        data = need()
        number = data.index.get(key)
        if number is None:
            raise HTTPException(404, f"no row with key {key!r} in the collection")
        item = row_item(data, number, predicted_mask(data.scores[number : number + 1], data.thresholds)[0], None)
        return {**item, "scores": dict(zip(data.labels, map(float, data.scores[number])))}

    @app.get("/api/collection/thumb/{row}")
    async def thumb(row: str) -> Response:
        """A thumbnail of a collection row's own local file; a placeholder when the row has none."""
        data = need()
        number = int(row) if row.isdigit() and len(row) < 12 else -1
        if not 0 <= number < len(data):
            raise HTTPException(404, f"no row {row[:40]!r} in the collection")
        path = data.local_file(number)
        if path is not None:
            try:
                jpeg = await run_in_threadpool(thumbnail_jpeg, path)
                return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
            except BadImageError:
                pass  # unreadable now: the placeholder says there is nothing to show
        return Response(PLACEHOLDER_SVG, media_type="image/svg+xml", headers={"X-Vgclip-Placeholder": "1"})
