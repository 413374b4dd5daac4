"""Gradient accumulation keeps the whole accumulated batch in the contrast (GradCache)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests._train_fixtures import ToyClip, toy_batches
from vgclip.model.loss import ClipLoss
from vgclip.train.step import forward_backward


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _cat(batches):
    images = torch.cat([b[0] for b in batches])
    tokens = {k: torch.cat([b[1][k] for b in batches]) for k in batches[0][1]}
    return images, tokens


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_gradient_equals_big_batch(k):
    torch.manual_seed(0)
    model = ToyClip()
    micro = toy_batches(k, batch=3, seed=1)
    loss_fn = ClipLoss()

    big_loss = forward_backward(model, loss_fn, [_cat(micro)], autocast=contextlib.nullcontext)
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    acc_loss = forward_backward(model, loss_fn, micro, autocast=contextlib.nullcontext)
    acc = _grads(model)

    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    assert big.keys() == acc.keys() and "logit_scale" in acc
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_is_not_the_mean_of_small_contrasts():
    """Guard against the naive alternative: averaging per-micro-batch losses gives other gradients."""
    torch.manual_seed(0)
    model = ToyClip()
    micro = toy_batches(2, batch=3, seed=1)
    forward_backward(model, ClipLoss(), [_cat(micro)], autocast=contextlib.nullcontext)
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    for batch in micro:
        out = model(*batch)
        (ClipLoss()(out["image_embeds"], out["text_embeds"], out["logit_scale"]) / 2).backward()
    naive = _grads(model)
    assert not torch.allclose(naive["image_proj.weight"], big["image_proj.weight"], rtol=1e-3, atol=1e-6)


def test_dropout_masks_are_replayed():
    """With dropout, the recomputed pass must see the same masks as the cached one.

    Reference: the same micro-batches forwarded with autograd in the same order from the same seed,
    concatenated, one loss. Without RNG replay the gradients would not match.
    """
    model = ToyClip(dropout=0.5)
    model.train()
    micro = toy_batches(3, batch=4, seed=2)
    loss_fn = ClipLoss()

    torch.manual_seed(123)
    outs = [model(*b) for b in micro]
    ref_loss = loss_fn(torch.cat([o["image_embeds"] for o in outs]), torch.cat([o["text_embeds"] for o in outs]),
                       outs[-1]["logit_scale"])
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    loss = forward_backward(model, loss_fn, micro, autocast=contextlib.nullcontext)
    got = _grads(model)
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_non_finite_loss_leaves_gradients_untouched():
    model = ToyClip()
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    micro = toy_batches(2, batch=3)
    for batches in ([micro[0]], micro):
        loss = forward_backward(model, ClipLoss(), batches, autocast=contextlib.nullcontext)
        assert loss != loss  # NaN
        assert all(p.grad is None for p in model.parameters())
