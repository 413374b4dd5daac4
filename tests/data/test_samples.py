"""vgclip/data/samples.py: what a sample's members mean, including the gzip-compressed regions `prepare` writes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import webdataset as wds

from vgclip.data.samples import MAX_METADATA_BYTES, sample_parts, scan_shard

META = {"image_id": 7, "source": "vg", "width": 64, "height": 48,
        "regions": [{"phrase": "a red car", "box": [1.0, 2.0, 30.0, 20.0]}, {"phrase": "a tree", "box": None}]}


def test_gzip_regions_read_as_the_plain_json_does() -> None:
    plain = sample_parts({"jpg": b"jpeg bytes", "json": json.dumps(META).encode()})
    packed = sample_parts({"jpg": b"jpeg bytes", "json.gz": gzip.compress(json.dumps(META).encode())})
    assert packed == plain and packed[0] is None and packed[2] == META
    text = json.dumps(META).encode()  # several gzip members one after another read as one stream, as gzip does
    members = gzip.compress(text[:20]) + gzip.compress(text[20:])
    assert gzip.decompress(members) == text and sample_parts({"jpg": b"jpeg bytes", "json.gz": members}) == plain


def test_bad_gzip_regions_are_counted_skips() -> None:
    good = gzip.compress(json.dumps(META).encode())
    bomb = gzip.compress(b" " * (MAX_METADATA_BYTES + 1))  # a few KB that would inflate past the limit
    split_bomb = gzip.compress(b" " * MAX_METADATA_BYTES) + gzip.compress(b" ")  # the limit counts every member
    for bad in (good[:-8], b"not gzip at all", bomb, split_bomb, good + b"trailing", gzip.compress(b"{not json")):
        assert sample_parts({"jpg": b"jpeg bytes", "json.gz": bad})[0] == "bad_json"
    assert sample_parts({"json.gz": good})[0] == "missing_jpg"


@pytest.mark.parametrize("tar_reader", ["direct", "webdataset"])
def test_scan_counts_gzip_region_samples(tmp_path: Path, tar_reader: str) -> None:
    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:  # webdataset's writer gzips a `.gz` member itself, as prepare does
        for i in range(3):
            sink.write({"__key__": f"vg-{i:09d}", "jpg": b"jpeg bytes", "json.gz": json.dumps(META).encode()})
        sink.write({"__key__": "vg-000000009", "jpg": b"jpeg bytes", "json.gz": b"broken"})
    assert scan_shard(shard, tar_reader, check_text=False) == 4
    assert scan_shard(shard, tar_reader, check_text=True) == 3
