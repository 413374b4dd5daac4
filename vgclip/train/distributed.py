"""Distributed data parallel from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Without those variables everything degrades to a single process on one device, so the same loop
runs unchanged on a laptop and under `torchrun --nproc_per_node N -m vgclip.cli train ...`.

Several nodes share one run folder: global rank 0 alone writes it (config, checkpoints, feature
cache) and the other ranks read it (resume, the cache). `check_shared_folder` proves that before
anything is written, so a folder that is not shared fails at once with one line on every rank.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vgclip.errors import VgclipError
from vgclip.io import atomic_write_text

RUN_TOKEN = ".run-token"  # written by rank 0 at start-up, read back by every rank


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and shows the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's variables (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap for multi-process runs; BatchNorm becomes SyncBatchNorm so its statistics span the global batch."""
    if not info.distributed:
        return model
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # torch implements SyncBatchNorm for accelerators only; CPU (gloo) runs keep per-rank statistics.
    if has_bn and info.device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_finite(flag: torch.Tensor, info: DistInfo) -> bool:
    """True only if `flag` is finite everywhere (all elements, all ranks): ranks must skip a step together."""
    ok = torch.tensor(float(bool(torch.isfinite(flag).all())), device=info.device)
    if info.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def all_ranks(flag: bool, info: DistInfo) -> bool:
    """True only if `flag` is true on every rank.

    Ranks may hold shards of different sizes; an epoch ends for all as soon as one rank runs
    out of batches, otherwise the others would block forever in the gradient all-reduce.
    """
    if not info.distributed:
        return flag
    t = torch.tensor(float(flag), device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _padded_bytes(blob: bytes, info: DistInfo) -> tuple[torch.Tensor, list[int]]:
    """`blob` as a uint8 tensor zero-padded to the longest rank's length, and every rank's length.

    Byte strings of different lengths travel as padded uint8 tensors on the job's device, which
    every backend (gloo, NCCL) can gather; nothing is pickled.
    """
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(info.device) if blob else \
        torch.zeros(0, dtype=torch.uint8, device=info.device)
    size = torch.tensor([data.numel()], device=info.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=info.device)
    padded[: data.numel()] = data
    return padded, lengths


def _unpad(parts: list[torch.Tensor], lengths: list[int]) -> list[bytes]:
    return [part[:n].cpu().numpy().tobytes() for part, n in zip(parts, lengths)]


def gather_bytes(blob: bytes, info: DistInfo) -> list[bytes]:
    """Every rank's `blob`, in rank order, on every rank (one process: `[blob]`)."""
    if not info.distributed:
        return [blob]
    padded, lengths = _padded_bytes(blob, info)
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return _unpad(parts, lengths)


def gather_bytes_to_main(blob: bytes, info: DistInfo) -> list[bytes]:
    """Every rank's `blob`, in rank order, on rank 0 only (others get []): for large parts that only
    the writer needs (a feature cache), where an all-gather would hold every part on every rank."""
    if not info.distributed:
        return [blob]
    padded, lengths = _padded_bytes(blob, info)
    parts = [torch.empty_like(padded) for _ in range(info.world_size)] if info.is_main else None
    dist.gather(padded, parts, dst=0)
    return _unpad(parts, lengths) if info.is_main else []


def check_shared_folder(folder: Path, info: DistInfo) -> None:
    """Rank 0 writes a fresh token into `folder`; after a barrier every rank must read it back.

    Raises the same one-line VgclipError on every rank (so none waits in a collective) naming the
    ranks that cannot see the folder rank 0 writes, e.g. node-local disks under the same path.
    """
    if not info.distributed:
        return
    token = gather_bytes(secrets.token_hex(16).encode(), info)[0].decode()  # rank 0's, on every rank
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / RUN_TOKEN, token)
    barrier(info)
    try:
        seen = (folder / RUN_TOKEN).read_text(encoding="utf-8")
    except OSError:
        seen = None
    blind = [r for r, ok in enumerate(gather_bytes(b"1" if seen == token else b"0", info)) if ok != b"1"]
    if blind:
        raise VgclipError(f"--out {folder}: rank(s) {blind} do not see the run folder rank 0 writes; with several "
                          "nodes it must be on a filesystem every node shares (same path everywhere)")


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
