"""Which samples each rank and loader worker reads in a training epoch: equal steps, no sample lost.

Splitting whole shards between ranks leaves ranks with different amounts of data (80 shards over
64 ranks: 16 ranks hold two shards, 48 hold one), and an epoch must end when the first rank runs
out, so the rest of the data is never seen. Here the epoch is planned over samples instead:

1. the shards, in the epoch's (shuffled) order, form one sequence of N samples;
2. every rank takes the same number of batches, S = ceil(N / (world_size * batch_size)); the
   S * world_size * batch_size slots are filled from the sequence, wrapping around to its start
   for the last few (`duplicates` < world_size * batch_size samples are seen twice, counted);
3. rank r reads the slots [r*S*B, (r+1)*S*B), split between its loader workers in whole batches,
   so no worker ends with a partial batch to drop.
A worker's slots are contiguous: it reads only the shards they touch, from `start` to `stop`
(samples in file order, counting only usable ones, as the loader's reader yields them).
Pure arithmetic on the shard sizes: every rank computes the same plan without talking to the others.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard `shard` (an index into the epoch's shard list); `repeat`: a
    second reading that fills the last global batch (its samples were already read this epoch)."""

    shard: int
    start: int
    stop: int
    repeat: bool = False


@dataclass(frozen=True)
class EpochPlan:
    """One training epoch's assignment of samples to ranks and loader workers."""

    batches_per_rank: int  # S: the same on every rank
    duplicates: int  # samples read twice to fill the last global batch (< world_size * batch_size)
    worker_batches: tuple[tuple[int, ...], ...]  # [rank][worker]: batches each worker yields
    pieces: tuple[tuple[tuple[Piece, ...], ...], ...]  # [rank][worker]: what each worker reads, in order


def batches_per_rank(n_samples: int, world_size: int, batch_size: int) -> int:
    """Training batches every rank takes per epoch: enough for every sample to be seen."""
    return math.ceil(n_samples / (world_size * batch_size)) if n_samples > 0 else 0


def plan_epoch(shard_sizes: Sequence[int], *, world_size: int, workers: int, batch_size: int) -> EpochPlan:
    """The plan for shards of `shard_sizes` usable samples (in the epoch's shard order)."""
    n = sum(shard_sizes)
    per_rank = batches_per_rank(n, world_size, batch_size)
    starts = [0]
    for size in shard_sizes[:-1]:
        starts.append(starts[-1] + size)
    position, batches, pieces = 0, [], []
    for _rank in range(world_size):
        counts = tuple(per_rank // workers + (w < per_rank % workers) for w in range(workers))
        rank_pieces = []
        for count in counts:
            end = position + count * batch_size
            rank_pieces.append(tuple(_pieces(position, end, shard_sizes, starts, n)))
            position = end
        batches.append(counts)
        pieces.append(tuple(rank_pieces))
    return EpochPlan(per_rank, position - n if n else 0, tuple(batches), tuple(pieces))


def span_pieces(begin: int, end: int, shard_sizes: Sequence[int]) -> list[Piece]:
    """Positions [begin, end) of the sequence of all shards' samples, as per-shard sample ranges
    (no wrapping: `end` <= the number of samples)."""
    starts = [0]
    for size in shard_sizes[:-1]:
        starts.append(starts[-1] + size)
    return _pieces(begin, end, shard_sizes, starts, max(1, sum(shard_sizes)))


def _pieces(begin: int, end: int, sizes: Sequence[int], starts: list[int], n: int) -> list[Piece]:
    """Sequence positions [begin, end), wrapping past `n`, as per-shard sample ranges."""
    out, position = [], begin
    while position < end:
        q = position % n
        shard = bisect.bisect_right(starts, q) - 1  # the last shard starting at or before q: never an empty one
        take = min(end - position, starts[shard] + sizes[shard] - q)
        out.append(Piece(shard, q - starts[shard], q - starts[shard] + take, repeat=position >= n))
        position += take
    return out
