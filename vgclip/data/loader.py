"""Streaming multi-worker loader over the WebDataset shards written by `vgclip prepare`.

Training order is a pure function of (seed, epoch, rank, world_size, num_workers):
shard list shuffled by (seed, epoch) -> the epoch plan (data/epoch_plan.py: every rank the same
number of batches, every worker whole batches, each worker a list of pieces = shard + range of
usable samples) -> raw samples of this worker's pieces (bytes + parsed JSON) -> shuffle buffer
seeded by (seed, epoch, rank, worker) -> skip (resume) -> decode, pair, transform -> batches
(DataLoader collate: stack + tokenise, in the worker). Images are decoded only after the resume
skip, so restoring a position costs a read, not a decode. The plan needs each shard's count of
usable samples: read once per process from the tar headers and JSON (no image bytes).
A sample that fails to decode leaves its worker one short; the worker fills its last batch with
counted repeats of its first samples (`ShardLoader.repeated`), so every rank still takes the
planned number of steps. Evaluation reads whole shards (split by rank, then worker) in file order.

Batches reach the caller round-robin over the workers (a worker that runs out drops out of the
rotation; that is how torch's DataLoader interleaves iterable workers). To resume at batch k the
loader replays that rotation over each worker's batch count (the plan's; evaluation counts its
shards) and rotates worker ids so that the rotation continues where it stopped. Exact unless a
skipped-over image is corrupt (then the resumed epoch is shifted by that many samples).

Shards may be local or remote (`vgclip.data.shard_locations`). A remote shard whose stream breaks is read
again from its start (the samples already given are passed over) up to `SHARD_RETRIES` times, then
counted as a `bad_tar` skip with its URL in `ShardLoader.failed_shards`; the epoch goes on.
Samples may be vgclip's (`jpg` + `json` with regions) or img2dataset / open_clip ones (`jpg`,
`jpeg`, `png` or `webp` + a `txt` caption or a `caption` field in `json`): a caption is one
whole-image region.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vgclip.config import DataConfig, Pairing, parse_pairing
from vgclip.data.decoding import decode_image
from vgclip.data.epoch_plan import EpochPlan, plan_epoch
from vgclip.data.images import BadImageError
from vgclip.data.pairing import Box, choose_pair, mirror_text, stable_seed
from vgclip.data.samples import RETRY_WAIT_S, RawSample, ShardRange, raw_samples, read_ranges, shard_sizes
from vgclip.data.shard_locations import Shard, is_pattern, list_shards, manifest_count
from vgclip.data.transforms import PixelTransform, stack_images
from vgclip.errors import VgclipError

logger = logging.getLogger(__name__)

__all__ = ["count_samples", "list_shards", "make_loader", "raw_samples", "read_ranges", "round_robin",
           "shard_sizes", "ShardLoader", "ShardRange"]

SKIP_REASONS = ("bad_tar", "missing_json", "missing_jpg", "bad_json", "no_phrases", "bad_image")


def count_samples(data: str | Path, split: str, tar_reader: str = "direct") -> int:
    """Number of usable samples in `split`: the manifest's count, else counted as the loader plans them."""
    count = manifest_count(data, split)
    if count is not None:  # written by `vgclip prepare`
        return count
    return sum(shard_sizes(list_shards(data, split), tar_reader))


