"""Visual Genome reader + cleaning + split, on the real v1.0 / v1.2 JSON samples with stand-in images."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tests._paths import SHARED_DATA
from tests.prepare._shard_reading import shard_samples
from vgclip.commands import prepare
from vgclip.prepare.cleaning import CleaningSettings, Skips, assign_split, split_sizes
from vgclip.prepare.visual_genome import iter_vg_records, read_image_data

SAMPLE = SHARED_DATA / "vg-json-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"VG JSON sample not found at {SAMPLE}")


def run_prepare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare", *argv])
    return args.run(args)


def stand_in_vg(version: str, root: Path) -> Path:
    """Copy the sample JSON and draw a plain JPEG of the listed size for every image."""
    root.mkdir(parents=True)
    for name in ("image_data.json", "region_descriptions.json"):
        shutil.copy(SAMPLE / version / name, root / name)
    for entry in json.loads((root / "image_data.json").read_text()):
        folder = root / ("VG_100K_2" if "/VG_100K_2/" in entry["url"] else "VG_100K")
        folder.mkdir(exist_ok=True)
        image_id = entry.get("image_id", entry.get("id"))
        Image.new("RGB", (entry["width"], entry["height"]), (90, 120, 60)).save(folder / f"{image_id}.jpg")
    return root


def expected_counts(root: Path, max_chars: int = 200) -> dict[int, int]:
    """Independent plain-json computation: image id -> phrases left after cleaning."""
    sizes = {e.get("image_id", e.get("id")): (e["width"], e["height"])
             for e in json.loads((root / "image_data.json").read_text())}
    counts = {}
    for entry in json.loads((root / "region_descriptions.json").read_text()):
        image_id = entry.get("image_id", entry.get("id"))
        width, height = sizes[image_id]
        seen = set()
        for r in entry["regions"]:
            phrase = " ".join(r["phrase"].split())
            inside = (min(r["x"] + r["width"], width) - max(r["x"], 0) >= 1
                      and min(r["y"] + r["height"], height) - max(r["y"], 0) >= 1)
            if phrase and len(phrase) <= max_chars and r["width"] > 0 and r["height"] > 0 and inside:
                seen.add(phrase.lower())
        counts[image_id] = len(seen)
    return counts


@needs_sample
@pytest.mark.parametrize("version", ["v1.0", "v1.2"])
def test_reader_matches_plain_json(version: str, tmp_path: Path) -> None:
    root = stand_in_vg(version, tmp_path / "vg")
    skips = Skips()
    records = list(iter_vg_records(root, CleaningSettings(), skips))
    assert {r["image_id"]: len(r["regions"]) for r in records} == expected_counts(root)
    assert {Path(r["path"]).parent.name for r in records} == {"VG_100K", "VG_100K_2"}
    assert set(skips.counts) <= {"phrase_duplicate", "phrase_too_long", "box_outside_image", "box_nonpositive_size"}
    # stricter length limit drops more phrases, counted
    strict = Skips()
    short = list(iter_vg_records(root, CleaningSettings(max_phrase_chars=20), strict))
    assert {r["image_id"]: len(r["regions"]) for r in short} == expected_counts(root, max_chars=20)
    assert strict.counts["phrase_too_long"] > 0


@needs_sample
@pytest.mark.parametrize("version", ["v1.0", "v1.2"])
def test_prepare_sample_counts_and_format(version: str, tmp_path: Path) -> None:
    root = stand_in_vg(version, tmp_path / "vg")
    out = tmp_path / "shards"
    assert run_prepare("--vg-root", str(root), "--out", str(out), "--workers", "1", "--max-side", "256",
                       "--quiet") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    expected = expected_counts(root)
    # 5 images < 80,000 + 8,000: split 10:1 proportionally -> 4 train, 1 val (at least one val image).
    assert (manifest["splits"]["train"]["images"], manifest["splits"]["val"]["images"]) == (4, 1)
    seen = {}
    for split in ("train", "val"):
        regions = 0
        for shard in manifest["splits"][split]["shards"]:
            for key, sample in shard_samples(out / shard).items():
                meta = sample["meta"]
                assert key == f"vg-{meta['image_id']:09d}" and meta["source"] == "vg"
                assert max(meta["width"], meta["height"]) == 256
                assert sample["members"] == ["jpg", "json.gz"]
                seen[meta["image_id"]] = split
                regions += len(meta["regions"])
                for region in meta["regions"]:
                    x, y, w, h = region["box"]
                    assert w > 0 and h > 0 and x + w <= meta["width"] + 0.01 and y + h <= meta["height"] + 0.01
        assert regions == manifest["splits"][split]["regions"]
    assert set(seen) == set(expected)
    assert sum(s["regions"] for s in manifest["splits"].values()) == sum(expected.values())
    assert manifest["settings"]["max_side"] == 256 and manifest["settings"]["seed"] == 0


@needs_sample
def test_exclude_ids_and_seed(tmp_path: Path) -> None:
    root = stand_in_vg("v1.2", tmp_path / "vg")
    (tmp_path / "exclude.txt").write_text("# held out\n3\n\n5\n")
    out = tmp_path / "shards"
    run_prepare("--vg-root", str(root), "--out", str(out), "--workers", "1", "--exclude-ids",
                str(tmp_path / "exclude.txt"), "--train-images", "2", "--val-images", "1", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["counts"]["excluded_id"] == 2
    assert {(i["item"], i["reason"]) for i in manifest["skipped"]["items"] if i["reason"] == "excluded_id"} == {
        ("vg:3", "excluded_id"), ("vg:5", "excluded_id")}
    assert (manifest["splits"]["train"]["images"], manifest["splits"]["val"]["images"]) == (2, 1)


def test_split_sizes_proportional() -> None:
    assert split_sizes(100_000, 80_000, 8_000) == (80_000, 8_000)
    assert split_sizes(1_100, 80_000, 8_000) == (1_000, 100)
    assert split_sizes(5, 80_000, 8_000) == (4, 1)
    assert split_sizes(1, 80_000, 8_000) == (1, 0)
    assert split_sizes(30, 10, 0) == (10, 0)


@given(
    ids=st.sets(st.integers(min_value=0, max_value=10**9), max_size=200),
    train=st.integers(0, 150), val=st.integers(0, 50), seed=st.integers(0, 2**31), shuffle_seed=st.randoms(),
)
def test_split_is_deterministic_and_disjoint(ids, train, val, seed, shuffle_seed) -> None:
    keys = [f"vg-{i:09d}" for i in ids]
    train_keys, val_keys = assign_split(keys, train, val, seed)
    shuffled = list(keys)
    shuffle_seed.shuffle(shuffled)
    assert assign_split(shuffled, train, val, seed) == (train_keys, val_keys)  # order of input irrelevant
    assert not set(train_keys) & set(val_keys)
    assert set(train_keys) | set(val_keys) <= set(keys)
    assert (len(train_keys), len(val_keys)) == split_sizes(len(keys), train, val)


def test_image_table_reads_image_data_as_a_dict_would(tmp_path: Path) -> None:
    entries = [{"image_id": 9, "width": 800, "height": 600, "url": "https://x/VG_100K_2/9.jpg"},
               {"id": 3, "width": 500, "height": 333, "url": "https://x/VG_100K/3.jpg"},
               {"image_id": 9, "width": 640, "height": 480},  # a repeated id: the last entry counts, as in a dict
               {"image_id": 4, "width": 0, "height": 10}, "not an object"]  # fmt: skip
    (tmp_path / "image_data.json").write_text(json.dumps(entries))
    skips = Skips()
    table = read_image_data(tmp_path / "image_data.json", skips)
    assert len(table) == 2 and 3 in table and 9 in table and 4 not in table and "3" not in table
    assert table[3] == (500, 333, "VG_100K") and table[9] == (640, 480, None)
    with pytest.raises(KeyError):
        table[5]
    assert skips.counts == {"image_data_bad_size": 1, "image_data_not_object": 1}


def test_image_table_with_no_usable_entry_is_empty_and_odd_numbers_are_skips(tmp_path: Path) -> None:
    entries = [{"image_id": 1, "width": 1e30, "height": 10}, {"image_id": 2, "width": 10, "height": 2 ** 40},
               {"image_id": 3, "width": "10", "height": 10}]
    (tmp_path / "image_data.json").write_text(json.dumps(entries))
    skips = Skips()
    table = read_image_data(tmp_path / "image_data.json", skips)
    assert len(table) == 0 and 1 not in table and list(table.ids) == []
    assert skips.counts == {"image_data_bad_size": 2, "image_data_missing_keys": 1}
