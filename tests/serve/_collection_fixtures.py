"""A `vgclip predict --out` folder written directly (pyarrow / numpy), in the exact layout predict writes, for the
Collection page tests and the 100,000-row timing: predictions.parquet, embeddings/img_emb + metadata parts,
summary.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["CollectionRows", "random_rows", "write_collection"]


@dataclass
class CollectionRows:
    """What a collection holds, row by row (the test's reference)."""

    keys: list[str]
    paths: list[str | None]
    scores: np.ndarray  # [N, C] float32
    embeddings: np.ndarray  # [N, D] float16, unit rows
    widths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    heights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))


def random_rows(rows: int, labels: int, dim: int, seed: int = 0,
                paths: list[str | None] | None = None) -> CollectionRows:  # fmt: skip
    """`rows` rows of uniform scores in [0, 1) and random unit float16 embeddings; keys `img000000...`."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sizes = rng.integers(64, 2000, (2, rows)).astype(np.int32)
    return CollectionRows([f"img{i:06d}" for i in range(rows)], paths if paths is not None else [None] * rows,
                          rng.random((rows, labels), dtype=np.float32), emb.astype(np.float16), sizes[0], sizes[1])


def _predicted(scores: np.ndarray, labels: list[str], thresholds: dict[str, Any] | None) -> list[list[str]]:
    if thresholds is None:
        return [[labels[int(i)]] for i in np.argmax(scores, axis=1)]
    limits = np.array([thresholds.get(lab, thresholds.get("global")) for lab in labels], np.float64)
    mask = scores >= limits[None, :]
    return [[labels[c] for c in np.flatnonzero(m)] for m in mask]


def write_collection(folder: Path, data: CollectionRows, labels: list[str], *, score: str = "sigmoid",
                     thresholds: dict[str, float] | None = None, checkpoint: str | None = None,
                     weights_sha256: str = "", part_rows: int = 1000) -> Path:  # fmt: skip
    """Write `data` as predict's --out folder; `thresholds`: label -> value (and `global` for the others), or
    None (the top label is predicted), written as predict writes them (`per_label`, `global`, `source`)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(data.keys)
    widths = data.widths if len(data.widths) == n else np.full(n, 64, np.int32)
    heights = data.heights if len(data.heights) == n else np.full(n, 48, np.int32)
    shards = [None if p else "shard-00000.tar" for p in data.paths]
    columns = {"key": pa.array(data.keys, pa.string()), "path": pa.array(data.paths, pa.string()),
               "shard": pa.array(shards, pa.string()), "width": pa.array(widths, pa.int32()),
               "height": pa.array(heights, pa.int32()),
               "labels": pa.array(_predicted(data.scores, labels, thresholds), pa.list_(pa.string()))}  # fmt: skip
    for i, label in enumerate(labels):
        columns[f"score:{label}"] = pa.array(data.scores[:, i], pa.float32())
    pq.write_table(pa.table(columns), folder / "predictions.parquet")
    (folder / "embeddings" / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "embeddings" / "metadata").mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, n, part_rows)):
        stop = min(n, start + part_rows)
        np.save(folder / "embeddings" / "img_emb" / f"img_emb_{part:06d}.npy", data.embeddings[start:stop])
        keys = data.keys[start:stop]
        meta = pa.table({"key": pa.array(keys, pa.string()),
                         "image_path": pa.array([p or k for p, k in zip(data.paths[start:stop], keys)], pa.string()),
                         "width": pa.array(widths[start:stop], pa.int32()),
                         "height": pa.array(heights[start:stop], pa.int32())})  # fmt: skip
        pq.write_table(meta, folder / "embeddings" / "metadata" / f"metadata_{part:06d}.parquet")
    per_label = None if thresholds is None else {k: v for k, v in thresholds.items() if k != "global"}
    facts = {"per_label": per_label or None, "global": (thresholds or {}).get("global"), "source": "test"}
    summary = {"checkpoint": checkpoint, "weights_sha256": weights_sha256, "labels": labels, "score": score,
               "templates": "single", "crops": "centre", "thresholds": facts,
               "counts": {"scored": n, "skipped": 0}}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return folder
