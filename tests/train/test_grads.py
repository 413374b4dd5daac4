"""Kept sparse embedding gradients, clipping and zeroing change no update of the training step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vgclip.train.grads import clip_gradients, keep_embedding_grads, zero_grads


class TinyText(nn.Module):
    """A vocabulary table big enough for the sparse path, a small position table and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(5000, 8, padding_idx=0)
        self.positions = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return self.head(torch.tanh(self.tokens(ids) + self.positions(pos))).mean(1)


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 300, (6, 5), generator=gen)
        ids[:, -1] = 0  # padding
        out.append(ids)
    return out


def train(model: nn.Module, kept: bool, max_norm: float, accum: int = 1) -> tuple[nn.Module, list[float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    if kept:
        assert keep_embedding_grads(model) == 1  # the 5000-row table, not the 16-row one
    norms = []
    data = batches(4 * accum)
    for step in range(4):
        for ids in data[step * accum : (step + 1) * accum]:
            (model(ids) ** 2).sum().backward()
        if kept:
            norms.append(clip_gradients(opt, max_norm))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        zero_grads(opt) if kept else opt.zero_grad(set_to_none=True)
    return model, norms


@pytest.mark.parametrize("max_norm", [1e9, 0.05])  # never clips / always clips
@pytest.mark.parametrize("accum", [1, 2])
def test_kept_sparse_embedding_grads_give_the_same_updates(max_norm, accum):
    torch.manual_seed(0)
    start = TinyText()
    dense, dense_norms = train(copy.deepcopy(start), kept=False, max_norm=max_norm, accum=accum)
    kept, kept_norms = train(copy.deepcopy(start), kept=True, max_norm=max_norm, accum=accum)
    assert kept.tokens.sparse and not kept.positions.sparse
    assert kept_norms == pytest.approx(dense_norms, rel=1e-5)
    for (name, a), b in zip(dense.named_parameters(), kept.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(kept.tokens.weight, start.tokens.weight)  # it did train


def test_zero_grads_keeps_one_zeroed_buffer_and_resets_the_rest():
    model = TinyText()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    keep_embedding_grads(model)
    buffer = model.tokens.weight.grad
    model(batches(1)[0]).sum().backward()
    assert model.tokens.weight.grad is buffer and buffer.abs().sum() > 0
    opt.step()
    zero_grads(opt)
    assert model.tokens.weight.grad is buffer and not buffer.any()
    assert model.head.weight.grad is None and model.positions.weight.grad is None
    model.tokens.weight.grad = None  # e.g. a caller's optimizer.zero_grad(): the buffer comes back
    zero_grads(opt)
    assert model.tokens.weight.grad is not None and not model.tokens.weight.grad.is_sparse


def test_non_finite_norm_is_reported_and_nothing_scaled():
    model = TinyText()
    opt = torch.optim.AdamW(model.parameters())
    keep_embedding_grads(model)
    model(batches(1)[0]).sum().backward()
    model.head.weight.grad[0, 0] = float("nan")
    before = model.tokens.weight.grad.clone()
    assert clip_gradients(opt, 1e-3) != clip_gradients(opt, 1e-3)  # nan
    torch.testing.assert_close(model.tokens.weight.grad, before)
