"""LiT feature cache at scale (issue 12.5): a parallel build (each rank its share of the rows, with loader
workers) equals a one-process build bit for bit; every rank checks the fingerprint, which covers the tower,
the transform, the decode path and the shards (URLs + manifest for remote ones); a stale cache is rebuilt."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._multiprocess import run_gloo_workers
from tests._train_fixtures import ToyClip, write_shards
from vgclip.config import load_config
from vgclip.data.decoding import decode_image
from vgclip.data.shard_locations import list_shards
from vgclip.data.transforms import build_image_transform
from vgclip.data.views import VIEWS, MultiCropTransform
from vgclip.errors import VgclipError
from vgclip.train import distributed as D
from vgclip.train.cache import CACHE_FILE, INDEX_FILE, build_feature_cache, fingerprint

EVAL_TF = build_image_transform(24, train=False)
# 150 images in shards of 40: blocks of 64 cross shard ends, and the last block is partial.
N_TRAIN, PER_SHARD = 150, 40


def _tower(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ToyClip().visual


def _config(workers: int, *extra: str):
    return load_config("tiny", [f"data.num_workers={workers}", "data.augment=false", "model.image.lock=true", *extra])


def _build(shards: Path, run: Path, info: D.DistInfo, workers: int = 0, seed: int = 0, *extra: str):
    run.mkdir(parents=True, exist_ok=True)
    return build_feature_cache(_config(workers, *extra), data_dir=shards, run_dir=run, visual=_tower(seed),
                               eval_tf=EVAL_TF, tokenizer=lambda texts: {"n": torch.zeros(len(texts))}, info=info)


def _rank_worker(rank: int, shards: str, root: str) -> list[dict]:
    """The 2-rank scenarios in one process group (starting processes dominates the cost): a build into a
    shared folder, then per-node folders where rank 1's holds a stale cache, then a shared build of 8-view rows.
    One torch thread per rank (tests/_multiprocess.py), as the reference build: the same float reduction order."""
    info = D.init_distributed()  # from torchrun's variables (tests/_multiprocess.py sets them)
    results = []
    for run, extra in ((Path(root, "shared"), ()), (Path(root, f"node{rank}"), ()),
                       (Path(root, "shared-multi"), ("train.cache_views=multi",))):  # fmt: skip
        try:
            results.append({"rows": len(_build(Path(shards), run, info, 1, 0, *extra))})
        except VgclipError as exc:
            results.append({"error": str(exc)})
    return results


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("cache") / "shards", n_train=N_TRAIN, n_val=4, size=32,
                        per_shard=PER_SHARD)


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    root = tmp_path_factory.mktemp("two-ranks")
    _build(shards, root / "node1", D.DistInfo(), seed=1)  # rank 1's per-node folder: a cache of another tower
    # Fails if a rank raises, dies or runs past the time limit.
    return root, run_gloo_workers(_rank_worker, 2, args=(str(shards), str(root)), timeout=240)


def _one_thread_build(shards: Path, run: Path, *extra: str):
    """A one-process build with one torch thread, as each gloo rank runs: the same float reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(shards, run, D.DistInfo(), 0, 0, *extra)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_rank_build_equals_one_process_build_bit_for_bit(shards, two_ranks, tmp_path):
    root, results = two_ranks
    assert [r[0] for r in results] == [{"rows": N_TRAIN}] * 2
    single = _one_thread_build(shards, tmp_path / "one")
    assert len(single) == N_TRAIN
    two, one = load_file(str(root / "shared" / CACHE_FILE)), load_file(str(tmp_path / "one" / CACHE_FILE))
    assert two["features"].shape == (N_TRAIN, 6) and torch.equal(two["features"], one["features"])
    index_two = json.loads((root / "shared" / INDEX_FILE).read_text())
    index_one = json.loads((tmp_path / "one" / INDEX_FILE).read_text())
    assert index_two == index_one and index_one["keys"] == [f"vg-{i:09d}" for i in range(N_TRAIN)]


