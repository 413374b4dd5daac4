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
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vgclip.config import DataConfig
from vgclip.data.decoding import decode_image
from vgclip.data.images import BadImageError
from vgclip.data.pairing import Box, Pairing, choose_pair, metadata_problem, mirror_text, parse_pairing, stable_seed
from vgclip.data.tar_reader import iter_tar_samples
from vgclip.data.transforms import stack_images
from vgclip.errors import ConfigError, VgclipError

logger = logging.getLogger(__name__)

SKIP_REASONS = ("bad_tar", "missing_json", "missing_jpg", "bad_json", "no_phrases", "bad_image")
RawSample = tuple[str, bytes, dict[str, Any], str]  # key, jpg bytes, parsed json, shard url


def list_shards(shard_dir: str | Path, split: str) -> list[Path]:
    """The shard files of `split`: from SHARDS/manifest.json, else SHARDS/<split>/*.tar."""
    shard_dir = Path(shard_dir)
    manifest = _read_manifest(shard_dir)
    if manifest is None:
        shards = sorted((shard_dir / split).glob("*.tar"))
    else:
        if manifest.get("format", "webdataset") != "webdataset":
            raise VgclipError(f"{shard_dir / 'manifest.json'}: shards are in {manifest['format']!r} format; "
                              "the loader reads webdataset shards (prepare with the default format)")
        names = manifest.get("splits", {}).get(split, {}).get("shards")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise VgclipError(f"{shard_dir / 'manifest.json'}: no list of shards for split '{split}'")
        shards = [shard_dir / name for name in names]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise VgclipError(f"{shard_dir / 'manifest.json'} lists missing shard(s): {', '.join(missing[:3])}")
    if not shards:
        raise VgclipError(f"{shard_dir}: no shards for split '{split}' (run `vgclip prepare` first)")
    return shards


def count_samples(shard_dir: str | Path, split: str) -> int:
    """Number of samples (images) in `split`: the manifest's count, else counted from the tar headers."""
    manifest = _read_manifest(Path(shard_dir))
    entry = (manifest or {}).get("splits", {}).get(split, {})
    if isinstance(entry.get("images"), int):  # written by `vgclip prepare`
        return entry["images"]
    return sum(_scan_shard(path, check_json=False) for path in list_shards(shard_dir, split))


def make_loader(
    shard_dir: str | Path,
    split: str,
    data_cfg: DataConfig,
    image_transform: Callable[[Image.Image], torch.Tensor],
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
    With `normalize=False` and an `ImageTransform`, images stay uint8 pixels: the caller moves
    them to its device and applies `image_transform.normalize` there.
    """
    pairing = parse_pairing(data_cfg.pairing)
    _check_args(data_cfg, rank, world_size, start_batch)
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
        skips, rotation = _resume_plan(rank_shards, workers, data_cfg.batch_size, train, start_batch)
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
        collate_fn=_Collate(tokenizer, _split_transform(image_transform)[1] if normalize else None),
        num_workers=data_cfg.num_workers, pin_memory=torch.cuda.is_available(),
    )
    return ShardLoader(loader, counts)


class ShardLoader:
    """Iterable over one epoch's batches; `skipped` counts bad samples by reason (all workers)."""

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


class SkipCounts:
    """Skip counters shared by the worker processes (a lock-protected shared-memory array)."""

    def __init__(self) -> None:
        self._array = multiprocessing.Array("q", len(SKIP_REASONS))

    def add(self, reason: str) -> None:
        with self._array.get_lock():
            self._array[SKIP_REASONS.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        with self._array.get_lock():
            return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._array) if n}


