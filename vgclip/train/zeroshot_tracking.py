"""Zero-shot quality while training (`vgclip train --val-voc-root`): the held-out folder scored every epoch.

After each epoch's validation, rank 0 scores a held-out VOC-layout folder zero-shot (the run's `eval`
settings; no threshold tuning, no files written) and the mAP goes to metrics.csv and the checkpoint, where
`train.select_by=zeroshot_map` can choose the best one (best_weights.py).

With the image tower locked whole (LiT, cache.py's `image_tower_locked`: nothing below the image head
trains) its output for every view of those photos is the same each epoch: the first scoring keeps it
(`TrunkFeatures`, keyed by the tower's weights, the transform and the photos) and later ones apply only the
image head (cache.py's `image_head`) and the text side, the same scores as the full path. A tower that
trains is run over every view each epoch; the start-up line says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgclip.config import Config
from vgclip.data.views import VIEWS, eval_transform
from vgclip.data.voc import VocSplit, find_voc_root, load_voc
from vgclip.errors import VgclipError
from vgclip.eval.scoring import EncodedImages, encode_images
from vgclip.eval.voc_evaluation import ZeroshotSettings, evaluate_zeroshot
from vgclip.train import state as S
from vgclip.train.cache import fingerprint, image_head, image_tower_locked

__all__ = ["TrunkFeatures", "TrunkCache", "ValVoc", "check_val_voc", "cost_line", "trunk_cached", "zeroshot_map",
           "progress_line"]

VAL_SPLIT = "val"  # scored when the folder's ImageSets/Main lists it
FALLBACK_SPLIT = "test"  # else the split `vgclip zeroshot` and load_voc default to
# Loggers whose per-load warnings (untuned thresholds, skipped images) were already shown once at the start.
QUIET_LOGGERS = ("vgclip.eval.voc_evaluation", "vgclip.data.voc")


@dataclass(frozen=True)
class TrunkFeatures:
    """The locked image tower's output for the photos of one split: `encoded.embeddings` is [N_ok, F] (one
    view each) or [N_ok, V, F] (eval.crops=multi), rows in the split's order, the photos that failed listed."""

    key: str  # fingerprint of the tower's weights, the eval transform and the photos' paths
    encoded: EncodedImages


@dataclass
class TrunkCache:
    """What rank 0 keeps between epochs: the last split's `TrunkFeatures` (None until the first scoring)."""

    features: TrunkFeatures | None = None


@dataclass(frozen=True)
class ValVoc:
    """The held-out folder scored every epoch, the split read from it and, on rank 0, its trunk features."""

    root: Path
    split: str
    cache: TrunkCache = field(default_factory=TrunkCache, compare=False, repr=False)


def check_val_voc(root: str | Path | None, config: Config) -> ValVoc | None:
    """The --val-voc-root folder, read once now so that a bad one fails before training; None if not given.

    train.select_by=zeroshot_map without the folder is an error too. Every rank checks (symmetric failure).
    """
    if root is None:
        if config.train.select_by == "zeroshot_map":
            raise VgclipError("train.select_by=zeroshot_map needs --val-voc-root DIR (a held-out VOC-layout folder "
                              "scored zero-shot each epoch)")
        return None
    try:
        found = find_voc_root(root)
        split = VAL_SPLIT if (found / "ImageSets" / "Main" / f"{VAL_SPLIT}.txt").is_file() else FALLBACK_SPLIT
        photos = len(load_voc(found, split, difficult=config.eval.difficult).image_ids)
    except VgclipError as exc:
        raise VgclipError(f"--val-voc-root: {exc}") from None
    # Every rank runs this before the process group exists: torchrun's RANK names rank 0, the one that scores.
    if not image_tower_locked(config) and os.environ.get("RANK", "0") == "0":
        print(f"vgclip train: {cost_line(photos, config)}", file=sys.stderr)
    return ValVoc(Path(root), split)


