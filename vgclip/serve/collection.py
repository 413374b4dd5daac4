"""A `vgclip predict --out OUT` folder, read once for the Collection page: scores, rows, embeddings.

What is read (the predict output contract):

- `OUT/summary.json`: `labels`, `score` (softmax | sigmoid | cosine), `thresholds` (per label and `global`, or
  null: the top label is predicted), `checkpoint`;
- `OUT/predictions.parquet`: only `key`, `path`, `width`, `height` and the `score:<label>` columns (into one
  float32 array [N, C], so filtering 100,000 rows is a numpy comparison);
- `OUT/embeddings/img_emb/img_emb_*.npy` (float16 unit image embeddings, memory-mapped, never copied whole) and
  `OUT/embeddings/metadata/metadata_*.parquet` (their `key`s, the same order): parts sorted by name give the rows.

Anything that is not such a folder, or parts that disagree (row counts, keys, dimensions, labels), is one
`VgclipError` line naming the file.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vgclip.errors import VgclipError

__all__ = ["SCORE_PREFIX", "Collection", "EmbeddingPart", "Selection", "embeddings_folder", "label_counts",
           "load_collection", "predicted_mask", "rank_rows", "select_rows", "summary_thresholds"]  # fmt: skip

SCORE_PREFIX = "score:"
SCORE_KINDS = ("softmax", "sigmoid", "cosine")
ROW_COLUMNS = ("key", "path", "width", "height")
SEARCH_CHUNK_VALUES = 4_194_304  # embedding values converted to float32 at a time when ranking (16 MiB)


@dataclass(frozen=True)
class EmbeddingPart:
    """One `img_emb_*.npy` part: its rows `start .. start + len(array)` of the collection (memory-mapped)."""

    path: Path
    start: int
    array: np.ndarray  # [n, D] float16, np.load(mmap_mode="r")


@dataclass
class Collection:
    """A predict output folder in memory: per-row facts and scores; embeddings stay on disk (memory-mapped)."""

    folder: Path
    labels: list[str]
    score: str
    thresholds: list[float] | None  # per label, as predict applied them (None: the top label is predicted)
    global_threshold: float | None
    summary: dict[str, Any]
    keys: list[str]
    paths: list[str | None]
    widths: np.ndarray  # [N] int32
    heights: np.ndarray  # [N] int32
    scores: np.ndarray  # [N, C] float32, columns in `labels` order
    parts: list[EmbeddingPart]
    index: dict[str, int] = field(default_factory=dict)  # key -> row
    warnings: list[str] = field(default_factory=list)  # about serving it (set at start: another checkpoint, ...)
    _top: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        """Dimension of the stored image embeddings."""
        return int(self.parts[0].array.shape[1]) if self.parts else 0

    def stored_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """The float16 embeddings [len(rows), D] of sorted row numbers: a view of the memory map when they are
        consecutive rows of one part, else gathered from the parts that hold them."""
        pieces = []
        for part in self.parts:
            lo, hi = np.searchsorted(rows, [part.start, part.start + len(part.array)])
            if hi <= lo:
                continue
            first, last = int(rows[lo]) - part.start, int(rows[hi - 1]) - part.start
            consecutive = last - first == hi - lo - 1
            pieces.append(part.array[first : last + 1] if consecutive else part.array[rows[lo:hi] - part.start])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty((0, self.dim), np.float16)

    def top_labels(self) -> np.ndarray:
        """Each row's top label (column number), computed once."""
        if self._top is None:
            self._top = np.argmax(self.scores, axis=1)
        return self._top

    def local_file(self, row: int) -> Path | None:
        """The row's image as an existing local file, or None (a URL or shard sample, or a file now gone)."""
        text = self.paths[row]
        if not text or "://" in text:
            return None
        path = Path(text)
        return path if path.is_absolute() and path.is_file() else None


@dataclass(frozen=True)
class Selection:
    """Which rows a page asks for: those whose predicted set holds `labels` (all of them, or any), the predicted
    set being score >= threshold per label, or the top label when `thresholds` is None."""

    labels: tuple[str, ...] = ()
    match: str = "all"
    thresholds: tuple[float, ...] | None = None  # one per collection label, in its order


def _fail(path: Path, what: str) -> VgclipError:
    return VgclipError(f"{path}: {what}")