class _ShardStream(IterableDataset):
    """The per-worker sample stream (see the module docstring for the stages)."""

    def __init__(self, shards: list[Path], pairing: Pairing, cfg: DataConfig, transform: Callable, *,
                 train: bool, seed: int, epoch: int, rank: int, skips: list[int], rotation: int,
                 counts: SkipCounts) -> None:
        super().__init__()
        self.shards, self.pairing, self.cfg, self.transform = shards, pairing, cfg, transform
        self.train, self.seed, self.epoch, self.rank = train, seed, epoch, rank
        self.skips, self.rotation, self.counts = skips, rotation, counts
        # How small the transform can take its input: lets the JPEG decoder downscale (draft).
        self.draft_size = getattr(transform, "draft_size", None)
        self.per_sample = _split_transform(transform)[0]
        # ImageTransform.pixels also takes uint8 (3, H, W) tensors, which lets us skip PIL.
        self.tensor_input = bool(getattr(transform, "accepts_uint8_tensors", False))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.skips):
            raise RuntimeError(f"planned for {len(self.skips)} workers, running with {workers}")
        worker = (slot + self.rotation) % workers
        samples = raw_samples(self.shards[worker::workers], self._skip)
        if self.train and self.cfg.shuffle_buffer > 1:
            rng = random.Random(stable_seed("samples", self.seed, self.epoch, self.rank, worker))
            samples = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(samples)
        for key, jpg, meta, url in itertools.islice(samples, self.skips[worker], None):
            try:
                example = self._example(key, jpg, meta)
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

        image = decode_image(key, data, draft_size=self.draft_size, tensor_ok=self.tensor_input, crop_for=crop_for)
        text = pair[0]
        if not self.train:
            return self.per_sample(image), text
        # Augmentation seeded per (seed, epoch, image): a resumed epoch sees the same crops,
        # without disturbing the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed("augment", self.seed, self.epoch, key) % (2**63))
            if not getattr(self.transform, "accepts_flip", False):  # another callable: its own augmentation
                return self.per_sample(image), text
            # A flipped image must not keep a phrase that says "on the left".
            flip = rng.random() < 0.5
            return self.per_sample(image, flip=flip), mirror_text(text) if flip else text


def raw_samples(shards: list[Path], skip: Callable[..., None]) -> Iterator[RawSample]:
    """(key, jpg bytes, parsed JSON, shard) of the usable samples of `shards`; others go to `skip`.

    A damaged shard counts one `bad_tar` and gives the samples before the damage.
    """
    for path in shards:
        url = str(path)
        try:
            for key, parts in iter_tar_samples(path):
                reason, meta = _sample_problem(parts)
                if reason is None:
                    yield key, parts["jpg"], meta, url
                else:
                    skip(reason, key, url)
        except (OSError, tarfile.TarError) as exc:
            skip("bad_tar", "-", url, f"{type(exc).__name__}: {str(exc)[:300]}")


def _sample_problem(sample: dict[str, Any]) -> tuple[str | None, Any]:
    """(skip reason or None, parsed JSON) from the raw parts of one sample; no image decoding."""
    if "json" not in sample:
        return "missing_json", None
    if "jpg" not in sample:
        return "missing_jpg", None
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        return "bad_json", None
    return metadata_problem(meta), meta


def _as_tensor(value: Any) -> Any:
    """Token arrays become tensors; anything else (e.g. raw strings of a custom tokenizer) passes through."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError):
        return value


def _split_transform(transform: Callable) -> tuple[Callable, Callable | None]:
    """(per-sample part, per-batch part): transforms with `pixels` + `normalize` (ImageTransform)
    produce uint8 per sample and are normalised once per stacked batch; others run whole per sample."""
    pixels, normalize = getattr(transform, "pixels", None), getattr(transform, "normalize", None)
    if callable(pixels) and callable(normalize):
        return pixels, normalize
    return transform, None


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


def _check_args(cfg: DataConfig, rank: int, world_size: int, start_batch: int) -> None:
    if cfg.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise VgclipError(f"rank {rank} is not within world size {world_size}")
    if start_batch < 0:
        raise VgclipError(f"start_batch must be >= 0, got {start_batch}")


def _read_manifest(shard_dir: Path) -> dict[str, Any] | None:
    path = shard_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VgclipError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise VgclipError(f"{path}: expected a JSON object with 'splits'")
    return manifest


def _resume_plan(shards: list[Path], workers: int, batch_size: int, drop_last: bool,
                 start_batch: int) -> tuple[list[int], int]:
    """(samples each worker skips, worker-id rotation) so the epoch continues at `start_batch`."""
    sizes = [sum(_scan_shard(p, check_json=True) for p in shards[w::workers]) for w in range(workers)]
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


def _scan_shard(path: Path, *, check_json: bool) -> int:
    """Samples in one shard from its tar headers (and JSON, if `check_json`), as `raw_samples` sees them."""
    count = 0
    try:
        for _key, parts in iter_tar_samples(path, wanted=lambda suffix: check_json and suffix == "json"):
            count += _sample_problem(parts)[0] is None if check_json else {"jpg", "json"} <= parts.keys()
    except (OSError, tarfile.TarError) as exc:
        logger.warning("%s: unreadable tar (%s); counting the samples before the damage", path, exc)
    return count
