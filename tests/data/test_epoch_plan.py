"""Uneven shards (issue 12.4): every rank takes the same number of steps, no sample is lost in an epoch
(the last global batch is filled with counted repeats), and the schedule's length is the steps taken."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vgclip.config import load_config
from vgclip.data.epoch_plan import batches_per_rank, plan_epoch
from vgclip.train.loop import total_steps
from vgclip.train.optim import cosine_with_warmup

SIZES = (13, 7, 22)  # three shards of unequal size
WORLD, WORKERS, BATCH = 4, 2, 2


def _coverage(plan, sizes) -> collections.Counter:
    seen = collections.Counter()
    for rank_pieces in plan.pieces:
        for worker_pieces in rank_pieces:
            for piece in worker_pieces:
                assert 0 <= piece.start < piece.stop <= sizes[piece.shard]
                seen.update((piece.shard, i) for i in range(piece.start, piece.stop))
    return seen


def test_four_ranks_two_workers_three_unequal_shards():
    plan = plan_epoch(SIZES, world_size=WORLD, workers=WORKERS, batch_size=BATCH)
    n = sum(SIZES)
    assert plan.batches_per_rank == math.ceil(n / (WORLD * BATCH)) == 6
    assert [sum(b) for b in plan.worker_batches] == [6] * WORLD  # equal steps on every rank
    for batches, pieces in zip(plan.worker_batches, plan.pieces):  # whole batches per worker: none dropped
        assert [sum(p.stop - p.start for p in w) for w in pieces] == [b * BATCH for b in batches]
    seen = _coverage(plan, SIZES)
    assert len(seen) == n  # every sample of the epoch
    assert sum(seen.values()) - n == plan.duplicates == 6 < WORLD * BATCH


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       st.integers(1, 8), st.integers(1, 4), st.integers(1, 5))
def test_every_sample_once_plus_bounded_repeats(sizes, world, workers, batch):
    plan = plan_epoch(sizes, world_size=world, workers=workers, batch_size=batch)
    seen = _coverage(plan, sizes)
    assert len(seen) == sum(sizes) and max(seen.values()) <= 1 + (world * batch) // sum(sizes) + 1
    assert sum(seen.values()) == plan.batches_per_rank * world * batch == sum(sizes) + plan.duplicates
    assert plan.duplicates < world * batch
    assert all(sum(b) == plan.batches_per_rank for b in plan.worker_batches)


def _feature_cache(n_rows: int, world: int, rank: int, batch: int):
    from vgclip.train.cache import FeatureCache

    config = load_config("tiny", [f"data.batch_size={batch}"])
    metas = [{"width": 8, "height": 8, "regions": [{"phrase": f"item {i}"}]} for i in range(n_rows)]

    def tokenizer(texts):
        return {"input_ids": torch.tensor([[int(t.split()[1])] for t in texts])}

    return FeatureCache(torch.arange(n_rows, dtype=torch.float32)[:, None], [f"k{i}" for i in range(n_rows)], metas,
                        config=config, tokenizer=tokenizer, rank=rank, world_size=world)


def test_the_feature_cache_gives_every_rank_equal_batches_and_loses_no_row():
    n_rows, world, batch = 42, 4, 4
    per_rank = [list(_feature_cache(n_rows, world, r, batch).batches(epoch=1)) for r in range(world)]
    assert {len(b) for b in per_rank} == {batches_per_rank(n_rows, world, batch)} == {3}
    rows = collections.Counter(int(f) for batches in per_rank for features, _ in batches for f in features[:, 0])
    texts = [int(i) for batches in per_rank for features, tokens in batches for i in tokens["input_ids"][:, 0]]
    assert set(rows) == set(range(n_rows)) and sum(rows.values()) - n_rows == 3 * world * batch - n_rows
    assert texts == [int(f) for batches in per_rank for features, _ in batches for f in features[:, 0]]  # pairs kept


def test_schedule_length_is_the_steps_the_loop_takes():
    config = load_config("tiny", ["train.epochs=3", "train.accum_steps=4", "train.warmup_steps=2"])
    per_epoch = batches_per_rank(sum(SIZES), WORLD, BATCH)  # 6 micro-batches: groups of 4 and 2
    total = total_steps(config, per_epoch)
    assert total == 3 * 2
    factor = cosine_with_warmup(total, config.train.warmup_steps)
    assert factor(total - 1) > 0 and factor(total) == pytest.approx(0.0)  # the last step ends the cosine


# ---- the shard loader itself (needs data/loader.py to read the plan's pieces) ----


class IdTokenizer:
    """'item N' -> [[N]] (picklable: it runs in loader workers)."""

    def __call__(self, texts):
        return {"input_ids": torch.tensor([[int(t.split()[1])] for t in texts]),
                "attention_mask": torch.ones(len(texts), 1, dtype=torch.long)}


def _write_uneven_shards(root: Path, bad: frozenset[int] = frozenset()) -> int:
    """SIZES samples in three shards, `item N` paired with image N; the images in `bad` do not decode."""
    import io

    import webdataset as wds
    from PIL import Image

    (root / "train").mkdir(parents=True)
    item = 0
    for index, size in enumerate(SIZES):
        with wds.TarWriter(str(root / "train" / f"shard-{index:06d}.tar")) as sink:
            for _ in range(size):
                buf = io.BytesIO()
                Image.new("RGB", (16, 16), (item * 5 % 255, 40, 90)).save(buf, format="JPEG")
                jpg = buf.getvalue()[:40] if item in bad else buf.getvalue()
                meta = {"image_id": item, "width": 16, "height": 16, "regions": [{"phrase": f"item {item}", "box": None}]}
                sink.write({"__key__": f"vg-{item:09d}", "jpg": jpg, "json": json.dumps(meta).encode()})
                item += 1
    return item


def _epoch(root: Path, rank: int, *, epoch: int = 0, start_batch: int = 0, world: int = WORLD):
    from vgclip.data.loader import make_loader
    from vgclip.data.transforms import build_image_transform

    cfg = load_config("tiny", [f"data.batch_size={BATCH}", f"data.num_workers={WORKERS}", "data.augment=false"]).data
    loader = make_loader(root, "train", cfg, build_image_transform(16), IdTokenizer(), train=True, seed=0,
                         epoch=epoch, rank=rank, world_size=world, start_batch=start_batch)
    return loader, [tokens["input_ids"][:, 0].tolist() for _, tokens in loader]


def test_loader_four_ranks_two_workers_three_unequal_shards(tmp_path):
    n = _write_uneven_shards(tmp_path)
    steps = batches_per_rank(n, WORLD, BATCH)
    for epoch in (0, 1):
        loaders, per_rank = zip(*(_epoch(tmp_path, rank, epoch=epoch) for rank in range(WORLD)))
        assert [len(batches) for batches in per_rank] == [steps] * WORLD  # equal steps per rank
        assert all(len(batch) == BATCH for batches in per_rank for batch in batches)
        seen = collections.Counter(i for batches in per_rank for batch in batches for i in batch)
        assert set(seen) == set(range(n))  # no sample lost
        duplicates = sum(seen.values()) - n
        assert duplicates == loaders[0].plan.duplicates < WORLD * BATCH  # repeats counted and bounded
        assert all(loader.repeated == 0 and loader.skipped == {} for loader in loaders)
    assert _epoch(tmp_path, 2, epoch=0)[1] != _epoch(tmp_path, 2, epoch=1)[1]  # each epoch its own order


def test_loader_resumes_mid_epoch_on_every_rank(tmp_path):
    _write_uneven_shards(tmp_path)
    for rank in (0, 3):  # the last rank reads the repeats
        fresh = _epoch(tmp_path, rank)[1]
        for start in (1, 3, 5):
            assert _epoch(tmp_path, rank, start_batch=start)[1] == fresh[start:], (rank, start)


def test_undecodable_images_are_skipped_and_their_slots_filled_with_counted_repeats(tmp_path):
    bad = frozenset({4, 30})
    n = _write_uneven_shards(tmp_path, bad)
    loaders, per_rank = zip(*(_epoch(tmp_path, rank) for rank in range(WORLD)))
    assert [len(batches) for batches in per_rank] == [batches_per_rank(n, WORLD, BATCH)] * WORLD  # still equal steps
    assert all(len(batch) == BATCH for batches in per_rank for batch in batches)
    seen = collections.Counter(i for batches in per_rank for batch in batches for i in batch)
    assert set(seen) == set(range(n)) - bad
    assert sum(loader.skipped.get("bad_image", 0) for loader in loaders) == len(bad)
    # Each slot of a bad image (in its own range, or in a repeat that fills the last global batch) is
    # given to a repeat of an earlier sample, counted.
    repeated = sum(loader.repeated for loader in loaders)
    assert len(bad) <= repeated <= len(bad) + loaders[0].plan.duplicates
    assert sum(seen.values()) - len(seen) == loaders[0].plan.duplicates + len(bad)


@pytest.mark.slow
def test_a_run_over_uneven_shards_ends_its_schedule_on_its_last_step(tmp_path):
    """One process, 2 workers: the loop takes the planned steps and the cosine reaches 0 with the last one."""
    from vgclip.train.loop import train

    n = _write_uneven_shards(tmp_path / "shards")
    config = load_config("tiny", [f"data.batch_size={BATCH * 2}", f"data.num_workers={WORKERS}", "train.epochs=1",
                                  "train.accum_steps=2", "train.warmup_steps=1", "train.checkpoint_every=0"])
    summary = train(config, tmp_path / "shards", tmp_path / "run")
    per_epoch = batches_per_rank(n, 1, BATCH * 2)  # 42 samples, batch 4: 11 micro-batches, 6 steps (last: 1)
    assert summary["steps"] == total_steps(config, per_epoch) == math.ceil(per_epoch / 2) == 6
    assert summary["samples_seen"] == per_epoch * BATCH * 2  # every micro-batch, the repeats included
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 6 and state["scheduler"]["_last_lr"][0] == pytest.approx(0.0)