def _read_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    if not folder.is_dir():
        raise _fail(folder, "no such collection folder (the --out folder of `vgclip predict`)")
    if not path.is_file():
        raise _fail(folder, "not a `vgclip predict --out` folder: it has no summary.json")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(path, f"cannot read ({exc})") from None
    labels = info.get("labels") if isinstance(info, dict) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise _fail(path, "has no list of labels")
    if len(set(labels)) != len(labels):
        raise _fail(path, "lists a label twice")
    if info.get("score") not in SCORE_KINDS:
        raise _fail(path, f"score must be one of {', '.join(SCORE_KINDS)}, got {info.get('score')!r}")
    return info


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def summary_thresholds(info: dict[str, Any], path: Path) -> tuple[list[float] | None, float | None]:
    """(per-label thresholds, global) from summary.json's `thresholds`, as predict writes it: `{"per_label":
    {label: value} | null, "global": value | null, "source": ...}` (a label it does not name gets `global`;
    neither: the top label is predicted, (None, None)); a plain mapping label -> value (+ `global`) is read too."""
    given = info.get("thresholds")
    if given is None:
        return None, None
    if not isinstance(given, dict):
        raise _fail(path, "thresholds must be null or a mapping label -> threshold")
    glob = _number(given.get("global"))
    if "per_label" in given or "per_class" in given:
        per_label = given.get("per_label", given.get("per_class")) or {}
        if not isinstance(per_label, dict):
            raise _fail(path, "thresholds.per_label must be null or a mapping label -> threshold")
        if not per_label and glob is None:
            return None, None
    else:
        per_label = given
    values = []
    for label in info["labels"]:
        value = _number(per_label.get(label)) if label in per_label else glob
        if value is None:
            raise _fail(path, f"thresholds give no number for {label!r} and no global threshold")
        values.append(value)
    return values, glob


def embeddings_folder(folder: Path, info: dict[str, Any]) -> Path:
    """Where a collection's embeddings are: OUT/embeddings, or for a re-tag folder (`vgclip predict --embeddings
    OUT`: new labels, no embeddings of its own) those of the folder it re-tagged (`retag_of`)."""
    if (folder / "embeddings").is_dir() or not isinstance(info.get("retag_of"), str):
        return folder / "embeddings"
    return Path(info["retag_of"]) / "embeddings"


def _read_predictions(folder: Path, labels: list[str]) -> pa.Table:
    path = folder / "predictions.parquet"
    if not path.is_file():
        csv_only = (folder / "predictions.csv").exists()
        other = " (only predictions.csv: rerun predict without --format csv)" if csv_only else ""
        raise _fail(folder, f"not a `vgclip predict --out` folder: it has no predictions.parquet{other}")
    try:
        names = pq.read_schema(path).names
        wanted = [*ROW_COLUMNS, *(SCORE_PREFIX + label for label in labels)]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise _fail(path, f"has no column {missing[0]!r} (summary.json lists {len(labels)} labels)")
        return pq.read_table(path, columns=wanted)
    except (OSError, pa.ArrowException) as exc:
        raise _fail(path, f"cannot read ({exc})") from None


def _sorted_parts(folder: Path, pattern: str) -> list[Path]:
    # By name, numbers compared as numbers: img_emb_2 before img_emb_10 (zero-padded names sort the same).
    def order(path: Path) -> list[Any]:
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name)]

    return sorted(folder.glob(pattern), key=order)


def _open_embeddings(folder: Path, count: int) -> tuple[list[EmbeddingPart], list[pa.ChunkedArray]]:
    emb_dir, meta_dir = folder / "img_emb", folder / "metadata"
    arrays, metas = _sorted_parts(emb_dir, "img_emb_*.npy"), _sorted_parts(meta_dir, "metadata_*.parquet")
    if not arrays:
        raise _fail(emb_dir, "has no img_emb_*.npy parts (the embeddings of `vgclip predict --out`)")
    if len(arrays) != len(metas):
        raise _fail(folder, f"{len(arrays)} img_emb parts but {len(metas)} metadata parts")
    parts, keys, start = [], [], 0
    for npy, meta in zip(arrays, metas):
        try:
            array = np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise _fail(npy, f"cannot read ({exc})") from None
        try:
            meta_keys = pq.read_table(meta, columns=["key"]).column("key")
        except (OSError, KeyError, pa.ArrowException) as exc:
            raise _fail(meta, f"cannot read its key column ({exc})") from None
        if array.ndim != 2 or array.dtype != np.float16:
            raise _fail(npy, f"must be float16 [rows, dim], got {array.dtype} {list(array.shape)}")
        if parts and array.shape[1] != parts[0].array.shape[1]:
            raise _fail(npy, f"has {array.shape[1]} dimensions, {parts[0].path.name} has {parts[0].array.shape[1]}")
        if len(meta_keys) != len(array):
            raise _fail(meta, f"has {len(meta_keys)} rows, {npy.name} has {len(array)}")
        parts.append(EmbeddingPart(npy, start, array))
        keys.append(meta_keys)
        start += len(array)
    if start != count:
        raise _fail(folder, f"has {start} embeddings but predictions.parquet has {count} rows")
    return parts, keys


