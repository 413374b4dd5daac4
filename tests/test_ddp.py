"""DDP on CPU (gloo, 2 processes): loss and gradients equal one process on the same global batch."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _train_fixtures import ToyClip, free_port, toy_batches
from safetensors.torch import load_file, save_file

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


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_distributed()
    try:
        for accum, local_loss in CASES:
            torch.manual_seed(0)
            model = D.wrap_model(ToyClip(), info)
            per_rank, _ = _global_micro_batches(accum)
            loss = forward_backward(model, ClipLoss(rank=rank, world_size=WORLD, local_loss=local_loss), per_rank[rank],
                                    autocast=contextlib.nullcontext, all_finite=lambda t: D.all_finite(t, info))
            grads = {n: p.grad for n, p in model.module.named_parameters()}
            grads["__loss__"] = torch.tensor(loss)
            save_file(grads, os.path.join(out_dir, f"{accum}-{local_loss}-rank{rank}.safetensors"))
        D.barrier(info)  # leave together: tearing gloo down under a peer's collective aborts it
    finally:
        D.cleanup(info)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Spawn the two gloo processes once for all cases (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize(("accum", "local_loss"), CASES)
def test_two_process_gradients_equal_single_process_global_batch(ddp_results, accum, local_loss):
    torch.manual_seed(0)
    model = ToyClip()
    _, merged = _global_micro_batches(accum)
    # Row order differs from the gathered one (micro-batch-major here, rank-major there); the loss
    # is invariant to permuting (image, text) pairs together, so gradients must still agree.
    loss = forward_backward(model, ClipLoss(), merged, autocast=contextlib.nullcontext)
    expected = {n: p.grad for n, p in model.named_parameters()}

    ranks = [load_file(str(ddp_results / f"{accum}-{local_loss}-rank{r}.safetensors")) for r in range(WORLD)]
    for name, grad in expected.items():
        for r in range(WORLD):  # DDP leaves every rank with the same averaged gradient
            torch.testing.assert_close(ranks[r][name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {r}: {name}")
    losses = [float(g["__loss__"]) for g in ranks]
    if local_loss:  # each rank contrasts its own rows; their mean is the global loss
        assert sum(losses) / WORLD == pytest.approx(loss, rel=1e-5)
    else:
        assert losses == pytest.approx([loss] * WORLD, rel=1e-5)


def _train_worker(rank: int, port: int, shards: str, run: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from vgclip.config import load_config
    from vgclip.train.loop import train

    config = load_config("tiny", ["data.num_workers=0", "train.checkpoint_every=1", "train.epochs=2"])
    summary = train(config, shards, run)
    (Path(run) / f"summary-{rank}.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_training_loop_under_two_processes(tmp_path):
    from _train_fixtures import write_shards

    shards = write_shards(tmp_path / "shards", n_train=32, n_val=8, per_shard=8)  # 2 shards per rank
    run = tmp_path / "run"
    mp.spawn(_train_worker, args=(free_port(), str(shards), str(run)), nprocs=WORLD, join=True)
    summaries = [json.loads((run / f"summary-{r}.json").read_text()) for r in range(WORLD)]
    # 16 samples per rank, batch 8: 2 steps per epoch, each over a global batch of 16.
    assert [s["steps"] for s in summaries] == [4, 4]
    assert summaries[0]["samples_seen"] == 64
    assert summaries[0]["val"] and (run / "model.safetensors").is_file()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len([r for r in rows if ",train," in r]) == 4  # rank 0 alone logs
