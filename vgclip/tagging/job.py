"""`vgclip predict` over a collection: list the inputs, decode them in DataLoader workers, encode, score and
write each unit as a part (or keep the rows, without `--out`), then merge the parts and write summary.json.

With --out, scores are computed from the float16 embeddings that are stored (`embeddings/`), so re-tagging
them (`tagging/retag.py`) gives the scores encoding again gives; printed scores come from the float32
embeddings, as `vgclip serve` computes them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from vgclip.data.views import encode_views, eval_transform, unit_image_encoder
from vgclip.errors import VgclipError
from vgclip.eval.tagging import LabelScorer, PredictSettings, label_scorer
from vgclip.load import load_checkpoint
from vgclip.tagging.dataset import DecodedBatch, Skip, TaggingDataset, make_loader
from vgclip.tagging.inputs import Inputs, Unit, list_inputs
from vgclip.tagging.ranks import Ranks, barrier, broadcast_text, join_ranks, leave_ranks
from vgclip.tagging.resume import JobSettings, prepare_folder, weights_sha256
from vgclip.tagging.summary_file import RunFacts, write_summary
from vgclip.tagging.writer import PartResult, done_parts, merge_predictions, merge_skipped, write_part

__all__ = ["STDOUT_LIMIT", "TaggingResult", "TaggingSettings", "default_workers", "run_tagging"]

STDOUT_LIMIT = 500  # images shown on stdout without --out


def default_workers() -> int:
    """Decoding workers by default: one per CPU this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


@dataclass(frozen=True)
class TaggingSettings:
    """One `vgclip predict` job: the model and label set, the inputs, where and how to write."""

    checkpoint: Path
    labels: tuple[str, ...]
    predict: PredictSettings
    images: tuple[str, ...] = ()
    list_file: Path | None = None
    data: tuple[str, ...] = ()
    out: Path | None = None
    fmt: str = "parquet"
    workers: int = 2
    batch_size: int = 32
    part_size: int = 5000
    overwrite: bool = False
    quiet: bool = False
    device: str | None = None


@dataclass
class TaggingResult:
    """What a job did: rows scored and skips by reason (all parts), this session's rate; without --out the
    rows (PartResults) and skips themselves."""

    scored: int
    skipped: Counter
    images_per_s: float
    parts: list[PartResult] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    summary: Path | None = None


@dataclass
class _Model:
    """The loaded run: model (channels-last, eval), eval transform for the crops, scorer of the label set."""

    model: torch.nn.Module
    transform: object
    scorer: LabelScorer
    image_size: int


def load_model(settings: TaggingSettings, device: torch.device) -> _Model:
    """Load the checkpoint, build the crops' eval transform and the label set's scorer."""
    model, image_transform, tokenizer = load_checkpoint(settings.checkpoint)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    transform = eval_transform(image_transform, settings.predict.crops)
    size = int(getattr(image_transform, "image_size", 224))
    sample = torch.zeros(1, 3, size, size, device=device)
    scorer = label_scorer(model, tokenizer, settings.labels, settings.predict, device, sample)
    return _Model(model, transform, scorer, size)


class _Encoder:
    """Decoded batches -> float16 unit embeddings, gathered per unit until its last batch."""

    def __init__(self, loaded: _Model, device: torch.device, stored: bool) -> None:
        self.loaded, self.device, self.stored = loaded, device, stored
        self.encode = unit_image_encoder(loaded.model)
        self.open: dict[int, tuple[PartResult, list[np.ndarray]]] = {}

    @torch.inference_mode()
    def add(self, batch: DecodedBatch) -> PartResult | None:
        """Take one batch; the unit's finished PartResult (scored) when this was its last batch."""
        part, chunks = self.open.setdefault(batch.unit, (PartResult(batch.unit), []))
        if batch.images is not None:
            images = batch.images.to(self.device, non_blocking=True)
            if not batch.normalized:
                images = self.loaded.transform.normalize(images)
            chunks.append(encode_views(self.encode, images).float().cpu().numpy())
            part.keys += batch.keys
            part.paths += batch.paths
            part.shards += [batch.shard] * len(batch.keys)
            part.widths += batch.widths
            part.heights += batch.heights
        part.skips += batch.skips
        if not batch.last:
            return None
        del self.open[batch.unit]
        return score_part(part, chunks, self.loaded.scorer, self.stored)


def score_part(part: PartResult, chunks: list[np.ndarray], scorer: LabelScorer, stored: bool) -> PartResult:
    """Fill a part's float16 embeddings, its scores and labels. `stored`: score the float16 embeddings that are
    written (a re-tag reads them back: the same scores); else the float32 ones (printed, as `vgclip serve`)."""
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    part.embeddings = emb.astype(np.float16)
    scored = part.embeddings.astype(np.float32) if stored else emb
    scores = scorer.scores(torch.from_numpy(scored)) if chunks else np.zeros((0, len(scorer.labels)))
    part.scores = scores.astype(np.float32)
    part.chosen = [scorer.chosen(row) for row in scores]
    return part


def _folder_ready(settings: TaggingSettings, job: JobSettings, ranks: Ranks) -> dict[int, Path]:
    """Rank 0 checks / prepares --out (refusals reach every rank as the same one line); the done parts."""
    error = ""
    if ranks.is_main:
        try:
            prepare_folder(settings.out, job, settings.overwrite)
        except VgclipError as exc:
            error = str(exc)
    error = broadcast_text(error, ranks)
    if error:
        raise VgclipError(error)
    return done_parts(settings.out)


