"""`vgclip prepare`: resume, process pool, user errors, TFRecord gate, COCO and CSV sources."""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
from pathlib import Path

import pytest
from PIL import Image

from tests._paths import ROOT, SHARED_DATA
from tests.prepare._shard_reading import shard_samples
from vgclip.commands import prepare
from vgclip.errors import VgclipError
from vgclip.prepare.cleaning import Skips
from vgclip.prepare.pipeline import PrepareSettings, run_prepare as run_prepare_job

DATA = SHARED_DATA
COCO = DATA / "coco-mini"


def run_prepare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare", *argv])
    return args.run(args)


def tiny_vg(root: Path, n_images: int = 9) -> Path:
    """A small VG folder (v1.2 keys) of 64x48 images with three phrases each."""
    root.mkdir(parents=True)
    image_data, regions = [], []
    for i in range(1, n_images + 1):
        folder = "VG_100K_2" if i % 3 == 0 else "VG_100K"
        (root / folder).mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (i * 20 % 255, 100, 50)).save(root / folder / f"{i}.jpg")
        image_data.append({"image_id": i, "width": 64, "height": 48, "url": f"https://x/{folder}/{i}.jpg"})
        regions.append({"id": i, "regions": [
            {"region_id": i * 10 + k, "image_id": i, "phrase": f"object {k} of image {i}",
             "x": 4 * k, "y": 2 * k, "width": 20, "height": 10} for k in range(3)]})
    (root / "image_data.json").write_text(json.dumps(image_data))
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    return root


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def test_resume_keeps_complete_shards_and_rewrites_partial(tmp_path: Path) -> None:
    root = tiny_vg(tmp_path / "vg")
    out = tmp_path / "shards"
    args = ("--vg-root", str(root), "--out", str(out), "--shard-size", "2", "--workers", "1", "--quiet")
    run_prepare(*args)
    first = shard_bytes(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(first) == 5 and manifest["splits"]["train"]["images"] + manifest["splits"]["val"]["images"] == 9
    # Simulate an interrupted run: shard 1 only exists as a partial temp file, shard 0 is complete.
    kept, lost = out / "train" / "shard-000000.tar", out / "train" / "shard-000001.tar"
    kept_stat = kept.stat()
    partial = out / "train" / ".shard-000001.tar.tmp"
    partial.write_bytes(lost.read_bytes()[:700])
    lost.unlink()
    (out / "manifest.json").unlink()
    run_prepare(*args)
    assert kept.stat().st_mtime_ns == kept_stat.st_mtime_ns and kept.stat().st_ino == kept_stat.st_ino
    assert not partial.exists()
    assert shard_bytes(out) == first  # rewritten shard is byte-identical (deterministic output)
    assert json.loads((out / "manifest.json").read_text())["splits"] == manifest["splits"]
    # Changed settings: every shard is rewritten, stale extra shards removed.
    run_prepare(*args[:-1], "--max-side", "32", "--shard-size", "4", "--quiet")
    changed = shard_bytes(out)
    assert sorted(changed) == ["train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar"]
    meta = next(iter(shard_samples(out / "train" / "shard-000000.tar").values()))["meta"]
    assert (meta["width"], meta["height"]) == (32, 24)
    assert meta["regions"][1]["box"] == [2.0, 1.0, 10.0, 5.0]  # (4, 2, 20, 10) scaled by 1/2


def test_resume_rewrites_shards_of_an_earlier_sample_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards from a version that stored plain `json` regions are rewritten, not mixed with `json.gz` ones."""
    from vgclip.prepare import pipeline

    root = tiny_vg(tmp_path / "vg", n_images=4)
    args = ("--vg-root", str(root), "--out", str(tmp_path / "shards"), "--shard-size", "2", "--workers", "1",
            "--quiet")
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "SAMPLE_MEMBERS", ("jpg", "json"))  # the fingerprint an earlier version wrote
        run_prepare(*args)
    before = {p: p.stat().st_ino for p in (tmp_path / "shards").glob("*/shard-*.tar")}
    run_prepare(*args)
    after = {p: p.stat().st_ino for p in (tmp_path / "shards").glob("*/shard-*.tar")}
    assert sorted(before) == sorted(after) and all(before[p] != after[p] for p in before)


def test_process_pool_gives_same_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tiny_vg(tmp_path / "vg", n_images=6)
    run_prepare("--vg-root", str(root), "--out", str(tmp_path / "a"), "--shard-size", "2", "--workers", "1",
                "--quiet")
    run_prepare("--vg-root", str(root), "--out", str(tmp_path / "b"), "--shard-size", "2", "--workers", "2")
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    summary = capsys.readouterr().out
    assert "train: 5 images, 15 phrases, 3 shards" in summary and "val: 1 images" in summary


def test_shard_workers_leave_ctrl_c_to_the_main_process() -> None:
    """Ctrl-C reaches every process of the group: the workers ignore it (no traceback from each), the main process
    stops the pool."""
    import signal

    from vgclip.prepare.pipeline import _worker_pool

    with _worker_pool(2) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN


def test_shard_writers_start_before_the_first_record_is_read(tmp_path: Path) -> None:
    started = []

    def records():
        started.append(len(multiprocessing.active_children()))
        yield from ()

    with pytest.raises(VgclipError, match="no usable image"):
        run_prepare_job(records(), tmp_path / "out", PrepareSettings(workers=2), Skips(), {})
    assert started == [2]  # forked while this process held no index: each would otherwise count it again
    assert not multiprocessing.active_children()  # and shut down with the run


def test_missing_vg_files_are_one_line_errors(tmp_path: Path) -> None:
    root = tiny_vg(tmp_path / "vg", n_images=2)
    (root / "region_descriptions.json").unlink()
    with pytest.raises(VgclipError, match=r"region_descriptions\.json: missing") as info:
        run_prepare("--vg-root", str(root), "--out", str(tmp_path / "out"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(VgclipError, match="no such directory"):
        run_prepare("--vg-root", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))


@pytest.mark.skipif(importlib.util.find_spec("tfrecord") is not None, reason="tfrecord is installed")
def test_tfrecord_without_package_says_what_to_install(tmp_path: Path) -> None:
    root = tiny_vg(tmp_path / "vg", n_images=2)
    with pytest.raises(VgclipError, match="pip install 'tfrecord"):
        run_prepare("--vg-root", str(root), "--out", str(tmp_path / "out"), "--format", "tfrecord")


@pytest.mark.skipif(importlib.util.find_spec("tfrecord") is None, reason="tfrecord package not installed")
def test_tfrecord_shards(tmp_path: Path) -> None:
    from tfrecord.reader import tfrecord_loader

    root = tiny_vg(tmp_path / "vg", n_images=3)
    out = tmp_path / "out"
    run_prepare("--vg-root", str(root), "--out", str(out), "--format", "tfrecord", "--workers", "1", "--quiet")
    records = [r for p in sorted(out.glob("*/shard-*.tfrecord")) for r in tfrecord_loader(str(p), None)]
    assert len(records) == 3 and all(json.loads(bytes(r["json"]))["regions"] for r in records)


def test_csv_source(tmp_path: Path) -> None:
    for name, color in (("a.jpg", "red"), ("b.png", "blue")):
        Image.new("RGB", (50, 40), color).save(tmp_path / name)
    (tmp_path / "caps.csv").write_text(
        'path,caption\na.jpg,"a red square"\na.jpg,A RED SQUARE\nb.png,a blue one\nmissing.jpg,gone\n'
        "only-one-column\nb.png,\x07\n")
    out = tmp_path / "out"
    run_prepare("--captions-csv", str(tmp_path / "caps.csv"), "--out", str(out), "--workers", "1", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["counts"] == {"csv_bad_row": 1, "missing_image_file": 1, "phrase_duplicate": 1,
                                             "phrase_empty": 1}
    assert sum(s["images"] for s in manifest["splits"].values()) == 2
    assert sum(s["regions"] for s in manifest["splits"].values()) == 2
    meta = next(iter(shard_samples(out / manifest["splits"]["train"]["shards"][0]).values()))["meta"]
    assert meta["source"] == "csv" and meta["regions"][0]["box"] is None


@pytest.mark.skipif(not COCO.is_dir(), reason=f"COCO-mini sample not found at {COCO}")
def test_coco_mini(tmp_path: Path) -> None:
    captions = COCO / "annotations" / "captions_train2017.json"
    data = json.loads(captions.read_text())
    files = {p.name for p in (COCO / "train2017").iterdir()}
    per_image: dict[int, set[str]] = {}
    for ann in data["annotations"]:
        caption = " ".join(ann["caption"].split())
        if len(caption) <= 200:  # the default --max-phrase-chars
            per_image.setdefault(ann["image_id"], set()).add(caption.lower())
    expected = {i["id"]: len(per_image.get(i["id"], ())) for i in data["images"] if i["file_name"] in files}
    out = tmp_path / "out"
    run_prepare("--coco-captions", str(captions), "--coco-images", str(COCO / "train2017"), "--out", str(out),
                "--workers", "1", "--max-side", "128", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    got = {}
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            for sample in shard_samples(out / shard).values():
                meta = sample["meta"]
                assert meta["source"] == "coco" and all(r["box"] is None for r in meta["regions"])
                assert max(meta["width"], meta["height"]) <= 128
                got[meta["image_id"]] = len(meta["regions"])
    assert got == {k: v for k, v in expected.items() if v}
    assert manifest["splits"]["val"]["images"] >= 1


def test_csv_skips_name_the_file_and_its_line(tmp_path: Path) -> None:
    """A skipped row is named `FILE:LINE`: 1-based, the header counted, a multi-line caption by its first line."""
    Image.new("RGB", (50, 40), "red").save(tmp_path / "a.jpg")
    lines = ["path,caption", "a.jpg,a red square", 'a.jpg,"a caption', 'over two lines"',
             "a.jpg,A RED SQUARE", "", "only-one-column", "gone.jpg,a missing photo", "a.jpg,\x07"]
    (tmp_path / "my captions.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_prepare("--captions-csv", str(tmp_path / "my captions.csv"), "--out", str(out), "--workers", "1",
                "--quiet", "--val-images", "0")
    items = json.loads((out / "manifest.json").read_text())["skipped"]["items"]
    assert {(i["item"], i["reason"]) for i in items} == {
        ("my captions.csv:5", "phrase_duplicate"), ("my captions.csv:7", "csv_bad_row"),
        ("my captions.csv:8 (gone.jpg)", "missing_image_file"), ("my captions.csv:9", "phrase_empty")}


def test_prepare_help_states_the_csv_format(capsys) -> None:
    parser = argparse.ArgumentParser()
    prepare.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optional first line 'path,caption'" in text and "relative to the CSV file's folder" in text


def test_readme_says_how_to_bring_your_own_data() -> None:
    """README's quickstart names the sources and the CSV rules sources.py applies (header, paths)."""
    from vgclip.prepare.caption_sources import CSV_HEADER

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    for needle in ("--captions-csv", "--coco-captions", "img2dataset", f"first line `{','.join(CSV_HEADER)}`",
                   "paths relative to its folder", "ImageSets", "--tune-on-eval", "predict"):
        assert needle in section, needle
