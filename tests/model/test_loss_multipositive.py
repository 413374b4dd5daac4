"""Multi-positive InfoNCE (train.loss=multipositive): identical texts in a batch are positives of each other."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from tests._multiprocess import run_gloo_workers
from tests._train_fixtures import ToyClip, toy_batches
from vgclip.config import load_config
from vgclip.errors import ConfigError
from vgclip.model.loss import ClipLoss, text_keys
from vgclip.train.step import forward_backward


def _tokens(rows: list[list[int]], pad_to: int, left: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(rows), pad_to, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(pad_to - len(row), pad_to) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


def _unit(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_text_keys_follow_the_tokens_not_the_padding():
    rows = [[101, 7, 8, 102], [101, 8, 7, 102], [101, 7, 8, 102], [101, 7, 102], [101, 7, 8, 102, 0]]
    keys = text_keys(_tokens(rows[:4], pad_to=6))
    assert keys[0] == keys[2]  # same text
    assert len({keys[0].item(), keys[1].item(), keys[3].item()}) == 3  # order and length matter
    # The same text in a batch padded further, or on the left, has the same key.
    assert text_keys(_tokens(rows[:1], pad_to=12))[0] == keys[0]
    assert text_keys(_tokens(rows[:1], pad_to=9, left=True))[0] == keys[0]
    # A real token 0 inside the mask is not padding.
    assert text_keys(_tokens(rows[4:], pad_to=6))[0] != keys[0]


def test_text_keys_of_many_random_texts_do_not_collide():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (4096, 16), generator=g)
    keys = text_keys({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert keys.unique().numel() == torch.unique(ids, dim=0).shape[0] == 4096


def test_without_repeated_texts_it_is_exactly_clip_loss():
    images, texts = _unit(16, seed=1), _unit(16, seed=2)
    keys = torch.arange(16) * 7919
    for scale in (torch.tensor(14.3), torch.tensor(100.0)):
        img_a, txt_a = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        img_b, txt_b = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        plain = ClipLoss()(img_a, txt_a, scale)
        multi = ClipLoss(multi_positive=True)(img_b, txt_b, scale, keys)
        assert torch.equal(plain, multi)
        plain.backward()
        multi.backward()
        assert torch.equal(img_a.grad, img_b.grad) and torch.equal(txt_a.grad, txt_b.grad)


def test_repeated_texts_are_positives_of_each_other_hand_computed():
    # Pairs 0 and 1 carry the same text (embedded apart, as dropout in a training text tower does).
    images = _unit(3, dim=4, seed=3)
    texts = _unit(3, dim=4, seed=4)
    keys = torch.tensor([5, 5, 9])
    scale = 3.0
    logits = (scale * images @ texts.T).tolist()

    def log_softmax(row, j):
        return row[j] - math.log(sum(math.exp(v) for v in row))

    positives = {0: [0, 1], 1: [0, 1], 2: [2]}
    image_side = [-sum(log_softmax(logits[i], j) for j in positives[i]) / len(positives[i]) for i in range(3)]
    columns = [[logits[r][c] for r in range(3)] for c in range(3)]  # logits per text
    text_side = [-sum(log_softmax(columns[t], j) for j in positives[t]) / len(positives[t]) for t in range(3)]
    expected = (sum(image_side) / 3 + sum(text_side) / 3) / 2
    got = ClipLoss(multi_positive=True)(images, texts, scale, keys).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # Plain InfoNCE treats image 1 as a negative of text 0: a higher loss on the same embeddings.
    assert ClipLoss()(images, texts, scale).item() != pytest.approx(got, rel=1e-3)


def test_repeats_that_embed_identically_get_plain_infonce_gradients():
    """Why the option matters only with a stochastic text tower (dropout): when the repeated texts'
    embeddings are equal, plain InfoNCE's push of image 1 away from text 0 is cancelled by its pull
    to the identical text 1, and both losses give the same value and gradients."""
    images, texts = _unit(3, dim=4, seed=3), _unit(3, dim=4, seed=4)
    texts[1] = texts[0]
    grads = []
    for loss_fn, extra in ((ClipLoss(), ()), (ClipLoss(multi_positive=True), (torch.tensor([5, 5, 9]),))):
        img, txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        loss = loss_fn(img, txt, 3.0, *extra)
        loss.backward()
        # The text tower embeds both copies with the same weights: its gradient is their sum.
        grads.append((loss.item(), img.grad, txt.grad[0] + txt.grad[1], txt.grad[2]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for plain, multi in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(plain, multi, rtol=1e-5, atol=1e-7)


def test_keys_are_required_and_checked():
    with pytest.raises(ValueError, match="needs text_keys of shape \\[4\\]"):
        ClipLoss(multi_positive=True)(_unit(4), _unit(4), 1.0)
    with pytest.raises(ValueError, match="got \\(3,\\)"):
        ClipLoss(multi_positive=True)(_unit(4), _unit(4), 1.0, torch.arange(3))


def test_config_choice():
    assert load_config("tiny", ["train.loss=multipositive"]).train.loss == "multipositive"
    assert load_config("tiny").train.loss == "clip"
    with pytest.raises(ConfigError, match="train.loss='supcon'"):
        load_config("tiny", ["train.loss=supcon"])


def _with_repeats(batches):
    """Toy micro-batches where texts repeat within and across micro-batches."""
    first_ids = batches[0][1]["input_ids"][0].clone()
    first_mask = batches[0][1]["attention_mask"][0].clone()
    for _, tokens in batches:
        tokens["input_ids"][1], tokens["attention_mask"][1] = first_ids, first_mask
    return batches


class _RecordingLoss(ClipLoss):
    def __init__(self):
        super().__init__(multi_positive=True)
        self.seen: list[torch.Tensor] = []

    def forward(self, image_embeds, text_embeds, logit_scale, text_keys=None):
        self.seen.append(text_keys)
        return super().forward(image_embeds, text_embeds, logit_scale, text_keys)


def test_accumulated_multi_positive_gradient_equals_big_batch():
    micro = _with_repeats(toy_batches(2, batch=3, seed=1))
    big_batch = (torch.cat([b[0] for b in micro]),
                 {k: torch.cat([b[1][k] for b in micro]) for k in micro[0][1]})
    torch.manual_seed(0)
    model = ToyClip()
    big_loss = forward_backward(model, ClipLoss(multi_positive=True), [big_batch], autocast=contextlib.nullcontext)
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss_fn = _RecordingLoss()
    acc_loss = forward_backward(model, loss_fn, micro, autocast=contextlib.nullcontext)
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, big[name], rtol=1e-4, atol=1e-6, msg=name)
    # Every pass (the cached one and one per micro-batch) sees the keys of the whole accumulated batch,
    # where the repeated text (rows 0, 1 and 4) shares one key across micro-batches.
    expected = text_keys(big_batch[1])
    assert len(loss_fn.seen) == 3 and all(torch.equal(k, expected) for k in loss_fn.seen)
    assert expected[0] == expected[1] == expected[4] and expected.unique().numel() == 4


WORLD, PER_RANK = 2, 3
# Keys of the global batch (rank 0's rows, then rank 1's): repeats within a rank and across ranks.
GLOBAL_KEYS = torch.tensor([11, 22, 11, 33, 22, 44])


def _worker(rank: int, images, texts) -> list[tuple]:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # from torchrun's variables (tests/_multiprocess.py sets them)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    out = []
    for local in (False, True):
        img = images[part].clone().requires_grad_(True)
        txt = texts[part].clone().requires_grad_(True)
        loss_fn = ClipLoss(rank=rank, world_size=WORLD, local_loss=local, multi_positive=True)
        loss = loss_fn(img, txt, 5.0, GLOBAL_KEYS[part].clone())
        loss.backward()
        out.append((rank, local, loss.item(), img.grad.tolist(), txt.grad.tolist()))
    return out


def test_distributed_multi_positive_loss_uses_the_gathered_keys():
    images, texts = _unit(WORLD * PER_RANK, seed=5), _unit(WORLD * PER_RANK, seed=6)
    # run_gloo_workers fails the test if a rank raises, dies, or does not exit with code 0.
    got = [row for rows in run_gloo_workers(_worker, WORLD, args=(images, texts)) for row in rows]
    assert len(got) == 2 * WORLD
    img, txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    reference = ClipLoss(multi_positive=True)(img, txt, 5.0, GLOBAL_KEYS)
    reference.backward()
    # Without the other rank's keys the cross-rank repeat (22) would be a negative: another loss.
    assert reference.item() != pytest.approx(ClipLoss()(images, texts, 5.0).item(), rel=1e-3)
    for rank, local, loss, img_grad, txt_grad in got:
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        if not local:
            assert loss == pytest.approx(reference.item(), rel=1e-5)
        # all_gather's backward sums the ranks' gradients: world x the global loss's gradient (test_loss.py).
        torch.testing.assert_close(torch.tensor(img_grad), WORLD * img.grad[part], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(txt_grad), WORLD * txt.grad[part], rtol=1e-4, atol=1e-6)
    local_losses = [loss for _, local, loss, _, _ in got if local]
    assert sum(local_losses) / WORLD == pytest.approx(reference.item(), rel=1e-5)
