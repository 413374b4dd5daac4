"""The files of a tagging job (`vgclip predict --out OUT`), written atomically part by part, merged at the end.

```
OUT/parts/predictions-r{rank:02d}-{part:06d}.parquet   one part's rows (written last: the part is complete)
OUT/parts/skipped-r{rank:02d}-{part:06d}.csv            one part's skips
OUT/embeddings/img_emb/img_emb_{part:06d}.npy           float16 unit image embeddings (clip-retrieval layout)
OUT/embeddings/metadata/metadata_{part:06d}.parquet     key, image_path, width, height (+ path, shard), same rows
OUT/predictions.parquet (or .csv)                       every part's rows, in part order
OUT/skipped.csv                                         key, reason, detail, shard
```
Part numbers are global (not per rank), zero-padded: file names never collide between ranks and sort in
row order, which is how clip-retrieval's embedding_reader / autofaiss pair `.npy` and metadata files.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vgclip.io import atomic_path, atomic_write_text
from vgclip.tagging.dataset import Skip

__all__ = ["PREDICTIONS", "SKIPPED", "PartResult", "done_parts", "merge_predictions", "merge_skipped",
           "predictions_schema", "predictions_table", "read_part_skips", "score_column",
           "write_part", "write_predictions"]

PREDICTIONS = "predictions"
SKIPPED = "skipped.csv"
SKIP_COLUMNS = ("key", "reason", "detail", "shard")
_PART = re.compile(r"^predictions-r(\d+)-(\d+)\.parquet$")


@dataclass
class PartResult:
    """One unit's results: a row per scored image (embeddings float16 [n, D], scores float32 [n, C]) and its skips."""

    index: int
    keys: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    shards: list[str | None] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    scores: np.ndarray | None = None
    chosen: list[list[str]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.keys)


def score_column(label: str) -> str:
    """The predictions column of a label's score: `score:<label>` (label text as given, spaces kept)."""
    return f"score:{label}"


def predictions_schema(labels: Sequence[str]) -> pa.Schema:
    """key, path, shard, width, height, labels, then score:<label> per label (float32)."""
    fields = [pa.field("key", pa.string()), pa.field("path", pa.string()), pa.field("shard", pa.string()),
              pa.field("width", pa.int32()), pa.field("height", pa.int32()),
              pa.field("labels", pa.list_(pa.string()))]
    return pa.schema(fields + [pa.field(score_column(label), pa.float32()) for label in labels])


def predictions_table(part: PartResult, labels: Sequence[str]) -> pa.Table:
    """One part's rows as an Arrow table of `predictions_schema(labels)`."""
    scores = part.scores if part.scores is not None else np.zeros((0, len(labels)), np.float32)
    columns = [part.keys, part.paths, part.shards, part.widths, part.heights, part.chosen]
    columns += [scores[:, i].astype(np.float32) for i in range(len(labels))]
    schema = predictions_schema(labels)
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema=schema)


def part_file(out: Path, kind: str, rank: int, index: int) -> Path:
    """OUT/parts/{kind}-r{rank:02d}-{index:06d}.{parquet|csv}."""
    suffix = "parquet" if kind == PREDICTIONS else "csv"
    return out / "parts" / f"{kind}-r{rank:02d}-{index:06d}.{suffix}"


def embedding_files(out: Path, index: int) -> tuple[Path, Path]:
    """(img_emb .npy, metadata .parquet) of part `index`, in clip-retrieval's layout."""
    emb = out / "embeddings"
    return emb / "img_emb" / f"img_emb_{index:06d}.npy", emb / "metadata" / f"metadata_{index:06d}.parquet"


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_part(out: Path, rank: int, part: PartResult, labels: Sequence[str]) -> None:
    """Write one part's files; the predictions part last, so that its presence means the part is complete.
    A part without rows has no embeddings files (clip-retrieval's readers expect non-empty arrays)."""
    if part.rows:
        emb_path, meta_path = embedding_files(out, part.index)
        with atomic_path(emb_path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(part.embeddings, dtype=np.float16))
        image_path = [p if p is not None else k for k, p in zip(part.keys, part.paths)]
        meta = pa.table({"key": pa.array(part.keys, pa.string()), "image_path": pa.array(image_path, pa.string()),
                         "width": pa.array(part.widths, pa.int32()), "height": pa.array(part.heights, pa.int32()),
                         "path": pa.array(part.paths, pa.string()), "shard": pa.array(part.shards, pa.string())})
        _write_parquet(meta, meta_path)
    atomic_write_text(part_file(out, "skipped", rank, part.index), skips_csv(part.skips, header=True))
    _write_parquet(predictions_table(part, labels), part_file(out, PREDICTIONS, rank, part.index))


def skips_csv(skips: Sequence[Skip], header: bool) -> str:
    """Skips as CSV text (key, reason, detail, shard)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(SKIP_COLUMNS)
    writer.writerows((s.key, s.reason, s.detail, s.shard or "") for s in skips)
    return buf.getvalue()


def done_parts(out: Path) -> dict[int, Path]:
    """Part number -> its complete predictions part, for every part any rank finished."""
    found: dict[int, Path] = {}
    folder = out / "parts"
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            match = _PART.match(path.name)
            if match:
                found[int(match.group(2))] = path
    return found


def read_part_skips(out: Path, parts: dict[int, Path]) -> Iterator[Skip]:
    """The skips of the finished parts, in part order."""
    for index in sorted(parts):
        rank = int(_PART.match(parts[index].name).group(1))
        path = part_file(out, "skipped", rank, index)
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                yield Skip(row["key"], row["reason"], row["detail"], row["shard"] or None)


def merge_skipped(out: Path, parts: dict[int, Path]) -> Counter:
    """OUT/skipped.csv from the parts' skips (atomic); the count of each reason."""
    counts: Counter = Counter()
    with atomic_path(out / SKIPPED) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(skips_csv([], header=True))
            for skip in read_part_skips(out, parts):
                counts[skip.reason] += 1
                fh.write(skips_csv([skip], header=False))
    return counts


def write_predictions(target: Path, tables: Iterable[pa.Table], labels: Sequence[str], fmt: str = "parquet") -> int:
    """Write `tables` (of `predictions_schema(labels)`) one after the other into `target` (parquet, or CSV
    with each row's labels joined by '|'), atomically, holding one table at a time; the row count."""
    schema = predictions_schema(labels)
    rows = 0
    with atomic_path(target) as tmp:
        if fmt == "parquet":
            with pq.ParquetWriter(tmp, schema) as writer:
                for table in tables:
                    rows += table.num_rows
                    writer.write_table(table)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(schema.names)
                for table in tables:
                    rows += table.num_rows
                    for row in table.to_pylist():
                        row["labels"] = "|".join(row["labels"])
                        writer.writerow(["" if v is None else v for v in row.values()])
    return rows


def merge_predictions(out: Path, parts: dict[int, Path], labels: Sequence[str], fmt: str = "parquet") -> int:
    """OUT/predictions.parquet (or .csv) from the parts in part order, streamed one part at a time; row count."""
    schema = predictions_schema(labels)
    tables = (pq.read_table(parts[index], schema=schema) for index in sorted(parts))
    return write_predictions(out / f"{PREDICTIONS}.{fmt}", tables, labels, fmt)