def make_loader(
    shard_dir: str | Path,
    split: str,
    data_cfg: DataConfig,
    image_transform: PixelTransform,
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    train: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    normalize: bool = True,
) -> ShardLoader:
    """One epoch of `(images [B,3,S,S], tokens {name: [B,L]})` batches for this rank.

    Every sample of the split is seen once per epoch across all ranks and workers. Training
    shuffles (seeded) and drops each worker's last partial batch; evaluation keeps file order and
    every sample. `start_batch` resumes the epoch: the result yields exactly the batches
    `start_batch, start_batch + 1, ...` of a fresh loader with the same arguments.
    With `normalize=False`, images stay uint8 pixels: the caller moves them to its device and
    applies `image_transform.normalize` there. `shard_dir` is any location `vgclip.data.shard_locations` reads.
    """
    pairing = parse_pairing(data_cfg.pairing)
    _check_args(rank, world_size, start_batch)  # DataConfig checks its own values
    if pairing.kind != "single" and is_pattern(shard_dir):
        raise VgclipError(f"data.pairing={data_cfg.pairing} needs region phrases, but shards given as a pattern "
                          f"({shard_dir}) are read as caption shards (one caption per image): use data.pairing=single")
    shards = list_shards(shard_dir, split)
    num_workers = data_cfg.num_workers
    if not train:  # evaluation reads whole shards: a worker beyond this rank's shards would idle
        num_workers = min(num_workers, len(range(rank, len(shards), world_size)))
    workers = max(1, num_workers)
    plan = None
    if train:
        random.Random(stable_seed("shards", seed, epoch)).shuffle(shards)
        plan, reads, batches = _train_reads(shards, data_cfg, workers, rank, world_size)
    else:
        reads, batches = _eval_reads(shards, data_cfg, workers, rank, world_size, start_batch)
    given, rotation = round_robin(batches, start_batch)
    if sum(given) < start_batch:
        logger.warning("start_batch %d is past the end of the epoch (%d batches)", start_batch, sum(batches))
    counts = SkipCounts()
    dataset = _ShardStream(
        shards, reads, pairing, data_cfg, image_transform, train=train, seed=seed, epoch=epoch, rank=rank,
        skips=[g * data_cfg.batch_size for g in given], rotation=rotation, counts=counts,
        targets=[b * data_cfg.batch_size for b in batches] if train else None,
    )
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers + fork = warnings
    # One DataLoader per epoch (its order depends on the epoch), so workers are not persistent.
    loader = DataLoader(
        dataset, batch_size=data_cfg.batch_size, drop_last=train,
        collate_fn=_Collate(tokenizer, image_transform.normalize if normalize else None),
        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
    )
    return ShardLoader(loader, counts, plan)


def _train_reads(shards: list[Shard], cfg: DataConfig, workers: int, rank: int, world_size: int
                 ) -> tuple[EpochPlan, list[list[ShardRange]], list[int]]:
    """(the epoch plan, this rank's ranges per worker, batches per worker) for a training epoch."""
    sizes = shard_sizes(shards, cfg.tar_reader)
    plan = plan_epoch(sizes, world_size=world_size, workers=workers, batch_size=cfg.batch_size)
    if plan.duplicates and rank == 0:
        logger.info("epoch plan: %d batches per rank; %d of %d samples read twice to fill the last global batch",
                    plan.batches_per_rank, plan.duplicates, sum(sizes))
    reads = [[ShardRange(p.shard, p.start, None if p.stop == sizes[p.shard] else p.stop, not p.repeat)
              for p in pieces] for pieces in plan.pieces[rank]]
    return plan, reads, list(plan.worker_batches[rank])


def _eval_reads(shards: list[Shard], cfg: DataConfig, workers: int, rank: int, world_size: int,
                start_batch: int) -> tuple[list[list[ShardRange]], list[int]]:
    """Whole shards in file order, split by rank then by worker; batches per worker (counted to resume)."""
    mine = list(range(rank, len(shards), world_size))
    reads = [[ShardRange(i) for i in mine[w::workers]] for w in range(workers)]
    if not start_batch:
        return reads, [0] * workers  # nothing to replay
    sizes = [sum(shard_sizes([shards[r.shard] for r in worker], cfg.tar_reader)) for worker in reads]
    return reads, [math.ceil(n / cfg.batch_size) for n in sizes]


