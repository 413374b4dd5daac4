"""One optimisation step's forward and backward passes, with gradient accumulation that keeps the
whole accumulated batch in the contrast (GradCache, Gao et al. 2021; open_clip's --accum-freq).

A contrastive loss is not a sum over examples: every image is contrasted with every text of the
batch. Plain gradient accumulation (average the losses of K small batches) therefore trains on K
small contrasts, which is weaker than one big contrast. GradCache gets the big-batch gradient
exactly with small-batch memory:
  1. embed all K micro-batches without autograd and cache the embeddings;
  2. for each micro-batch again, embed it *with* autograd, put those fresh embeddings in place of
     its cached ones and back-propagate the big-batch loss. Only that micro-batch's activations
     are alive at a time; the sum over the K backward passes equals the big-batch gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vgclip.model.loss import ContrastiveLoss, text_keys

Batch = tuple[torch.Tensor, Mapping[str, torch.Tensor]]


class _RngReplay:
    """Remember the RNG state before a forward pass so it can be replayed identically.

    The recomputed forward in step 2 must produce the very embeddings cached in step 1, so any
    dropout inside the towers has to draw the same masks both times.
    """

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _backward(loss: torch.Tensor, scaler: Any) -> None:
    # fp16 gradients underflow without loss scaling; GradScaler multiplies here and unscales before clipping.
    (scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss).backward()


def _loss(loss_fn: ContrastiveLoss, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
          keys: torch.Tensor | None) -> torch.Tensor:
    return loss_fn(images, texts, scale) if keys is None else loss_fn(images, texts, scale, keys)


def _batch_keys(loss_fn: ContrastiveLoss, micro_batches: Sequence[Batch]) -> torch.Tensor | None:
    """The text keys of the whole accumulated batch, when the loss counts identical texts as positives."""
    if not loss_fn.multi_positive:
        return None
    return torch.cat([text_keys(tokens) for _, tokens in micro_batches])


def forward_backward(
    model: nn.Module,
    loss_fn: ContrastiveLoss,
    micro_batches: Sequence[Batch],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: Any = None,
    all_finite: Callable[[torch.Tensor], bool] = lambda t: bool(torch.isfinite(t).all()),
) -> float:
    """Accumulate into `.grad` the gradient of the contrastive loss over all `micro_batches` together.

    Returns the loss value, or NaN/inf without touching any gradient when the loss is not finite
    (`all_finite` lets distributed runs agree on that, so every rank skips the same step).
    """
    keys = _batch_keys(loss_fn, micro_batches)
    if len(micro_batches) == 1:
        images, tokens = micro_batches[0]
        with autocast():
            out = model(images, tokens)
            loss = _loss(loss_fn, out["image_embeds"], out["text_embeds"], out["logit_scale"], keys)
        if not all_finite(loss.detach()):
            return float(loss.detach())
        _backward(loss, scaler)
        return float(loss.detach())
    return _cached_forward_backward(model, loss_fn, micro_batches, autocast, scaler, all_finite, keys)


def _cached_forward_backward(model, loss_fn, micro_batches, autocast, scaler, all_finite, keys) -> float:
    device = micro_batches[0][0].device
    replays: list[_RngReplay] = []
    cached_img: list[torch.Tensor] = []
    cached_txt: list[torch.Tensor] = []
    with torch.no_grad(), autocast():  # step 1: embeddings only, no activations kept
        for images, tokens in micro_batches:
            replays.append(_RngReplay(device))
            out = model(images, tokens)
            cached_img.append(out["image_embeds"])
            cached_txt.append(out["text_embeds"])
        loss = _loss(loss_fn, torch.cat(cached_img), torch.cat(cached_txt), out["logit_scale"], keys)
    if not all_finite(loss):
        return float(loss)
    after = _RngReplay(device)
    last = len(micro_batches) - 1
    for i, (images, tokens) in enumerate(micro_batches):  # step 2: one micro-batch with autograd at a time
        replays[i].restore()
        # DDP: all-reduce gradients only once, after the last micro-batch.
        sync = contextlib.nullcontext() if i == last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                out = model(images, tokens)
                img = torch.cat([*cached_img[:i], out["image_embeds"], *cached_img[i + 1 :]])
                txt = torch.cat([*cached_txt[:i], out["text_embeds"], *cached_txt[i + 1 :]])
                # The temperature is shared by all K passes: let only one of them carry its
                # gradient, otherwise it would be counted K times. The last one, because DDP
                # expects every parameter to receive a gradient in the synchronising pass.
                scale = out["logit_scale"] if i == last else out["logit_scale"].detach()
                micro_loss = _loss(loss_fn, img, txt, scale, keys)
            _backward(micro_loss, scaler)
    after.restore()  # continue the random stream as if each micro-batch had been seen once
    return float(loss)
