"""Streaming multi-worker loader over the WebDataset shards written by `vgclip prepare`.

Order is a pure function of (seed, epoch, rank, world_size, num_workers):
shard list shuffled by (seed, epoch) -> split by rank -> split by worker -> raw samples (bytes +
parsed JSON) -> shuffle buffer seeded by (seed, epoch, rank, worker) -> skip (resume) -> decode,
pair, transform -> batches (DataLoader collate: stack + tokenise, in the worker).
Images are decoded only after the resume skip, so restoring a position costs a read, not a decode.

Batches reach the caller round-robin over the workers (a worker that runs out drops out of the
rotation; that is how torch's DataLoader interleaves iterable workers). To resume at batch k the
loader counts the samples of each worker's shards (tar headers + JSON, no images), replays that
rotation to find how many batches each worker had given, and rotates worker ids so that the
rotation continues where it stopped. Exact unless a skipped-over image is corrupt (then the
resumed epoch is shifted by that many samples).

Shards may be local or remote (`vgclip.data.shards`). A remote shard whose stream breaks is read
again from its start (the samples already given are passed over) up to `SHARD_RETRIES` times, then
counted as a `bad_tar` skip with its URL in `ShardLoader.failed_shards`; the epoch goes on.
Samples may be vgclip's (`jpg` + `json` with regions) or img2dataset / open_clip ones (`jpg`,
`jpeg`, `png` or `webp` + a `txt` caption or a `caption` field in `json`): a caption is one
whole-image region.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vgclip.config import DataConfig
from vgclip.data.decoding import decode_image
from vgclip.data.images import BadImageError
from vgclip.data.pairing import Box, Pairing, choose_pair, metadata_problem, mirror_text, parse_pairing, stable_seed
from vgclip.data.shards import READ_ERRORS, Shard, is_pattern, is_remote, list_shards, manifest_count, read_samples
from vgclip.data.transforms import PixelTransform, stack_images
from vgclip.errors import VgclipError

logger = logging.getLogger(__name__)

__all__ = ["count_samples", "list_shards", "make_loader", "raw_samples", "round_robin", "ShardLoader"]

SKIP_REASONS = ("bad_tar", "missing_json", "missing_jpg", "bad_json", "no_phrases", "bad_image")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
SHARD_RETRIES = 2  # extra reads of a remote shard whose stream broke, before it counts as skipped
RETRY_WAIT_S = 0.5  # doubled after each retry
RawSample = tuple[str, bytes, dict[str, Any], str]  # key, image bytes, parsed metadata, shard url


def count_samples(data: str | Path, split: str, tar_reader: str = "direct") -> int:
    """Number of samples (images) in `split`: the manifest's count, else counted from the tar headers."""
    count = manifest_count(data, split)
    if count is not None:  # written by `vgclip prepare`
        return count
    return sum(_scan_shard(shard, tar_reader, check_text=False) for shard in list_shards(data, split))


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
    applies `image_transform.normalize` there. `shard_dir` is any location `vgclip.data.shards` reads.
    """
    pairing = parse_pairing(data_cfg.pairing)
    _check_args(rank, world_size, start_batch)  # DataConfig checks its own values
    if pairing.kind != "single" and is_pattern(shard_dir):
        raise VgclipError(f"data.pairing={data_cfg.pairing} needs region phrases, but shards given as a pattern "
                          f"({shard_dir}) are read as caption shards (one caption per image): use data.pairing=single")
    shards = list_shards(shard_dir, split)
    if train:
        random.Random(stable_seed("shards", seed, epoch)).shuffle(shards)
    rank_shards = shards[rank::world_size]
    workers = max(1, data_cfg.num_workers)
    if len(rank_shards) < workers:
        logger.warning("rank %d has %d shard(s) for %d worker(s): some workers stay idle",
                       rank, len(rank_shards), workers)
    skips, rotation = [0] * workers, 0
    if start_batch:
        skips, rotation = _resume_plan(rank_shards, workers, data_cfg, train, start_batch)
    counts = SkipCounts()
    dataset = _ShardStream(
        rank_shards, pairing, data_cfg, image_transform, train=train, seed=seed, epoch=epoch, rank=rank,
        skips=skips, rotation=rotation, counts=counts,
    )
    if data_cfg.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers + fork = warnings
    # One DataLoader per epoch (its order depends on the epoch), so workers are not persistent.
    loader = DataLoader(
        dataset, batch_size=data_cfg.batch_size, drop_last=train,
        collate_fn=_Collate(tokenizer, image_transform.normalize if normalize else None),
        num_workers=data_cfg.num_workers, pin_memory=torch.cuda.is_available(),
    )
    return ShardLoader(loader, counts)


class ShardLoader:
    """Iterable over one epoch's batches; `skipped` counts bad samples by reason (all workers),
    `failed_shards` lists the shards (URLs) that could not be read to the end."""

    def __init__(self, loader: DataLoader, counts: SkipCounts) -> None:
        self.loader = loader
        self.counts = counts

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


class SkipCounts:
    """Skip counters shared by the worker processes (a lock-protected shared-memory array), and
    the shards that failed (a queue the workers write and the main process drains)."""

    def __init__(self) -> None:
        self._array = multiprocessing.Array("q", len(SKIP_REASONS))
        self._failed_queue = multiprocessing.SimpleQueue()
        self._failed: list[str] = []

    def add(self, reason: str) -> None:
        with self._array.get_lock():
            self._array[SKIP_REASONS.index(reason)] += 1

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

    def __init__(self, shards: list[Shard], pairing: Pairing, cfg: DataConfig, transform: PixelTransform, *,
                 train: bool, seed: int, epoch: int, rank: int, skips: list[int], rotation: int,
                 counts: SkipCounts) -> None:
        super().__init__()
        self.shards, self.pairing, self.cfg, self.transform = shards, pairing, cfg, transform
        self.train, self.seed, self.epoch, self.rank = train, seed, epoch, rank
        self.skips, self.rotation, self.counts = skips, rotation, counts

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.skips):
            raise RuntimeError(f"planned for {len(self.skips)} workers, running with {workers}")
        worker = (slot + self.rotation) % workers
        samples = raw_samples(self.shards[worker::workers], self._skip, self.cfg.tar_reader, self.counts.fail_shard)
        if self.train and self.cfg.shuffle_buffer > 1:
            rng = random.Random(stable_seed("samples", self.seed, self.epoch, self.rank, worker))
            samples = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(samples)
        for key, image, meta, url in itertools.islice(samples, self.skips[worker], None):
            try:
                example = self._example(key, image, meta)
            except (BadImageError, OSError, ValueError, RuntimeError) as exc:
                # Whatever one odd image does to the decoder or transform, the epoch goes on.
                self._skip("bad_image", key, url, str(exc))
                continue
            yield example

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


def raw_samples(shards: list[Shard], skip: Callable[..., None], tar_reader: str = "direct",
                fail_shard: Callable[[str], None] | None = None) -> Iterator[RawSample]:
    """(key, image bytes, parsed metadata, shard) of the usable samples of `shards`; others go to `skip`.

    A damaged local shard counts one `bad_tar` and gives the samples before the damage. A remote
    one is first read again from its start (passing over the samples already given), up to
    `SHARD_RETRIES` times; a shard that stays broken is also passed to `fail_shard`.
    """
    for shard in shards:
        url, done = str(shard), 0  # done: samples of this shard already given or skipped
        for attempt in itertools.count():
            try:
                for index, (key, parts) in enumerate(read_samples(shard, tar_reader)):
                    if index < done:
                        continue
                    done += 1
                    reason, image, meta = _sample_parts(parts)
                    if reason is None:
                        yield key, image, meta, url
                    else:
                        skip(reason, key, url)
                break
            except READ_ERRORS as exc:
                if is_remote(shard) and attempt < SHARD_RETRIES:
                    logger.warning("%s: read failed (%s); reading it again (%d of %d)", url, exc, attempt + 1,
                                   SHARD_RETRIES)
                    time.sleep(RETRY_WAIT_S * 2**attempt)
                    continue
                skip("bad_tar", "-", url, f"{type(exc).__name__}: {str(exc)[:300]}")
                if fail_shard is not None:
                    fail_shard(url)
                break


def _sample_parts(parts: dict[str, bytes]) -> tuple[str | None, bytes, Any]:
    """(skip reason or None, image bytes, metadata) from the raw parts of one sample; no decoding.

    vgclip samples carry regions in `json`; img2dataset / open_clip ones a caption (`txt`, or
    `caption` in `json`), which becomes one whole-image region.
    """
    if "json" not in parts and "txt" not in parts:
        return "missing_json", b"", None
    image = next((parts[suffix] for suffix in IMAGE_SUFFIXES if suffix in parts), None)
    if image is None:
        return "missing_jpg", b"", None
    meta: Any = None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            return "bad_json", image, None
        if isinstance(meta, dict) and "regions" in meta:
            return metadata_problem(meta), image, meta
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8", "replace")
    meta = {"regions": [{"phrase": caption, "box": None}]}
    return metadata_problem(meta), image, meta


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


def _resume_plan(shards: list[Shard], workers: int, cfg: DataConfig, drop_last: bool,
                 start_batch: int) -> tuple[list[int], int]:
    """(samples each worker skips, worker-id rotation) so the epoch continues at `start_batch`."""
    batch_size = cfg.batch_size
    sizes = [sum(_scan_shard(p, cfg.tar_reader, check_text=True) for p in shards[w::workers]) for w in range(workers)]
    batches = [n // batch_size if drop_last else math.ceil(n / batch_size) for n in sizes]
    given, next_worker = round_robin(batches, start_batch)
    if sum(given) < start_batch:
        logger.warning("start_batch %d is past the end of the epoch (%d batches)", start_batch, sum(batches))
    return [g * batch_size for g in given], next_worker


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


def _scan_shard(shard: Shard, tar_reader: str, *, check_text: bool) -> int:
    """Samples in one shard, as `raw_samples` gives them (with `check_text`: parsing the JSON / text,
    without: every sample with an image and a text member), reading no image bytes."""
    count = 0
    wanted = (lambda suffix: check_text and suffix in ("json", "txt"))
    try:
        for _key, parts in read_samples(shard, tar_reader, wanted=wanted):
            if check_text:
                count += _sample_parts(parts)[0] is None
            else:
                count += any(s in parts for s in IMAGE_SUFFIXES) and ("json" in parts or "txt" in parts)
    except READ_ERRORS as exc:
        logger.warning("%s: unreadable tar (%s); counting the samples before the damage", shard, exc)
    return count
