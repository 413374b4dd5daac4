"""ClipLoss: a hand-computed example, agreement with open_clip, and the distributed variants."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests._multiprocess import run_gloo_workers
from vgclip.model.loss import ClipLoss


def test_hand_computed_two_by_two():
    # Orthogonal unit vectors: logits = scale * I, so each row is softmax([s, 0]).
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = 2.0
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert ClipLoss()(images, texts, torch.tensor(scale)).item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_asymmetric():
    # Image 0 is equally close to both texts; image 1 matches text 1 only.
    images = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits per image = [[1, 1], [0, 1]]; per text = its transpose [[1, 0], [1, 1]].
    ce = lambda row, target: -math.log(math.exp(row[target]) / sum(math.exp(v) for v in row))  # noqa: E731
    image_side = (ce([1, 1], 0) + ce([0, 1], 1)) / 2
    text_side = (ce([1, 0], 0) + ce([1, 1], 1)) / 2
    loss = ClipLoss()(images, texts, 1.0)
    assert loss.item() == pytest.approx((image_side + text_side) / 2, rel=1e-6)


def test_matches_open_clip_on_random_embeddings():
    open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip_torch not installed")
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(16, 32, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(16, 32, generator=gen), dim=-1)
    scale = torch.tensor(14.3)
    ours = ClipLoss()(images, texts, scale)
    reference = open_clip_loss.ClipLoss()(images, texts, scale)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)


def test_gradients_flow_to_embeddings_and_scale():
    images = torch.randn(4, 8, requires_grad=True)
    texts = torch.randn(4, 8, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    ClipLoss()(images, texts, scale).backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0 and scale.grad.abs() > 0


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="embeddings"):
        ClipLoss()(torch.randn(4, 8), torch.randn(3, 8), 1.0)


def test_a_world_size_without_its_process_group_is_an_error():
    with pytest.raises(RuntimeError, match="world_size=2"):
        ClipLoss(rank=0, world_size=2)(torch.randn(4, 8), torch.randn(4, 8), 1.0)
    with pytest.raises(ValueError, match="rank 2 is not within world size 2"):
        ClipLoss(rank=2, world_size=2)


def _worker(rank: int, world: int, images, texts) -> list[tuple]:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # from torchrun's variables (tests/_multiprocess.py sets them)
    batch = images.shape[0] // world
    part = slice(rank * batch, (rank + 1) * batch)
    out = []
    for local in (False, True):
        img = images[part].clone().requires_grad_(True)
        txt = texts[part].clone().requires_grad_(True)
        loss = ClipLoss(rank=rank, world_size=world, local_loss=local)(img, txt, 5.0)
        loss.backward()
        out.append((rank, local, loss.item(), img.grad.tolist(), txt.grad.tolist()))
    # Inside a process group, the default loss still contrasts only what it is given (validation).
    out.append((rank, None, ClipLoss()(images[part], texts[part], 5.0).item(), None, None))
    return out


def test_distributed_loss_covers_the_global_batch():
    torch.manual_seed(0)
    world = 2
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    # run_gloo_workers fails the test if a rank raises, dies, or does not exit with code 0.
    got = [row for rows in run_gloo_workers(_worker, world, args=(world, images, texts)) for row in rows]
    assert len(got) == 3 * world
    img = images.clone().requires_grad_(True)
    txt = texts.clone().requires_grad_(True)
    reference = ClipLoss()(img, txt, 5.0)
    reference.backward()
    for rank, local, loss, img_grad, txt_grad in got:
        part = slice(rank * 3, (rank + 1) * 3)
        if local is None:
            assert loss == pytest.approx(ClipLoss()(images[part], texts[part], 5.0).item(), rel=1e-6)
            continue
        if not local:
            # Every rank computes the full global loss.
            assert loss == pytest.approx(reference.item(), rel=1e-5)
        # all_gather's backward sums the ranks' gradients. Global: world copies of the global loss;
        # local: the local losses sum to world x the global loss. Either way world x its gradient.
        torch.testing.assert_close(torch.tensor(img_grad), world * img.grad[part], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(txt_grad), world * txt.grad[part], rtol=1e-4, atol=1e-6)
    # The local losses average to the global loss (each row of the global logits belongs to one rank).
    local_losses = [loss for _, local, loss, _, _ in got if local is True]
    assert sum(local_losses) / world == pytest.approx(reference.item(), rel=1e-5)


def test_bf16_autocast_loss_equals_fp32_loss():
    """Logits at scale 100 need fp32: a bf16 matmul resolves them only to about 0.4."""
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(64, 256, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.5 * torch.randn(64, 256, generator=gen), dim=-1)
    scale = torch.tensor(100.0)
    fp32 = ClipLoss()(images, texts, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ClipLoss()(images, texts, scale)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(fp32.item(), abs=1e-3)


def _gloo_threads_after_teardown(rank: int, world: int) -> int:
    """Gather through ClipLoss, leave the group, and count gloo's worker threads still alive in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    features = torch.eye(2, 4)[[rank]].requires_grad_(True)
    ClipLoss(rank=rank, world_size=world)(features, features, 5.0).backward()
    dist.barrier()
    dist.destroy_process_group()
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    return sum(name.startswith("pt_gloo") for name in names)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
def test_leaving_the_group_stops_gloos_threads_after_a_gathered_loss():
    """A process that used ClipLoss's gather and left its group must not carry gloo threads into interpreter
    shutdown, where one freeing a tensor aborts the process (issue 21.3): the gather's module binds the group
    current at its import as a default argument, so it must be imported before any group exists."""
    assert run_gloo_workers(_gloo_threads_after_teardown, 2, args=(2,)) == [0, 0]
