"""Inputs of `vgclip predict` (issue 27.1): files, folders, --list with paths and URLs, shards over loopback HTTP
(the same rows as the folder on disk), a fixed order, and URLs that fail as counted skips."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from tests._train_fixtures import http_folder, write_shards
from tests.tagging._tagging_fixtures import predictions
from vgclip.cli import main
from vgclip.errors import VgclipError
from vgclip.tagging.inputs import list_inputs


def _image(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_listing_order_extensions_and_units(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", "sub/c.WebP", "sub/d.gif", "sub/e.bmp", "notes.txt", ".hidden/f.jpg"):
        _image(tmp_path / "imgs" / name) if not name.endswith(".txt") else (tmp_path / "imgs" / name).write_text("x")
    listed = tmp_path / "list.txt"
    listed.write_text(f"# my list\n{tmp_path / 'imgs' / 'a.png'}\nhttp://example.invalid/x.jpg\n\nmissing.jpg\n")
    shards = write_shards(tmp_path / "shards", n_train=4, n_val=2, per_shard=2)
    inputs = list_inputs([str(tmp_path / "imgs")], listed, [str(shards)], part_size=3)
    keys = [r.key for u in inputs.units for r in u.records]
    root = str(tmp_path / "imgs")
    assert keys[:5] == sorted(keys[:5]) and len(keys) == 7  # a.png once though listed twice; .hidden, notes.txt not
    assert keys[5:] == ["http://example.invalid/x.jpg", "missing.jpg"]  # then the list's entries in its order
    assert f"{root}/sub/c.WebP" in keys and "http://example.invalid/x.jpg" in keys and "missing.jpg" in keys
    assert [u.size for u in inputs.units] == [3, 3, 1, None, None, None]  # then train, train, val shards
    assert [Path(u.shard).name for u in inputs.units[3:]] == ["shard-000000.tar", "shard-000001.tar",
                                                              "shard-000000.tar"]  # fmt: skip
    assert [u.index for u in inputs.for_rank(1, 2)] == [1, 3, 5]
    assert list_inputs([str(tmp_path / "imgs")], listed).fingerprint() == \
        list_inputs([str(tmp_path / "imgs")], listed).fingerprint()
    with pytest.raises(VgclipError, match="no images to score"):
        list_inputs([str(tmp_path / "shards" / "train")])  # a folder of tars holds no image files
    with pytest.raises(VgclipError, match="--list .*cannot read"):
        list_inputs([], tmp_path / "nope.txt")


def test_http_shards_give_the_rows_of_the_folder_on_disk(run_dir: Path, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", n_train=7, n_val=3, per_shard=4)
    argv = ["predict", "--checkpoint", str(run_dir), "--labels", "red,green,blue", "--workers", "1", "--quiet",
            "--batch-size", "3"]
    assert main([*argv, "--data", str(shards), "--out", str(tmp_path / "disk")]) == 0
    with http_folder(shards) as url:
        assert main([*argv, "--data", url, "--out", str(tmp_path / "http")]) == 0
    disk, http = predictions(tmp_path / "disk"), predictions(tmp_path / "http")
    assert disk["key"] == [f"vg-{i:09d}" for i in range(10)]  # shard order, then sample order
    assert [Path(s).name for s in disk["shard"]] == [Path(s).name for s in http["shard"]]
    assert all(s.startswith("http://127.0.0.1:") for s in http["shard"]) and set(http["path"]) == {None}
    for column in (c for c in disk if c not in ("shard",)):
        assert disk[column] == http[column], column


def test_urls_and_a_failing_url(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    served = tmp_path / "served"
    _image(served / "one.jpg", "red")
    _image(served / "two.png", "blue")
    with http_folder(served) as url:
        listed = tmp_path / "urls.txt"
        listed.write_text(f"{url}one.jpg\n{url}two.png\n{url}gone.jpg\n")
        out = tmp_path / "out"
        assert main(["predict", "--checkpoint", str(run_dir), "--labels", "red,blue", "--list", str(listed),
                     "--out", str(out), "--workers", "0", "--quiet"]) == 0  # fmt: skip
    rows = predictions(out)
    assert rows["key"] == [f"{url}one.jpg", f"{url}two.png"] and rows["path"] == [None, None]
    assert (rows["width"], rows["height"]) == ([40, 40], [30, 30])
    with open(out / "skipped.csv", newline="") as fh:
        (skip,) = list(csv.DictReader(fh))
    assert skip["key"] == f"{url}gone.jpg" and skip["reason"] == "url_failed" and "404" in skip["detail"]


def test_img2dataset_shards_by_brace_pattern(run_dir: Path, tmp_path: Path) -> None:
    from tests.data.test_shard_locations import img2dataset_shards

    pattern = img2dataset_shards(tmp_path / "cc")  # sample 3 without caption, 5 not a JPEG, 7 a PNG
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", "red,white", "--data", pattern,
                 "--out", str(out), "--workers", "2", "--quiet"]) == 0  # fmt: skip
    rows = predictions(out)
    assert rows["key"] == [f"{i:09d}" for i in range(10) if i != 5]  # a caption is not needed to tag an image
    assert [Path(s).name for s in rows["shard"]] == ["00000.tar"] * 4 + ["00001.tar"] * 3 + ["00002.tar"] * 2
    with open(out / "skipped.csv", newline="") as fh:
        (skip,) = list(csv.DictReader(fh))
    assert skip["key"] == "000000005" and skip["reason"] == "not_an_image" and skip["shard"].endswith("00001.tar")
