"""Symmetric InfoNCE (CLIP) loss, over the global batch when training is distributed."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features` from every rank (rank order); gradients flow back to each rank's part."""
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); the public one still works.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated")
        return torch.cat(dist_fn.all_gather(features), dim=0)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ClipLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy; the i-th image matches the i-th text.

    With torch.distributed initialised (world size > 1) features are all-gathered with gradients,
    so every sample is contrasted with the whole global batch. `local_loss=True` contrasts only
    the local features against the global ones (labels offset by rank): same gradients in
    expectation, B x (world*B) logits per rank instead of (world*B)^2.
    """

    def __init__(self, local_loss: bool = False):
        super().__init__()
        self.local_loss = local_loss

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        """Scalar loss from [B,D] image and text embeddings and the (exp'd) logit scale."""
        if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
            raise ValueError(
                f"image and text embeddings must both be [B, D]; got {tuple(image_embeds.shape)} "
                f"and {tuple(text_embeds.shape)}"
            )
        logits_per_image, logits_per_text, labels = self.logits(image_embeds, text_embeds, logit_scale)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def logits(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits per image, logits per text, target index of each row)."""
        rank, world_size = _world()
        batch = image_embeds.shape[0]
        if world_size > 1:
            all_images = gather_with_grad(image_embeds)
            all_texts = gather_with_grad(text_embeds)
            if self.local_loss:
                per_image = logit_scale * image_embeds @ all_texts.T
                per_text = logit_scale * text_embeds @ all_images.T
                labels = torch.arange(batch, device=image_embeds.device) + rank * batch
                return per_image, per_text, labels
            image_embeds, text_embeds = all_images, all_texts
        per_image = logit_scale * image_embeds @ text_embeds.T
        labels = torch.arange(per_image.shape[0], device=image_embeds.device)
        return per_image, per_image.T, labels