def load_collection(folder: str | Path) -> Collection:
    """Read a predict output folder (see the module docstring); one-line `VgclipError` when it is not one."""
    folder = Path(folder)
    info = _read_summary(folder)
    labels = list(info["labels"])
    thresholds, glob = summary_thresholds(info, folder / "summary.json")
    table = _read_predictions(folder, labels)
    embeddings = embeddings_folder(folder, info)
    parts, meta_keys = _open_embeddings(embeddings, table.num_rows)
    keys = table.column("key").combine_chunks()
    at = 0
    for chunk, part in zip(meta_keys, parts):
        if not chunk.combine_chunks().equals(keys.slice(at, len(chunk)).cast(chunk.type)):
            raise _fail(embeddings, f"the keys of {part.path.name}'s metadata are not those of "
                        f"predictions.parquet rows {at}..{at + len(chunk) - 1}")  # fmt: skip
        at += len(chunk)
    scores = np.column_stack([table.column(SCORE_PREFIX + lab).to_numpy().astype(np.float32) for lab in labels])
    key_list = keys.to_pylist()
    index = {k: row for row, k in enumerate(key_list)}
    if len(index) != len(key_list):
        raise _fail(folder / "predictions.parquet", "a key names two rows")
    return Collection(folder, labels, info["score"], thresholds, glob, info, key_list,
                      table.column("path").to_pylist(), _ints(table, "width"), _ints(table, "height"),
                      scores, parts, index)  # fmt: skip


def _ints(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.int32)


def predicted_mask(scores: np.ndarray, thresholds: Any | None, top: np.ndarray | None = None) -> np.ndarray:
    """[n, C] booleans: score >= threshold per label, or only each row's top label (`top`, else the argmax) when
    there are no thresholds."""
    if thresholds is None:
        mask = np.zeros(scores.shape, bool)
        mask[np.arange(len(scores)), np.argmax(scores, axis=1) if top is None else top] = True
        return mask
    return scores >= np.asarray(thresholds, np.float64)[None, :]


def select_rows(collection: Collection, selection: Selection) -> np.ndarray:
    """Sorted row numbers whose predicted set holds the selection's labels (every row when it names none)."""
    if not selection.labels:
        return np.arange(len(collection))
    columns = [collection.labels.index(lab) for lab in selection.labels]
    if selection.thresholds is None:  # one predicted label per row: its top one
        if selection.match == "all" and len(columns) > 1:
            return np.empty(0, np.int64)
        return np.flatnonzero(np.isin(collection.top_labels(), columns))
    limits = np.asarray(selection.thresholds, np.float64)[columns]
    hits = collection.scores[:, columns] >= limits[None, :]
    return np.flatnonzero(hits.all(axis=1) if selection.match == "all" else hits.any(axis=1))


def rank_rows(collection: Collection, query: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cosines) of the `k` rows among sorted `rows` most similar to the unit vector `query`, best first
    (ties: the earlier row first). Embeddings are read a chunk at a time and converted to float32 by torch
    (vectorised, several threads: about 4x numpy's float16 conversion), never all at once."""
    vector = torch.from_numpy(np.asarray(query, np.float32).reshape(-1))
    sims = np.empty(len(rows), np.float32)
    step = max(1, SEARCH_CHUNK_VALUES // max(collection.dim, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the memory map is read-only: it is only read
        for lo in range(0, len(rows), step):
            block = torch.from_numpy(collection.stored_embeddings(rows[lo : lo + step]))
            sims[lo : lo + len(block)] = (block.float() @ vector).numpy()
    k = min(k, len(rows))
    if k == 0:
        return rows[:0], sims[:0]
    top = np.argpartition(-sims, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
    order = top[np.lexsort((top, -sims[top]))]
    return rows[order], sims[order]


def label_counts(collection: Collection, thresholds: np.ndarray | None) -> list[int]:
    """How many rows of the collection have each label in their predicted set."""
    if thresholds is None:
        return np.bincount(collection.top_labels(), minlength=len(collection.labels)).tolist()
    return (collection.scores >= np.asarray(thresholds, np.float64)[None, :]).sum(axis=0).tolist()
