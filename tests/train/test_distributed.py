"""DDP on CPU (gloo, 2 processes): loss and gradients equal one process on the same global batch."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from tests._multiprocess import run_gloo_workers
from tests._train_fixtures import ToyClip, toy_batches
from vgclip.model.loss import ClipLoss
from vgclip.train import distributed as D
from vgclip.train.step import forward_backward

WORLD = 2
PER_RANK = 3  # micro-batch size per process


def _global_micro_batches(accum: int):
    """Micro-batch j of the global batch = rank 0's j-th micro-batch + rank 1's j-th micro-batch."""
    per_rank = [toy_batches(accum, batch=PER_RANK, seed=10 + r) for r in range(WORLD)]
    merged = []
    for j in range(accum):
        parts = [per_rank[r][j] for r in range(WORLD)]
        merged.append((torch.cat([p[0] for p in parts]),
                       {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}))
    return per_rank, merged


CASES = [(1, False), (2, False), (1, True)]  # (accum_steps, local_loss)


def _worker(rank: int) -> dict[tuple[int, bool], dict[str, torch.Tensor]]:
    """This rank's gradients (and loss, as "__loss__") for every case."""
    info = D.init_distributed()  # from torchrun's variables (tests/_multiprocess.py sets them)
    out = {}
    for accum, local_loss in CASES:
        torch.manual_seed(0)
        model = D.wrap_model(ToyClip(), info)
        per_rank, _ = _global_micro_batches(accum)
        loss = forward_backward(model, ClipLoss(rank=rank, world_size=WORLD, local_loss=local_loss), per_rank[rank],
                                autocast=contextlib.nullcontext, all_finite=lambda t: D.all_finite(t, info))
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        grads["__loss__"] = torch.tensor(loss)
        out[(accum, local_loss)] = grads
    return out


@pytest.fixture(scope="module")
def ddp_results() -> list[dict]:
    """Spawn the two gloo processes once for all cases (process start-up dominates the cost)."""
    return run_gloo_workers(_worker, WORLD)


@pytest.mark.parametrize(("accum", "local_loss"), CASES)
def test_two_process_gradients_equal_single_process_global_batch(ddp_results, accum, local_loss):
    torch.manual_seed(0)
    model = ToyClip()
    _, merged = _global_micro_batches(accum)
    # Row order differs from the gathered one (micro-batch-major here, rank-major there); the loss
    # is invariant to permuting (image, text) pairs together, so gradients must still agree.
    loss = forward_backward(model, ClipLoss(), merged, autocast=contextlib.nullcontext)
    expected = {n: p.grad for n, p in model.named_parameters()}

    ranks = [ddp_results[r][(accum, local_loss)] for r in range(WORLD)]
    for name, grad in expected.items():
        for r in range(WORLD):  # DDP leaves every rank with the same averaged gradient
            torch.testing.assert_close(ranks[r][name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {r}: {name}")
    losses = [float(g["__loss__"]) for g in ranks]
    if local_loss:  # each rank contrasts its own rows; their mean is the global loss
        assert sum(losses) / WORLD == pytest.approx(loss, rel=1e-5)
    else:
        assert losses == pytest.approx([loss] * WORLD, rel=1e-5)


def _train_worker(rank: int, shards: str, run: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vgclip.config import load_config
    from vgclip.train.loop import train

    config = load_config("tiny", ["data.num_workers=0", "train.checkpoint_every=1", "train.epochs=2"])
    return train(config, shards, run)


@pytest.mark.slow
def test_training_loop_under_two_processes(tmp_path):
    from tests._train_fixtures import write_shards

    shards = write_shards(tmp_path / "shards", n_train=32, n_val=8, per_shard=8)  # 2 shards per rank
    run = tmp_path / "run"
    summaries = run_gloo_workers(_train_worker, WORLD, args=(str(shards), str(run)), timeout=400)
    # 16 samples per rank, batch 8: 2 steps per epoch, each over a global batch of 16.
    assert [s["steps"] for s in summaries] == [4, 4]
    assert summaries[0]["samples_seen"] == 64
    assert summaries[0]["val"] and (run / "model.safetensors").is_file()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len([r for r in rows if ",train," in r]) == 4  # rank 0 alone logs
