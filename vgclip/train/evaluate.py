"""Validation during training: contrastive loss and image<->text retrieval recall@K."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from vgclip.model.loss import ClipLoss

RECALL_AT = (1, 5, 10)


def recall_at_k(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks=RECALL_AT) -> dict[str, float]:
    """Retrieval recall where pair i is (image i, text i).

    i2t_rK: share of images whose own text ranks in the top K among all texts; t2i_rK the reverse.
    """
    sims = image_embeds.float() @ text_embeds.float().T
    target = torch.arange(len(sims), device=sims.device)
    out = {}
    for name, scores in (("i2t", sims), ("t2i", sims.T)):
        # Rank of the true partner = how many candidates score strictly higher.
        true_scores = scores[target, target].unsqueeze(1)
        rank = (scores > true_scores).sum(dim=1)
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_samples: int = 5000,
) -> dict[str, float]:
    """Mean per-batch loss over the validation batches, and recall@K over all of them at once.

    Recall is computed over up to `max_samples` pairs: the similarity matrix grows quadratically.
    """
    loss_fn = ClipLoss()  # this process's batches only: validation runs on one rank
    was_training = model.training
    model.eval()
    losses, weights, images_all, texts_all = [], [], [], []
    seen = 0
    try:
        for images, tokens in batches:
            images = images.to(device, non_blocking=True)
            tokens = {k: v.to(device, non_blocking=True) for k, v in tokens.items()}
            with autocast():
                out = model(images, tokens)
            loss = loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"])
            losses.append(float(loss) * len(images))
            weights.append(len(images))
            images_all.append(out["image_embeds"].float().cpu())
            texts_all.append(out["text_embeds"].float().cpu())
            seen += len(images)
            if seen >= max_samples:
                break
    finally:
        model.train(was_training)
    if not weights:
        return {}
    metrics = {"loss": sum(losses) / sum(weights), "samples": float(sum(weights))}
    metrics.update(recall_at_k(torch.cat(images_all)[:max_samples], torch.cat(texts_all)[:max_samples]))
    return metrics
