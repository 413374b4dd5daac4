"""Symmetric InfoNCE (CLIP) loss, over this process's batch or, when told the job's world size, the global batch."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_with_grad(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `features` from the `world_size` ranks of the default process group (rank order);
    gradients flow back to each rank's part."""
    import torch.distributed.nn.functional as dist_fn

    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise RuntimeError(f"ClipLoss(world_size={world_size}) needs an initialised process group of that size")
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); the public one still works.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated")
        return torch.cat(dist_fn.all_gather(features), dim=0)


class ClipLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy; the i-th image matches the i-th text.

    `ClipLoss()` contrasts the batch it is given (one process, or validation on one rank).
    `ClipLoss(rank=r, world_size=n)` with n > 1 all-gathers the features of the n processes of the
    default process group, with gradients, so every sample is contrasted with the whole global
    batch. `local_loss=True` then contrasts only the local features against the global ones
    (labels offset by rank): same gradients in expectation, B x (n*B) logits per rank instead of (n*B)^2.
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1, local_loss: bool = False):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClipLoss: rank {rank} is not within world size {world_size}")
        self.rank, self.world_size, self.local_loss = rank, world_size, local_loss

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        """Scalar loss from [B,D] image and text embeddings and the (exp'd) logit scale."""
        if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
            raise ValueError(
                f"image and text embeddings must both be [B, D]; got {tuple(image_embeds.shape)} "
                f"and {tuple(text_embeds.shape)}"
            )
        # fp32 even under autocast: at scale up to 100 a bf16 matmul resolves logits only to about 0.4.
        with torch.autocast(image_embeds.device.type, enabled=False):
            logits_per_image, logits_per_text, labels = self.logits(image_embeds, text_embeds, logit_scale)
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def logits(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits per image, logits per text, target index of each row), in fp32."""
        batch = image_embeds.shape[0]
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = logit_scale.float()
        image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
        if self.world_size > 1:
            all_images = gather_with_grad(image_embeds, self.world_size)
            all_texts = gather_with_grad(text_embeds, self.world_size)
            if self.local_loss:
                per_image = logit_scale * image_embeds @ all_texts.T
                per_text = logit_scale * text_embeds @ all_images.T
                labels = torch.arange(batch, device=image_embeds.device) + self.rank * batch
                return per_image, per_text, labels
            image_embeds, text_embeds = all_images, all_texts
        per_image = logit_scale * image_embeds @ text_embeds.T
        labels = torch.arange(per_image.shape[0], device=image_embeds.device)
        return per_image, per_image.T, labels
