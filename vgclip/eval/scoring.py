"""Zero-shot scoring building blocks: encode images, read the model's logit scale, score embeddings.

`vgclip predict`, `vgclip serve`, the VOC evaluation (zeroshot.py) and the benchmarks all score with these,
so a label set gets the same scores everywhere (open_clip's zero_shot_classifier.py is the model: the
building blocks, apart from the evaluation that uses them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vgclip.config import SCORES, EvalConfig
from vgclip.data.views import encode_views, eval_transform, unit_image_encoder
from vgclip.data.voc import ImageListDataset, VocSplit, collate_images
from vgclip.errors import VgclipError

__all__ = ["EncodedImages", "ScoredSplit", "encode_images", "logit_scale_of", "score_embeddings", "score_split"]


@dataclass
class EncodedImages:
    """Image embeddings of the images that could be read, and why the others could not."""

    embeddings: torch.Tensor  # [N_ok, D], unit length (or the rows `encode_images` was asked for)
    ok: np.ndarray  # [N] bool over the requested images
    failed: list[tuple[int, str]] = field(default_factory=list)
    sample: torch.Tensor | None = None  # one transformed image, for models without get_logit_scale()


@torch.inference_mode()
def encode_images(
    model: torch.nn.Module,
    paths: Sequence[Path],
    image_transform: Callable,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    crops: str = "centre",
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EncodedImages:
    """Encode images in batches with a multi-worker DataLoader; unreadable files are reported, not fatal.

    `crops` is `eval.crops`: "multi" embeds several crops of each image and averages them (data/views.py).
    `rows` maps a batch on `device` ([B, 3, S, S], or [B, V, 3, S, S] for views) to one row per image; by
    default its unit embeddings (`encode_views`). train/zeroshot_tracking.py passes the locked image
    tower's per-view features instead, to cache them.
    """
    device = torch.device(device)
    image_transform = eval_transform(image_transform, crops)
    # NHWC convolutions: measured 1.65x faster image encoding for EfficientNet-Lite0 on CPU (oneDNN);
    # also the fast layout for tensor cores. Converts the model's 4-D weights in place.
    model = model.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(
        ImageListDataset(paths, image_transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    failed: list[tuple[int, str]] = []
    sample = None
    for batch in loader:
        failed.extend(batch["failed"])
        if batch["images"] is None:
            continue
        images = batch["images"].to(device, non_blocking=True)  # [B, 3, S, S], or [B, V, 3, S, S] for views
        if sample is None:
            sample = (images if images.dim() == 4 else images[:, 0])[:1].contiguous(memory_format=torch.channels_last)
        emb = rows(images) if rows is not None else encode_views(unit_image_encoder(model), images)
        chunks.append((batch["index"], emb.float().cpu()))
    ok = np.zeros(len(paths), dtype=bool)
    if not chunks:
        return EncodedImages(torch.zeros(0, 0), ok, failed, None)
    index = torch.cat([i for i, _ in chunks])
    emb = torch.cat([e for _, e in chunks])
    order = torch.argsort(index)  # DataLoader keeps order, but do not rely on it for correctness
    ok[index.numpy()] = True
    return EncodedImages(emb[order], ok, sorted(failed), sample)


@torch.inference_mode()
def logit_scale_of(model: torch.nn.Module, sample: torch.Tensor | None = None, tokens: Mapping | None = None) -> float:
    """exp(logit_scale) as the model applies it: `get_logit_scale()` if present, else from forward()."""
    if hasattr(model, "get_logit_scale"):
        return float(model.get_logit_scale())
    if sample is None or tokens is None:
        raise VgclipError("model has no get_logit_scale() and no sample batch was given to read it from forward()")
    return float(model(sample, tokens)["logit_scale"])


def score_embeddings(
    image_emb: torch.Tensor, class_emb: torch.Tensor, kind: str, logit_scale: float, logit_bias: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ranking scores) [N, C] in float64.

    softmax: over classes of logit_scale * cosine (CLIP's zero-shot rule, the seed's score);
    sigmoid: per class, of logit_scale * cosine + logit_bias; cosine: raw cosine similarity.
    Ranking scores order images within each class like the scores but never saturate (sigmoid of a
    large logit rounds to 1.0), so AP/ROC are computed from them. `kind` is a plain string here (predict
    and serve pass their own choice, not an EvalConfig), hence the one check.
    """
    if kind not in SCORES:
        raise VgclipError(f"eval.score must be one of {', '.join(SCORES)}, got {kind!r}")
    cos = image_emb.double() @ class_emb.double().T
    if kind == "cosine":
        scores = cos
    elif kind == "softmax":
        scores = torch.softmax(logit_scale * cos, dim=1)
    else:
        logits = logit_scale * cos + logit_bias
        return torch.sigmoid(logits).numpy(), logits.numpy()
    return scores.numpy(), scores.numpy()


@dataclass
class ScoredSplit:
    """A split with scores for the images that were evaluated (failed images already removed)."""

    data: VocSplit
    scores: np.ndarray
    ranking: np.ndarray
    failed: list[dict[str, str]]

    @property
    def valid(self) -> np.ndarray:
        return ~self.data.ignore


def score_split(
    model: torch.nn.Module,
    image_transform: Callable,
    data: VocSplit,
    class_emb: torch.Tensor,
    eval_cfg: EvalConfig,
    *,
    num_workers: int,
    device: torch.device | str,
    tokens_for_scale: Mapping | None = None,
    encoded: EncodedImages | None = None,
) -> ScoredSplit:
    """Encode a split's images and score them; unreadable images leave the split, each one listed.

    `encoded`: the split's images already embedded (`encode_images`' result over `data.image_paths`).
    """
    enc = encoded if encoded is not None else encode_images(
        model, data.image_paths, image_transform, eval_cfg.batch_size, num_workers, device, crops=eval_cfg.crops)
    failed = [{"image_id": data.image_ids[i], "reason": reason} for i, reason in enc.failed]
    if not enc.ok.any():
        raise VgclipError(f"{data.root}: no image of split '{data.split}' could be read ({failed[0]['reason']})")
    kept = data.subset(np.flatnonzero(enc.ok))
    kept.skipped.extend(failed)
    scale = logit_scale_of(model, enc.sample, tokens_for_scale)
    bias = float(getattr(model, "logit_bias", 0.0) or 0.0)
    scores, ranking = score_embeddings(enc.embeddings, class_emb.cpu(), eval_cfg.score, scale, bias)
    bad = ~np.isfinite(ranking).all(axis=1)
    if bad.any():
        raise VgclipError(f"the model gave non-finite scores for {int(bad.sum())} images (first: "
                          f"{kept.image_ids[int(np.argmax(bad))]}); is the checkpoint broken?")  # fmt: skip
    return ScoredSplit(kept, scores, ranking, failed)
