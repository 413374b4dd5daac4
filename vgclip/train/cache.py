"""Locked-image-tower training on cached features (LiT, Zhai et al. 2022).

When the image tower is fully frozen and images are not augmented, the tower maps each image to
the same pooled feature vector in every epoch. Computing it once and training the text tower,
the projections and the temperature on the cache removes the image tower (almost all of the
compute) from every later step: an epoch over the cache takes seconds on a CPU.

The cache lives beside the run: RUN/image_features.safetensors holds one tensor `features`
[N, F] and, in its metadata, a fingerprint of the image tower's weights, the eval transform and
the shard files; RUN/image_features.json holds the same fingerprint, the sample keys (row order)
and each image's phrases (for pairing texts each epoch). A cache whose fingerprints differ from
the current ones, or from each other, is rebuilt, never reused.
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
from torch import nn

from vgclip.config import Config
from vgclip.data.epoch_plan import batches_per_rank
from vgclip.data.pairing import choose_pair, parse_pairing, stable_seed
from vgclip.data.transforms import stack_images
from vgclip.train.distributed import DistInfo, barrier

CACHE_FILE = "image_features.safetensors"
INDEX_FILE = "image_features.json"


def cache_applies(config: Config) -> bool:
    """True when every epoch would feed the frozen image tower the very same pixels."""
    image = config.model.image
    return (config.train.cache_locked_image and image.lock and image.unlocked_blocks == 0
            and not config.data.augment and parse_pairing(config.data.pairing).kind != "region")


class CachedImageClip(nn.Module):
    """The model's forward with the image tower replaced by a look-up of its cached output.

    Shares every parameter with `model` (a ClipModel), so training this trains the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "image_embeds": F.normalize(self.model.image_proj(features), dim=-1),
            "text_embeds": self.model.encode_text(tokens),
            "logit_scale": self.model.get_logit_scale(),
        }


def fingerprint(visual: nn.Module, shards: list[Path], eval_transform_repr: str) -> str:
    """Hash of what the cached features depend on: tower weights, input transform, shard files."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(visual.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(eval_transform_repr.encode())
    for path in shards:
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


@torch.no_grad()
def compute_features(visual: nn.Module, shards: list[Path], transform, device: torch.device,
                     batch_size: int = 64) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Pooled features of every usable training image, with its key and metadata (row order)."""
    from vgclip.data.decoding import decode_image
    from vgclip.data.images import BadImageError
    from vgclip.data.loader import raw_samples

    keys, metas, rows, pending = [], [], [], []

    def flush() -> None:
        if pending:
            rows.append(visual(stack_images(pending).to(device)).float().cpu())
            pending.clear()

    # Decode exactly as the shard loader does for this transform, so cached features equal the
    # features of the images the loader would feed.
    draft = getattr(transform, "draft_size", None)
    tensor_ok = bool(getattr(transform, "accepts_uint8_tensors", False))
    was_training = visual.training
    visual.eval()
    for key, jpg, meta, _url in raw_samples(shards, lambda *a: None):  # the loader counts and logs skips
        try:
            pending.append(transform(decode_image(key, jpg, draft_size=draft, tensor_ok=tensor_ok)))
        except (BadImageError, OSError, ValueError, RuntimeError):
            continue  # the same images the loader skips as bad_image
        keys.append(key)
        # Keep only what whole-image pairing reads (region pairing never uses the cache).
        metas.append({"width": meta.get("width"), "height": meta.get("height"),
                      "regions": [{"phrase": r.get("phrase")} for r in meta["regions"] if isinstance(r, dict)]})
        if len(pending) == batch_size:
            flush()
    flush()
    visual.train(was_training)
    return (torch.cat(rows) if rows else torch.empty(0, 0)), keys, metas


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
    """Load RUN/image_features.safetensors if it matches the tower and shards; else compute and save it (rank 0)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vgclip.data.loader import list_shards
    from vgclip.io import atomic_path, atomic_write_text

    shards = list_shards(data_dir, "train")
    path, index_path = run_dir / CACHE_FILE, run_dir / INDEX_FILE
    wanted = fingerprint(visual, shards, repr(eval_tf))
    if info.is_main and _stored_fingerprints(path, index_path) != (wanted, wanted):
        features, keys, metas = compute_features(visual, shards, eval_tf, info.device)
        with atomic_path(path) as tmp:
            save_file({"features": features.contiguous()}, str(tmp), metadata={"fingerprint": wanted})
        atomic_write_text(index_path, json.dumps({"fingerprint": wanted, "keys": keys, "metas": metas}))
    barrier(info)
    index = json.loads(index_path.read_text(encoding="utf-8"))
    with safe_open(str(path), framework="pt") as fh:
        features = fh.get_tensor("features")
    return FeatureCache(features.to(info.device), index["keys"], index["metas"], config=config,
                        tokenizer=tokenizer, rank=info.rank, world_size=info.world_size)


def _stored_fingerprints(path: Path, index_path: Path) -> tuple[str | None, str | None]:
    """(fingerprint of the features file, of the index file); None for a missing or unreadable one."""
    from safetensors import safe_open

    tensor_fp = index_fp = None
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensor_fp = (fh.metadata() or {}).get("fingerprint")
        index_fp = json.loads(index_path.read_text(encoding="utf-8")).get("fingerprint")
    except Exception:  # missing, truncated or foreign files: rebuild
        pass
    return tensor_fp, index_fp