class ShardLoader:
    """Iterable over one epoch's batches; `skipped` counts bad samples by reason (all workers),
    `failed_shards` lists the shards (URLs) that could not be read to the end, `repeated` the
    samples given twice to fill a worker's last batch after such losses, `plan` the training epoch's plan."""

    def __init__(self, loader: DataLoader, counts: SkipCounts, plan: EpochPlan | None = None) -> None:
        self.loader = loader
        self.counts = counts
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        # Starting a DataLoader iterator draws a base seed from torch's global RNG; the loader does
        # not need it (it seeds everything itself), so keep the caller's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            return iter(self.loader)

    @property
    def skipped(self) -> dict[str, int]:
        return self.counts.as_dict()

    @property
    def failed_shards(self) -> list[str]:
        return self.counts.failed_shards()

    @property
    def repeated(self) -> int:
        return self.counts.repeated


class SkipCounts:
    """Skip counters shared by the worker processes (a lock-protected shared-memory array), and
    the shards that failed (a queue the workers write and the main process drains)."""

    def __init__(self) -> None:
        self._array = multiprocessing.Array("q", len(SKIP_REASONS) + 1)  # + samples repeated to fill a batch
        self._failed_queue = multiprocessing.SimpleQueue()
        self._failed: list[str] = []

    def add(self, reason: str) -> None:
        with self._array.get_lock():
            self._array[SKIP_REASONS.index(reason)] += 1

    def add_repeats(self, n: int) -> None:
        with self._array.get_lock():
            self._array[len(SKIP_REASONS)] += n

    @property
    def repeated(self) -> int:
        return int(self._array[len(SKIP_REASONS)])

    def fail_shard(self, url: str) -> None:
        self._failed_queue.put(url)

    def failed_shards(self) -> list[str]:
        while not self._failed_queue.empty():
            self._failed.append(self._failed_queue.get())
        return sorted(self._failed)

    def as_dict(self) -> dict[str, int]:
        with self._array.get_lock():
            return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._array) if n}


