"""Locked-image-tower training on cached features (LiT, Zhai et al. 2022).

When the image tower is fully frozen and images are not augmented, the tower maps each image to
the same pooled feature vector in every epoch. Computing it once and training the text tower,
the projections and the temperature on the cache removes the image tower (almost all of the
compute) from every later step: an epoch over the cache takes seconds on a CPU.

Each row is the tower's output on the eval centre crop of one image, or with `train.cache_views=multi`
the mean of its outputs on the `eval.crops=multi` views (data/views.py): training then sees the
whole photo, as the 8-view evaluation does (measured: +0.026 zero-shot mAP for offline-base).

The cache lives beside the run: RUN/image_features.safetensors holds one tensor `features`
[N, F] and, in its metadata, a fingerprint of the image tower's weights, the eval transform, the
decode path (data.fast_decode) and the shards; RUN/image_features.json holds the same fingerprint,
the sample keys (row order) and each image's phrases (for pairing texts each epoch). Every rank
checks the fingerprints; a cache that differs from the current one on any rank, or whose two
files differ, is rebuilt, never reused. The build is parallel: each rank decodes and embeds its
share of the rows with loader workers, and rank 0 gathers and writes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load, save, save_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vgclip.config import Config, DataConfig, parse_pairing
from vgclip.data.decoding import decode_image
from vgclip.data.epoch_plan import batches_per_rank, span_pieces
from vgclip.data.images import BadImageError
from vgclip.data.pairing import choose_pair, stable_seed
from vgclip.data.samples import ShardRange, read_ranges, shard_sizes
from vgclip.data.shard_locations import Shard, is_pattern, is_remote, list_shards, read_manifest
from vgclip.data.transforms import PixelTransform, stack_images
from vgclip.data.views import VIEWS, MultiCropTransform, eval_transform
from vgclip.errors import VgclipError
from vgclip.io import atomic_path, atomic_write_text
from vgclip.train.distributed import DistInfo, all_ranks, barrier, gather_bytes, gather_bytes_to_main

__all__ = ["CACHE_FILE", "INDEX_FILE", "CachedImageClip", "FeatureCache", "build_feature_cache", "cache_applies",
           "compute_features", "fingerprint", "image_head", "image_tower_locked"]

CACHE_FILE = "image_features.safetensors"
INDEX_FILE = "image_features.json"
BLOCK = 64  # tower inputs per forward while building: fixed, so that any number of ranks computes the same rows


def image_tower_locked(config: Config) -> bool:
    """True when no parameter below the image head (`image_proj`) trains: the tower is locked whole (LiT)."""
    image = config.model.image
    return image.lock and image.unlocked_blocks == 0


def cache_applies(config: Config) -> bool:
    """True when every epoch would feed the frozen image tower the very same pixels."""
    return (config.train.cache_locked_image and image_tower_locked(config)
            and not config.data.augment and parse_pairing(config.data.pairing).kind != "region")


def image_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings from the image tower's output: `model.encode_image` without the tower."""
    return F.normalize(model.image_proj(features), dim=-1)