def cost_line(photos: int, config: Config) -> str:
    """What tracking costs with an image tower that trains (said once at start-up)."""
    views = VIEWS if config.eval.crops == "multi" else 1
    return (f"zero-shot tracking encodes {photos} photos x {views} view(s) (eval.crops={config.eval.crops}) through "
            "the whole image tower every epoch, as the tower trains; locked (model.image.lock=true, "
            "model.image.unlocked_blocks=0) it would encode them once per run")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def zeroshot_map(model: nn.Module, eval_tf, tokenizer, voc: ValVoc, config: Config,
                 device: torch.device) -> tuple[float | None, str]:
    """(mAP of `model` on the held-out split, "") or (None, why it could not be scored).

    A scoring problem mid-run is reported, not raised: under DDP the other ranks are waiting at the
    epoch's barrier, and the run's other checkpoints are still worth keeping.
    """
    options = ZeroshotSettings(tune_split=None, plots=False, num_workers=max(0, min(2, config.data.num_workers)))
    encode = _cached_encoder(model, eval_tf, voc, config, device, options.num_workers) \
        if trunk_cached(model, config) else None
    rng = S.rng_state()  # scoring (its loader's worker seeds) must not shift the training random stream
    was_training = model.training
    try:
        with _quiet(QUIET_LOGGERS):
            result = evaluate_zeroshot(model, eval_tf, tokenizer, voc.root, voc.split, config.eval, options,
                                       device=device, encode=encode)
        value = float(result.report.mAP) if result.report.mAP is not None else math.nan
        return (value, "") if math.isfinite(value) else (None, "zero-shot mAP is not a number (no positives?)")
    except VgclipError as exc:
        return None, f"zero-shot scoring of --val-voc-root failed: {exc}"
    finally:
        model.train(was_training)
        S.set_rng_state(*rng)


def trunk_cached(model: nn.Module, config: Config) -> bool:
    """True when the image tower's output can be kept between epochs: locked whole by the config (the LiT
    feature cache's rule) and, checked on the model itself, no tower parameter that trains."""
    visual, head = getattr(model, "visual", None), getattr(model, "image_proj", None)
    return (image_tower_locked(config) and isinstance(visual, nn.Module) and isinstance(head, nn.Module)
            and not any(p.requires_grad for p in visual.parameters()))


def _cached_encoder(model: nn.Module, eval_tf, voc: ValVoc, config: Config, device: torch.device,
                    num_workers: int) -> Callable[[VocSplit], EncodedImages]:
    """evaluate_zeroshot's `encode`: the tower's features of a split's views from `voc.cache` (computed on
    first use, or again if the tower's weights, the transform or the photos changed), then the image head."""
    crops, batch = config.eval.crops, config.eval.batch_size

    def encode(data: VocSplit) -> EncodedImages:
        key = fingerprint(model.visual, [], f"{eval_transform(eval_tf, crops)!r} {data.image_paths}", fast_decode=True)
        held = voc.cache.features
        if held is None or held.key != key:
            found = encode_images(model, data.image_paths, eval_tf, batch, num_workers, device, crops=crops,
                                  rows=_tower_rows(model.visual))
            held = voc.cache.features = TrunkFeatures(key, found)
        embeddings = _head_rows(model, held.encoded.embeddings, batch, device)
        return EncodedImages(embeddings, held.encoded.ok.copy(), list(held.encoded.failed), None)

    return encode


def _tower_rows(visual: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """encode_images' `rows`: the tower's output for each view, [B, F] or [B, V, F], computed exactly as
    `encode_views(unit_image_encoder(model), images)` computes it (channels-last input)."""
    def rows(images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:
            return visual(images.contiguous(memory_format=torch.channels_last))
        flat = images.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        return visual(flat).view(*images.shape[:2], -1)

    return rows


@torch.inference_mode()
def _head_rows(model: nn.Module, features: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Unit embeddings [N, D] from kept tower features: the image head, then (views) `encode_views`' mean."""
    if not features.numel():  # no photo could be read: score_split says so
        return features
    out = []
    for chunk in features.split(max(1, batch)):
        x = chunk.to(device)
        if x.dim() == 2:
            emb = image_head(model, x)
        else:
            emb = F.normalize(image_head(model, x.flatten(0, 1)).view(*x.shape[:2], -1).float().mean(1), dim=-1)
        out.append(emb.float().cpu())
    return torch.cat(out)


def progress_line(epoch: int, val: dict[str, float], pos: S.Position, select_by: str) -> None:
    """One stderr line per epoch with the validation loss and zero-shot mAP, marking a new best."""
    parts = []
    if "loss" in val:
        parts.append(f"val loss {val['loss']:.4f}")
    if "zeroshot_map" in val:
        parts.append(f"zero-shot mAP {val['zeroshot_map']:.4f}")
    if not parts:
        return
    previous = pos.best_zeroshot_map if select_by == "zeroshot_map" else pos.best_val_loss
    value = val.get("zeroshot_map" if select_by == "zeroshot_map" else "loss")
    best = " (best so far)" if S.is_better(select_by, value, previous) else ""
    print(f"vgclip train: epoch {epoch}: {', '.join(parts)}{best}", file=sys.stderr)