class _ShardStream(IterableDataset):
    """The per-worker sample stream (see the module docstring for the stages)."""

    def __init__(self, shards: list[Shard], reads: list[list[ShardRange]], pairing: Pairing, cfg: DataConfig,
                 transform: PixelTransform, *, train: bool, seed: int, epoch: int, rank: int, skips: list[int],
                 rotation: int, counts: SkipCounts, targets: list[int] | None) -> None:
        super().__init__()
        self.shards, self.reads, self.pairing, self.cfg, self.transform = shards, reads, pairing, cfg, transform
        self.train, self.seed, self.epoch, self.rank = train, seed, epoch, rank
        self.skips, self.rotation, self.counts, self.targets = skips, rotation, counts, targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.reads):
            raise RuntimeError(f"planned for {len(self.reads)} workers, running with {workers}")
        worker = (slot + self.rotation) % workers
        # Training gives exactly the planned samples; the first few are kept to fill in for bad images
        # (kept while skipping too, so that a resumed epoch fills in with the same ones).
        target = None if self.targets is None else self.targets[worker] - self.skips[worker]
        spares: list[RawSample] = []
        given = 0
        for index, (sample, counted) in enumerate(self._samples(worker)):
            if target is not None and len(spares) < self.cfg.batch_size:
                spares.append(sample)
            if index < self.skips[worker]:
                continue
            if target is not None and given >= target:
                break
            example = self._try_example(sample, counted)
            if example is not None:
                given += 1
                yield example
        if target is not None and given < target:
            yield from self._fill(spares, target - given)

    def _samples(self, worker: int) -> Iterator[tuple[RawSample, bool]]:
        """(raw sample, whether its range counts skips) of this worker's ranges, shuffled when training."""
        samples: Iterator[tuple[RawSample, bool]] = (
            (sample, part.counted) for part in self.reads[worker]
            for sample in read_ranges(self.shards, [part], self._skip, self.cfg.tar_reader, self.counts.fail_shard,
                                      retry_wait_s=RETRY_WAIT_S))  # this module's: a test may set it to 0
        if self.train and self.cfg.shuffle_buffer > 1:
            rng = random.Random(stable_seed("samples", self.seed, self.epoch, self.rank, worker))
            samples = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(samples)
        return samples

    def _try_example(self, sample: RawSample, counted: bool) -> tuple[torch.Tensor, str] | None:
        """The example, or None for an image that does not decode (a skip, unless it was counted already)."""
        key, image, meta, url = sample
        try:
            return self._example(key, image, meta)
        except (BadImageError, OSError, ValueError, RuntimeError) as exc:
            # Whatever one odd image does to the decoder or transform, the epoch goes on.
            if counted:
                self._skip("bad_image", key, url, str(exc))
            return None

    def _fill(self, spares: list[RawSample], missing: int) -> Iterator[tuple[torch.Tensor, str]]:
        """`missing` repeats of the worker's first usable samples, so that it still gives whole batches."""
        examples = [e for e in (self._try_example(s, counted=False) for s in spares) if e is not None]
        if not examples:
            return  # nothing usable at all: this worker gives fewer batches (the loop ends the epoch)
        logger.warning("rank %d: %d sample(s) could not be used; repeating earlier ones to keep whole batches",
                       self.rank, missing)
        self.counts.add_repeats(missing)
        yield from itertools.islice(itertools.cycle(examples), missing)

    def _skip(self, reason: str, key: str, url: str, detail: str = "") -> None:
        self.counts.add(reason)
        logger.warning("skipping sample %s in %s: %s%s", key, url, reason, f" ({detail})" if detail else "")

    def _example(self, key: str, data: bytes, meta: dict[str, Any]) -> tuple[torch.Tensor, str]:
        rng = random.Random(stable_seed("pair", self.seed, self.epoch, key))
        pair: list[str] = []

        def crop_for(size: tuple[int, int]) -> Box | None:  # the pair needs the image size (region crops)
            text, crop = choose_pair(meta, self.pairing, rng, image_size=size,
                                     margin=self.cfg.region_margin, min_size=self.cfg.region_min_size)
            pair[:] = [text]
            return crop

        image = decode_image(key, data, draft_size=self.transform.draft_size, tensor_ok=True, crop_for=crop_for,
                             fast=self.cfg.fast_decode)
        text = pair[0]
        if not self.train:
            return self.transform.pixels(image), text
        # Augmentation seeded per (seed, epoch, image): a resumed epoch sees the same crops,
        # without disturbing the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed("augment", self.seed, self.epoch, key) % (2**63))
            # A flipped image must not keep a phrase that says "on the left".
            flip = rng.random() < 0.5
            return self.transform.pixels(image, flip=flip), mirror_text(text) if flip else text


def _as_tensor(value: Any) -> Any:
    """Token arrays become tensors; anything else (e.g. raw strings of a custom tokenizer) passes through."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError):
        return value


class _Collate:
    """Stack images and tokenise the texts of one batch (runs in the worker)."""

    def __init__(self, tokenizer: Callable[[list[str]], dict[str, Any]], normalize: Callable | None) -> None:
        self.tokenizer = tokenizer
        self.normalize = normalize

    def __call__(self, batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = stack_images([image for image, _ in batch])
        if self.normalize is not None:
            images = self.normalize(images)
        tokens = self.tokenizer([text for _, text in batch])
        return images, {name: _as_tensor(value) for name, value in tokens.items()}


def _check_args(rank: int, world_size: int, start_batch: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise VgclipError(f"rank {rank} is not within world size {world_size}")
    if start_batch < 0:
        raise VgclipError(f"start_batch must be >= 0, got {start_batch}")


def round_robin(batches: list[int], first: int) -> tuple[list[int], int]:
    """Replay the DataLoader's rotation over workers with `batches` batches each for `first` batches.

    Returns how many batches each worker gave and the worker whose turn is next.
    """
    remaining, given, turn, done = list(batches), [0] * len(batches), 0, 0
    while done < first and any(remaining):
        if remaining[turn]:
            remaining[turn] -= 1
            given[turn] += 1
            done += 1
        turn = (turn + 1) % len(batches)
    return given, turn