class CachedImageClip(nn.Module):
    """The model's forward with the image tower replaced by a look-up of its cached output.

    Shares every parameter with `model` (a ClipModel), so training this trains the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "image_embeds": image_head(self.model, features),
            "text_embeds": self.model.encode_text(tokens),
            "logit_scale": self.model.get_logit_scale(),
        }


def fingerprint(visual: nn.Module, shards: list[Shard], eval_transform_repr: str, *, fast_decode: bool,
                manifest: dict | None = None) -> str:
    """Hash of everything the cached rows depend on: tower weights, input transform, decode path, shards.

    A local shard counts by name, size and modification time; a remote one (no `stat()`) by its URL,
    with the folder's manifest (`manifest`, as read) standing for its contents.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(visual.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(eval_transform_repr.encode())
    h.update(f"fast_decode={fast_decode}".encode())  # the two decode paths give slightly different pixels
    for shard in shards:
        if is_remote(shard):
            h.update(f"{shard}\n".encode())
        else:
            stat = Path(shard).stat()
            h.update(f"{Path(shard).name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if manifest is not None:
        h.update(json.dumps(manifest, sort_keys=True).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_features(visual: nn.Module, shards: list[Shard], transform: PixelTransform, device: torch.device,
                     batch_size: int = BLOCK, *, data_cfg: DataConfig | None = None, rank: int = 0,
                     world_size: int = 1) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Pooled features of this rank's share of the usable training images, with keys and metadata (row order).

    Rows are the shards' usable samples in file order (images that do not decode are left out), in
    blocks of `batch_size`; rank r computes a contiguous run of blocks with `data_cfg.num_workers`
    loader workers. A block is one forward whatever the number of ranks, so the rows of a
    many-rank build, put together in rank order, are the rows of a one-process build.
    """
    cfg = data_cfg or DataConfig(num_workers=0)
    sizes = shard_sizes(shards, cfg.tar_reader)
    workers = max(1, cfg.num_workers)
    blocks = FeatureBlocks(shards, cfg, transform, _block_ranges(sizes, batch_size, rank, world_size, workers))
    loader = DataLoader(blocks, batch_size=None, num_workers=max(0, cfg.num_workers))
    done: dict[int, tuple[torch.Tensor, list[str], list[dict]]] = {}
    was_training = visual.training
    visual.eval()
    try:
        for block, pixels, keys, metas in loader:
            if keys:
                done[block] = (_pooled(visual, pixels.to(device)), keys, metas)
    finally:
        visual.train(was_training)
    ordered = [done[b] for b in sorted(done)]
    features = torch.cat([f for f, _, _ in ordered]) if ordered else torch.empty(0, 0)
    return features, [k for _, keys, _ in ordered for k in keys], [m for _, _, metas in ordered for m in metas]


def _pooled(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's output [b, F] for a block [b, 3, S, S], or the mean over the views of a multi-crop
    block [b, V, 3, S, S] (its b x V views in one forward, as large as a centre-crop block's)."""
    if pixels.dim() == 4:
        return visual(pixels).float().cpu()
    b, v = pixels.shape[:2]
    flat = pixels.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    return visual(flat).float().view(b, v, -1).mean(1).cpu()


def _block_ranges(sizes: list[int], block: int, rank: int, world_size: int, workers: int
                  ) -> list[list[tuple[int, list[ShardRange]]]]:
    """[worker] -> (block index, its shard ranges) for this rank's contiguous share of the blocks."""
    n_blocks = math.ceil(sum(sizes) / block)
    first, last = rank * n_blocks // world_size, (rank + 1) * n_blocks // world_size
    per_worker: list[list[tuple[int, list[ShardRange]]]] = [[] for _ in range(workers)]
    for b in range(first, last):
        pieces = span_pieces(b * block, min((b + 1) * block, sum(sizes)), sizes)
        ranges = [ShardRange(p.shard, p.start, None if p.stop == sizes[p.shard] else p.stop) for p in pieces]
        per_worker[(b - first) * workers // max(1, last - first)].append((b, ranges))
    return per_worker


class FeatureBlocks(IterableDataset):
    """Per worker: (block index, normalised pixels [b,3,S,S], keys, metadata) of its blocks, decoded as the loader does."""

    def __init__(self, shards: list[Shard], cfg: DataConfig, transform: PixelTransform,
                 per_worker: list[list[tuple[int, list[ShardRange]]]]) -> None:
        super().__init__()
        self.shards, self.cfg, self.transform, self.per_worker = shards, cfg, transform, per_worker

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, list[str], list[dict]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for block, ranges in self.per_worker[worker]:
            pixels, keys, metas = [], [], []
            for key, jpg, meta, _url in read_ranges(self.shards, ranges, lambda *a: None, self.cfg.tar_reader):
                try:  # the shard loader counts and logs skips; the cache leaves out what it skips
                    image = decode_image(key, jpg, draft_size=self.transform.draft_size, tensor_ok=True,
                                         fast=self.cfg.fast_decode)
                    pixels.append(self.transform.pixels(image))
                except (BadImageError, OSError, ValueError, RuntimeError):
                    continue
                keys.append(key)
                # Keep only what whole-image pairing reads (region pairing never uses the cache).
                metas.append({"width": meta.get("width"), "height": meta.get("height"),
                              "regions": [{"phrase": r.get("phrase")} for r in meta["regions"] if isinstance(r, dict)]})
            batch = self.transform.normalize(stack_images(pixels)) if pixels else torch.empty(0)
            yield block, batch, keys, metas


class FeatureCache:
    """Cached image features plus the metadata needed to pair them with texts each epoch."""

    def __init__(self, features: torch.Tensor, keys: list[str], metas: list[dict], *, config: Config,
                 tokenizer, rank: int, world_size: int) -> None:
        self.features, self.keys, self.metas = features, keys, metas
        self.config, self.tokenizer = config, tokenizer
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, *, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """This rank's (features [B,F], tokens) batches of `epoch` in a seeded order.

        Every rank takes the same number of batches and every row is used: the last global batch
        is filled up with rows from the start of the epoch's order (data/epoch_plan.py).
        """
        cfg, seed = self.config.data, self.config.train.seed
        order = list(range(len(self)))
        random.Random(stable_seed("cache-order", seed, epoch)).shuffle(order)
        n_batches = batches_per_rank(len(order), self.world_size, cfg.batch_size)
        slots = n_batches * self.world_size * cfg.batch_size
        order = (order * math.ceil(slots / max(1, len(order))))[:slots][self.rank :: self.world_size]
        pairing = parse_pairing(cfg.pairing)
        for b in range(start_batch, n_batches):
            rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            texts = []
            for i in rows:  # the same per-(seed, epoch, image) phrase choice as the shard loader
                rng = random.Random(stable_seed("pair", seed, epoch, self.keys[i]))
                meta = self.metas[i]
                text, _ = choose_pair(meta, pairing, rng, image_size=(meta["width"], meta["height"]),
                                      margin=cfg.region_margin, min_size=cfg.region_min_size)
                texts.append(text)
            tokens = self.tokenizer(texts)
            yield self.features[rows], {k: torch.as_tensor(v) for k, v in tokens.items()}


def build_feature_cache(config: Config, *, data_dir: Path, run_dir: Path, visual: nn.Module, eval_tf: Any,
                        tokenizer: Any, info: DistInfo) -> FeatureCache:
    """The run's feature cache: RUN/image_features.* when every rank finds them matching its tower and
    shards, else built by all ranks (each its share of the rows) and written by rank 0. Every rank
    then checks that it sees the cache rank 0 wrote (a run folder not shared between nodes fails here)."""
    shards = list_shards(data_dir, "train")
    path, index_path = run_dir / CACHE_FILE, run_dir / INDEX_FILE
    eval_tf = eval_transform(eval_tf, config.train.cache_views)  # "multi": each row is the mean over the views
    wanted = fingerprint(visual, shards, repr(eval_tf), fast_decode=config.data.fast_decode,
                         manifest=_remote_manifest(data_dir))
    others = [i for i, fp in enumerate(gather_bytes(wanted.encode(), info)) if fp.decode() != wanted]
    if others:
        raise VgclipError(f"--data {data_dir}: rank(s) {others} see other training shards (or tower weights) than "
                          f"rank {info.rank}: every node must read the same shards")
    if not all_ranks(_stored_fingerprints(path, index_path) == (wanted, wanted), info):  # stale on some rank
        _build(config, shards, visual, eval_tf, info, path, index_path, wanted)
    if not all_ranks(_stored_fingerprints(path, index_path) == (wanted, wanted), info):
        raise VgclipError(f"{path}: a rank does not see the feature cache rank 0 wrote; the run folder (--out) "
                          "must be on a filesystem every node shares")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    with safe_open(str(path), framework="pt") as fh:
        features = fh.get_tensor("features")
    return FeatureCache(features.to(info.device), index["keys"], index["metas"], config=config,
                        tokenizer=tokenizer, rank=info.rank, world_size=info.world_size)


def _build(config: Config, shards: list[Shard], visual: nn.Module, eval_tf: Any, info: DistInfo, path: Path,
           index_path: Path, wanted: str) -> None:
    """Every rank computes its share of the rows; rank 0 gathers them in rank order and writes both files."""
    # A block is BLOCK tower inputs: BLOCK images, or BLOCK / VIEWS images of VIEWS views each (the loader's
    # blocks in flight then take the memory of centre-crop ones, not VIEWS times it).
    block = BLOCK // VIEWS if isinstance(eval_tf, MultiCropTransform) else BLOCK
    features, keys, metas = compute_features(visual, shards, eval_tf, info.device, block, data_cfg=config.data,
                                             rank=info.rank, world_size=info.world_size)
    feature_parts = gather_bytes_to_main(save({"features": features.contiguous()}), info)
    index_parts = gather_bytes_to_main(json.dumps({"keys": keys, "metas": metas}).encode(), info)
    if info.is_main:
        tensors = [t for t in (load(part)["features"] for part in feature_parts) if t.numel()]
        indexes = [json.loads(part) for part in index_parts]
        with atomic_path(path) as tmp:
            save_file({"features": torch.cat(tensors) if tensors else torch.empty(0, 0)}, str(tmp),
                      metadata={"fingerprint": wanted})
        atomic_write_text(index_path, json.dumps({"fingerprint": wanted,
                                                  "keys": [k for part in indexes for k in part["keys"]],
                                                  "metas": [m for part in indexes for m in part["metas"]]}))
    barrier(info)


def _remote_manifest(data_dir: str | Path) -> dict | None:
    """A remote folder's manifest (what stands for its shards' contents in the fingerprint), else None."""
    return read_manifest(data_dir) if is_remote(data_dir) and not is_pattern(data_dir) else None


def _stored_fingerprints(path: Path, index_path: Path) -> tuple[str | None, str | None]:
    """(fingerprint of the features file, of the index file); None for a missing or unreadable one."""
    tensor_fp = index_fp = None
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensor_fp = (fh.metadata() or {}).get("fingerprint")
        index_fp = json.loads(index_path.read_text(encoding="utf-8")).get("fingerprint")
    except Exception:  # missing, truncated or foreign files: rebuild
        pass
    return tensor_fp, index_fp
