"""Speed path: sparse gradients for vocabulary tables, and the clipping and zeroing that go with them.

What it buys. A text tower's token-embedding table is the largest tensor being trained (MiniLM:
30,522 x 384 floats, 47 MB), yet a batch of phrases touches a few hundred of its rows. PyTorch's
dense embedding backward allocates, zero-fills and frees a full-size gradient every step, then
clipping reads and scales all of it; on a CPU that is a noticeable share of a locked-image-tower
(LiT) step, where the image tower does not run. With `keep_embedding_grads`, the table's backward
is sparse, autograd adds those rows into a dense `.grad` buffer kept across steps, and
`clip_gradients` / `zero_grads` touch only the rows the step wrote. AdamW still receives the same
dense gradient, so every update is unchanged (tests/train/test_grads.py).

Measured where. The vgclip side of `benchmarks/bench_train.py` trains with it (README, "What it
does, measured"); figures live there, where they can be rerun.

How to turn it off. `train.sparse_embedding_grads=false` (plain dense gradients). It is also off
whenever it cannot apply: under DDP (NCCL cannot all-reduce sparse gradients) and with
`train.compile=true` (torch.compile traces the dense backward).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Embedding tables at least this large (rows) are vocabularies worth the sparse path; position and
# token-type tables are small and dense.
MIN_ROWS = 4096


def keep_embedding_grads(model: nn.Module, min_rows: int = MIN_ROWS) -> int:
    """Give the trainable vocabulary tables of `model` sparse backward into kept dense buffers.

    Single-process training only: DDP cannot all-reduce sparse gradients with NCCL, and
    torch.compile traces the dense backward. Returns the number of tables switched.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad and module.num_embeddings >= min_rows:
            weight = module.weight
            module.sparse = True
            weight.grad = torch.zeros_like(weight)
            weight._vgclip_rows = []  # rows written since the last zero_grads
            weight.register_hook(_record_rows(weight))
            switched += 1
    return switched


def _record_rows(weight: nn.Parameter):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.is_sparse:
            weight._vgclip_rows.append(grad._indices()[0])
        else:  # something produced a dense gradient after all: treat every row as written
            weight._vgclip_rows.append(torch.arange(grad.shape[0], device=grad.device))
        return grad

    return hook


def _written_rows(param: torch.Tensor, *, unique: bool) -> torch.Tensor | None:
    """Rows of a kept embedding buffer written since the last zeroing (repeats allowed unless
    `unique`: a norm must count each row once, zeroing need not); None for ordinary parameters."""
    rows = getattr(param, "_vgclip_rows", None)
    if rows is None:
        return None
    if not rows:
        return torch.empty(0, dtype=torch.long, device=param.device)
    merged = torch.cat(rows)
    return torch.unique(merged) if unique else merged


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """The total gradient norm (as `clip_grad_norm_` computes it), scaling gradients to `max_norm` if above.

    The caller needs the norm on the host (logging, skipping non-finite steps), so there is no
    multiply pass when no clipping is needed. Non-finite norms are returned and nothing is scaled.
    """
    dense, kept = [], []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            rows = _written_rows(param, unique=True)
            if rows is None:
                dense.append(param.grad)
            else:
                kept.append((param.grad, rows))
    parts = dense + [grad.index_select(0, rows) for grad, rows in kept]
    if not parts:
        return 0.0
    norms = torch._foreach_norm(parts)
    device = norms[0].device
    total = float(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])))
    if math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        torch._foreach_mul_(dense, coef)
        for grad, rows in kept:
            grad.index_copy_(0, rows, grad.index_select(0, rows).mul_(coef))
    return total


def zero_grads(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.zero_grad(set_to_none=True)`, except kept embedding buffers: their written rows are zeroed."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            rows = _written_rows(param, unique=False)
            if rows is None:
                param.grad = None
                continue
            if param.grad is None or param.grad.is_sparse:  # someone reset it: a fresh dense buffer
                param.grad = torch.zeros_like(param)
            else:
                param.grad.index_fill_(0, rows, 0.0)
            param._vgclip_rows.clear()
