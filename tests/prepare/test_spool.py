"""vgclip/prepare/spool.py: the array index gives the split `assign_split` gives, duplicates and collisions included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgclip.prepare.cleaning import MAX_EXAMPLES_PER_REASON, Skips, assign_split, split_sizes
from vgclip.prepare.spool import Spool, split_order, spool_records


def _records(ids: list[int]) -> list[dict]:
    return [{"key": f"vg-{i:09d}", "image_id": i, "source": "vg", "regions": [["a cat", 0, 0, 1, 1]]} for i in ids]


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 300), max_size=120), seed=st.integers(0, 2**31), train=st.integers(0, 100),
       val=st.integers(0, 30))  # fmt: skip
def test_split_order_is_assign_split(tmp_path_factory: pytest.TempPathFactory, ids: list[int], seed: int, train: int,
                                     val: int) -> None:  # fmt: skip
    skips = Skips()
    spool = spool_records(_records(ids), tmp_path_factory.mktemp("spool") / "records.jsonl", seed, set(), skips)
    order = split_order(spool, skips)
    keys = spool.keys(order)
    n_train, n_val = split_sizes(len(keys), train, val)
    assert (keys[:n_train], keys[n_train:n_train + n_val]) == assign_split(keys, train, val, seed)
    assert len(keys) == len(set(ids)) and skips.counts["duplicate_image_id"] == len(ids) - len(set(ids))
    first = {}
    for position, i in enumerate(ids):
        first.setdefault(i, position)
    assert sorted(order.tolist()) == sorted(first.values())  # a repeated key keeps its first record


def test_equal_hashes_of_different_keys_are_ordered_by_key(tmp_path: Path) -> None:
    skips = Skips()
    spool = spool_records(_records([5, 3, 9, 3]), tmp_path / "records.jsonl", 0, set(), skips)
    collided = Spool(spool.path, spool.offsets, spool.lengths, np.zeros(4, dtype=np.uint64))  # every hash the same
    assert spool.keys(split_order(collided, skips)) == ["vg-000000003", "vg-000000005", "vg-000000009"]
    assert skips.counts == {"duplicate_image_id": 1} and skips.items == [("vg:3", "duplicate_image_id")]


def test_add_many_counts_all_and_reads_only_the_examples_kept() -> None:
    skips = Skips()
    read = []

    def items():
        for n in range(5000):
            read.append(n)
            yield f"vg:{n}"

    skips.add_many("beyond_split_sizes", 5000, items())
    assert skips.counts["beyond_split_sizes"] == 5000 and len(read) == len(skips.items) == MAX_EXAMPLES_PER_REASON