def _job_settings(settings: TaggingSettings, inputs: Inputs, image_size: int) -> JobSettings:
    p = settings.predict
    return JobSettings(str(Path(settings.checkpoint).resolve()), weights_sha256(settings.checkpoint),
                       tuple(settings.labels), p.score, p.templates, p.crops,
                       None if p.thresholds is None else tuple(p.thresholds), p.texts, image_size,
                       settings.batch_size, settings.part_size, inputs.fingerprint())


def _progress(units: list[Unit], settings: TaggingSettings, ranks: Ranks):
    """A tqdm bar on rank 0 (images/s, skips), or None with --quiet."""
    if settings.quiet or not ranks.is_main:
        return None
    from tqdm import tqdm

    known = None if any(u.shard is not None for u in units) else sum(u.size or 0 for u in units)
    return tqdm(total=known, unit="img", desc="vgclip predict", dynamic_ncols=True, smoothing=0.1)


def _encode_units(units: list[Unit], loaded: _Model, settings: TaggingSettings, ranks: Ranks,
                  on_part: Callable[[PartResult], None]) -> int:
    """Decode, encode and score `units`; each finished part goes to `on_part`. Images scored."""
    if not units:
        return 0
    dataset = TaggingDataset(units, loaded.transform, settings.batch_size)
    encoder = _Encoder(loaded, ranks.device, stored=settings.out is not None)
    bar, scored, skipped = _progress(units, settings, ranks), 0, 0
    try:
        for batch in make_loader(dataset, settings.workers):
            scored += len(batch.keys)
            skipped += len(batch.skips)
            if bar is not None:
                bar.update(len(batch.keys) + len(batch.skips))
                bar.set_postfix(skipped=skipped, refresh=False)
            part = encoder.add(batch)
            if part is not None:
                on_part(part)
    finally:
        if bar is not None:
            bar.close()
    return scored


def run_tagging(settings: TaggingSettings, on_skip: Callable[[Skip], None] | None = None) -> TaggingResult:
    """Run one job (this rank's share of it under torchrun). Without --out the rows come back in the result
    (at most STDOUT_LIMIT images); with it, parts are written, then merged with summary.json by rank 0."""
    inputs = list_inputs(settings.images, settings.list_file, settings.data, settings.part_size)
    if settings.out is None and inputs.known_images > STDOUT_LIMIT:
        raise VgclipError(f"{inputs.known_images} images: give --out DIR to write them to files (stdout shows up "
                          f"to {STDOUT_LIMIT}; --out runs in parts, resumable, with embeddings)")
    ranks = join_ranks(settings.device)
    try:
        if settings.out is None and ranks.world_size > 1:
            raise VgclipError("several processes (torchrun) write their parts to a folder: give --out DIR")
        loaded = load_model(settings, ranks.device)
        if settings.out is None:
            return _to_memory(settings, inputs, loaded, ranks, on_skip)
        return _to_folder(settings, inputs, loaded, ranks)
    finally:
        leave_ranks(ranks)


def _to_memory(settings: TaggingSettings, inputs: Inputs, loaded: _Model, ranks: Ranks,
               on_skip: Callable[[Skip], None] | None) -> TaggingResult:
    parts: list[PartResult] = []
    skips: list[Skip] = []

    def keep(part: PartResult) -> None:
        parts.append(part)
        for skip in part.skips:
            skips.append(skip)
            if on_skip is not None:
                on_skip(skip)
        if sum(p.rows for p in parts) + len(skips) > STDOUT_LIMIT:
            raise VgclipError(f"more than {STDOUT_LIMIT} images: give --out DIR to write them to files")

    start = time.perf_counter()
    scored = _encode_units(inputs.for_rank(ranks.rank, ranks.world_size), loaded, settings, ranks, keep)
    rate = scored / max(time.perf_counter() - start, 1e-9)
    parts.sort(key=lambda p: p.index)
    return TaggingResult(scored, Counter(s.reason for s in skips), rate, parts, skips)


def _to_folder(settings: TaggingSettings, inputs: Inputs, loaded: _Model, ranks: Ranks) -> TaggingResult:
    out = settings.out
    job = _job_settings(settings, inputs, loaded.image_size)
    done = _folder_ready(settings, job, ranks)
    todo = [u for u in inputs.for_rank(ranks.rank, ranks.world_size) if u.index not in done]
    start = time.perf_counter()
    _encode_units(todo, loaded, settings, ranks, lambda part: write_part(out, ranks.rank, part, settings.labels))
    barrier(ranks)
    seconds = time.perf_counter() - start
    if not ranks.is_main:
        return TaggingResult(0, Counter(), 0.0)
    parts = done_parts(out)
    missing = [u.index for u in inputs.units if u.index not in parts]
    if missing:
        raise VgclipError(f"--out {out}: part(s) {missing[:5]} were not written; rerun the same command")
    scored = merge_predictions(out, parts, settings.labels, settings.fmt)
    skipped = merge_skipped(out, parts)
    before = sum(pq.ParquetFile(parts[i]).metadata.num_rows for i in done)
    rate = (scored - before) / max(seconds, 1e-9)
    facts = RunFacts(job, settings.predict, inputs, scored, skipped, rate, seconds, ranks.world_size,
                     settings.workers, len(done), settings.fmt)
    summary = write_summary(out, facts)
    return TaggingResult(scored, skipped, rate, summary=summary)