@pytest.mark.slow
def test_two_rank_multi_view_build_equals_one_process_build_bit_for_bit(shards, two_ranks, tmp_path):
    root, results = two_ranks
    assert [r[2] for r in results] == [{"rows": N_TRAIN}] * 2
    _one_thread_build(shards, tmp_path / "one", "train.cache_views=multi")
    two, one = load_file(str(root / "shared-multi" / CACHE_FILE)), load_file(str(tmp_path / "one" / CACHE_FILE))
    assert torch.equal(two["features"], one["features"])
    centre = load_file(str(root / "shared" / CACHE_FILE))
    assert not torch.allclose(two["features"], centre["features"])  # the 8-view rows, not the centre crops


@pytest.mark.slow
def test_a_stale_cache_on_one_rank_is_detected(two_ranks):
    """Rank 1 reads a per-node folder holding a cache from another tower: it must not train on it."""
    root, results = two_ranks
    assert all("does not see the feature cache rank 0 wrote" in r[1].get("error", "") for r in results), results
    assert (root / "node0" / CACHE_FILE).is_file()  # rank 0 built it with rank 1's help


def test_stale_cache_is_rebuilt_and_a_current_one_reused(shards, tmp_path):
    run = tmp_path / "run"
    first = _build(shards, run, D.DistInfo())
    stamp = (run / CACHE_FILE).stat().st_mtime_ns
    assert torch.equal(_build(shards, run, D.DistInfo()).features, first.features)
    assert (run / CACHE_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = _build(shards, run, D.DistInfo(), 0, 1)  # another tower: stale, rebuilt
    assert not torch.equal(other.features, first.features)
    slow_decode = _build(shards, run, D.DistInfo(), 0, 1, "data.fast_decode=false")  # another decode path
    assert json.loads((run / INDEX_FILE).read_text())["fingerprint"] != _fingerprint_of(shards, fast_decode=True)
    assert len(slow_decode) == N_TRAIN


def _fingerprint_of(shards: Path, fast_decode: bool, seed: int = 1) -> str:
    return fingerprint(_tower(seed), list_shards(shards, "train"), repr(EVAL_TF), fast_decode=fast_decode)


def test_fingerprint_covers_decode_path_and_remote_shards_without_stat(shards):
    assert _fingerprint_of(shards, True) != _fingerprint_of(shards, False)
    urls = ["https://example.invalid/train/shard-000000.tar", "https://example.invalid/train/shard-000001.tar"]
    manifest = {"splits": {"train": {"images": 80, "shards": ["train/shard-000000.tar", "train/shard-000001.tar"]}}}
    base = fingerprint(_tower(), urls, "t", fast_decode=True, manifest=manifest)  # no stat(), no network
    assert base == fingerprint(_tower(), urls, "t", fast_decode=True, manifest=dict(manifest))
    assert base != fingerprint(_tower(), urls[:1], "t", fast_decode=True, manifest=manifest)
    changed = {"splits": {"train": {**manifest["splits"]["train"], "images": 81}}}
    assert base != fingerprint(_tower(), urls, "t", fast_decode=True, manifest=changed)


def test_multi_view_rows_are_the_mean_of_the_towers_outputs_over_the_eval_views(shards, tmp_path):
    """train.cache_views=multi (offline-base, issue 24): each row is the mean of the tower's pooled outputs on
    the eval.crops=multi views of the image, not its centre crop; switching the setting rebuilds the cache."""
    run = tmp_path / "run"
    centre = _build(shards, run, D.DistInfo())
    multi = _build(shards, run, D.DistInfo(), 0, 0, "train.cache_views=multi")  # same folder: rebuilt, not reused
    assert multi.keys == centre.keys and multi.features.shape == centre.features.shape
    views, tower = MultiCropTransform(EVAL_TF), _tower(0).eval()
    with tarfile.open(shards / "train" / "shard-000000.tar") as tar:
        jpgs = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    for row, key in enumerate(multi.keys[:5]):
        chw = decode_image(key, jpgs[key], draft_size=None, tensor_ok=True)
        pixels = views.normalize(views.pixels(chw))
        assert pixels.shape[0] == VIEWS
        with torch.no_grad():
            expected = tower(pixels.contiguous(memory_format=torch.channels_last)).mean(0)
        torch.testing.assert_close(multi.features[row], expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(centre.features[row], expected, atol=1e-4)  # the centre crop alone differs
    with pytest.raises(Exception, match="cache_views"):
        load_config("tiny", ["train.cache_views=five"])
