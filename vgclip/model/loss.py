"""Symmetric InfoNCE (CLIP) loss, over this process's batch or, when told the job's world size, the global batch.

With `multi_positive=True`, texts that are identical as the model reads them (same token ids) are
positives of each other: Visual Genome repeats phrases across images ("man wearing a shirt"), and
plain InfoNCE would push each such image away from a text that describes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# At import, before any process group exists: this module's functions bind the group current when it is first
# imported as their default `group=`, which would keep a later group and gloo's threads alive past
# destroy_process_group() into interpreter shutdown, where a gloo thread freeing a tensor aborts the process.
if dist.is_available():
    import torch.distributed.nn.functional as dist_fn


def gather_with_grad(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `features` from the `world_size` ranks of the default process group (rank order);
    gradients flow back to each rank's part."""
    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise RuntimeError(f"ClipLoss(world_size={world_size}) needs an initialised process group of that size")
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); the public one still works.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated")
        return torch.cat(dist_fn.all_gather(features), dim=0)


# Two Mersenne-like primes below 2**31 and bases: each term (token+1) * base**k mod p stays below
# 2**62, so the hashes are exact in int64 on every device; together they give a 62-bit key.
_HASH_PRIMES = (2_147_483_647, 2_147_483_629)
_HASH_BASES = (1_000_003, 998_244_353)


def text_keys(tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One int64 key per text of a tokenised batch: equal keys <=> equal token ids (up to a ~2**-62 collision).

    Only the tokens under `attention_mask` count, by their position among those tokens, so the key
    of a text does not depend on how far its batch was padded (or on which side). Texts truncated
    at `max_length` to the same tokens share a key: the model cannot tell them apart either.
    """
    ids = tokens["input_ids"].long()
    mask = tokens.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    position = (mask.cumsum(dim=1) - 1).clamp(min=0)
    key = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    for prime, base in zip(_HASH_PRIMES, _HASH_BASES):
        powers = torch.ones(ids.shape[1], dtype=torch.long, device=ids.device)
        for k in range(1, ids.shape[1]):
            powers[k] = powers[k - 1] * base % prime
        terms = (ids + 1) % prime * powers[position] % prime * mask
        key = key * prime + terms.sum(dim=1) % prime
    return key


class ContrastiveLoss(Protocol):
    """What the training step calls: `loss(image_embeds, text_embeds, logit_scale[, text_keys])`.

    `multi_positive` tells the step to compute `text_keys` (see `text_keys`) and pass them.
    """

    multi_positive: bool

    def __call__(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                 text_keys: torch.Tensor | None = None) -> torch.Tensor: ...


def gather_keys(keys: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate the ranks' text keys (no gradient), in rank order like `gather_with_grad`."""
    parts = [torch.empty_like(keys) for _ in range(world_size)]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts)


class ClipLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy; the i-th image matches the i-th text.

    `ClipLoss()` contrasts the batch it is given (one process, or validation on one rank).
    `ClipLoss(rank=r, world_size=n)` with n > 1 all-gathers the features of the n processes of the
    default process group, with gradients, so every sample is contrasted with the whole global
    batch. `local_loss=True` then contrasts only the local features against the global ones
    (labels offset by rank): same gradients in expectation, B x (n*B) logits per rank instead of (n*B)^2.

    `multi_positive=True` (multi-positive InfoNCE, SupCon's "L_out" form): each row's target is
    spread evenly over every column whose text key equals its own (the keys of the global batch
    under DDP), so pairs with identical texts are not negatives of each other. With no repeated
    key in the batch the targets are one-hot and the loss is exactly `ClipLoss`'s.
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1, local_loss: bool = False,
                 multi_positive: bool = False):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClipLoss: rank {rank} is not within world size {world_size}")
        self.rank, self.world_size, self.local_loss = rank, world_size, local_loss
        self.multi_positive = multi_positive

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
        text_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss from [B,D] image and text embeddings, the (exp'd) logit scale and, for the
        multi-positive loss, the [B] text keys (`text_keys(tokens)`)."""
        if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
            raise ValueError(
                f"image and text embeddings must both be [B, D]; got {tuple(image_embeds.shape)} "
                f"and {tuple(text_embeds.shape)}"
            )
        if self.multi_positive and (text_keys is None or text_keys.shape != image_embeds.shape[:1]):
            got = None if text_keys is None else tuple(text_keys.shape)
            raise ValueError(f"ClipLoss(multi_positive=True) needs text_keys of shape [{image_embeds.shape[0]}], "
                             f"got {got}")
        # fp32 even under autocast: at scale up to 100 a bf16 matmul resolves logits only to about 0.4.
        with torch.autocast(image_embeds.device.type, enabled=False):
            logits_per_image, logits_per_text, labels = self.logits(image_embeds, text_embeds, logit_scale)
            if self.multi_positive:
                labels = self.soft_targets(text_keys, labels)
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def soft_targets(self, keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[rows, columns] target probabilities: even over the columns whose key equals the row's.

        Row i's own key sits at column `labels[i]`; the columns are the global batch under DDP.
        Both directions share it: text i's positives are the images paired with text i's key.
        """
        columns = gather_keys(keys, self.world_size) if self.world_size > 1 else keys
        same = (columns[labels].unsqueeze(1) == columns.unsqueeze(0)).float()
        return same / same.sum(dim=1, keepdim=True)

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
