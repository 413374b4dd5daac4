"""The processes of a tagging job: one, or several under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set).

Tagging sits below `train/` in the layers (serve imports it), so it joins the group itself rather than
through `train/distributed.py`: gloo on CPU, NCCL on GPUs, and only barriers and a broadcast of a short
text travel between ranks (each rank writes its own parts; rank 0 merges them from the shared folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "barrier", "broadcast_text", "join_ranks", "leave_ranks"]


@dataclass(frozen=True)
class Ranks:
    """This process's rank, the job's size, and the device it encodes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    joined: bool = False  # this process started the group (and leaves it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_ranks(device: str | None = None) -> Ranks:
    """One process (no torchrun variables), or this rank of the group torchrun describes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if world_size <= 1:
        return Ranks(device=torch.device(device or ("cuda" if cuda else "cpu")))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return Ranks(rank, world_size, dev, joined)


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing to do in one process)."""
    if ranks.world_size > 1:
        dist.barrier()


def broadcast_text(text: str, ranks: Ranks) -> str:
    """Rank 0's `text`, on every rank."""
    if ranks.world_size <= 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave_ranks(ranks: Ranks) -> None:
    """Leave the group this process joined."""
    if ranks.joined and dist.is_initialized():
        dist.destroy_process_group()
