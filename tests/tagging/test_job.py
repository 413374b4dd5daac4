"""`vgclip predict` over a folder (issue 27.1-4): every good image a row, every bad one a counted skip with its
reason, the output contract (file names, columns, embeddings), refusals in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.tagging._tagging_fixtures import LABELS, add_bad_files, embeddings, photo_folder, predictions
from vgclip.cli import main

COLUMNS = ["key", "path", "shard", "width", "height", "labels", "score:cat", "score:dog", "score:traffic light",
           "score:person"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = photo_folder(tmp_path_factory.mktemp("photos") / "imgs")
    return root, add_bad_files(root)


@pytest.fixture(scope="module")
def tagged(run_dir: Path, photos, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tagged") / "out"
    argv = ["predict", "--checkpoint", str(run_dir), "--labels", LABELS, str(photos[0]), "--out", str(out),
            "--part-size", "4", "--batch-size", "3", "--workers", "2", "--quiet"]
    assert main(argv) == 0
    return out


def test_every_good_photo_a_row_every_bad_file_a_skip(tagged: Path, photos) -> None:
    root, bad = photos
    rows = predictions(tagged)
    good = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() == ".jpg" and str(p) not in bad)
    assert rows["key"] == good and len(good) == 11  # sorted paths, the sub-folder's .JPG files included
    assert rows["path"] == [str(Path(k).resolve()) for k in good] and set(rows["shard"]) == {None}
    with open(tagged / "skipped.csv", newline="") as fh:
        skipped = {r["key"]: r["reason"] for r in csv.DictReader(fh)}
    assert skipped == bad  # readme.txt is not an image name: never listed
    summary = json.loads((tagged / "summary.json").read_text())
    assert summary["counts"] == {"scored": 11, "skipped": 3, "skipped_by_reason": {
        "empty_file": 1, "not_an_image": 1, "truncated": 1}}  # fmt: skip


def test_output_contract(tagged: Path, run_dir: Path) -> None:
    table = pq.read_table(tagged / "predictions.parquet")
    assert table.schema.names == COLUMNS
    assert str(table.schema.field("width").type) == "int32" and str(table.schema.field("score:cat").type) == "float"
    assert str(table.schema.field("labels").type) == "list<element: string>"
    rows = table.to_pydict()
    scores = np.array([rows[c] for c in COLUMNS[6:]]).T
    assert np.allclose(scores.sum(1), 1.0, atol=1e-5)  # softmax, the tiny run's eval.score
    assert all(labels == [COLUMNS[6 + int(np.argmax(s))][6:]] for labels, s in zip(rows["labels"], scores))
    assert min(rows["width"]) > 64  # the files' own sizes, not the model input's
    parts = sorted(p.name for p in (tagged / "parts").glob("predictions-*.parquet"))
    assert parts == [f"predictions-r00-{i:06d}.parquet" for i in range(4)]  # 14 files in parts of 4
    emb, keys = embeddings(tagged)
    assert emb.dtype == np.float16 and keys == rows["key"]
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    meta = pq.read_table(next((tagged / "embeddings" / "metadata").glob("*.parquet")))
    assert meta.schema.names[:4] == ["key", "image_path", "width", "height"]
    summary = json.loads((tagged / "summary.json").read_text())
    assert summary["checkpoint"] == str(run_dir.resolve()) and len(summary["weights_sha256"]) == 64
    assert summary["labels"] == LABELS.split(",") and summary["crops"] == "centre" and summary["image_size"] == 64
    assert summary["thresholds"] == {"per_label": None, "global": None, "source": "none: top label"}


def test_rerun_continues_and_changed_settings_are_refused(tagged: Path, run_dir: Path, photos,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    before = (tagged / "predictions.parquet").read_bytes()
    base = ["predict", "--checkpoint", str(run_dir), str(photos[0]), "--out", str(tagged), "--part-size", "4",
            "--batch-size", "3", "--quiet"]
    assert main([*base, "--labels", LABELS, "--workers", "0"]) == 0  # every part done: merged again, same bytes
    assert (tagged / "predictions.parquet").read_bytes() == before
    capsys.readouterr()
    assert main([*base, "--labels", "cat,dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (labels differ)" in err and "--overwrite" in err
    assert main([*base, "--labels", LABELS, "--threshold", "0.3"]) == 2
    assert "thresholds differ" in capsys.readouterr().err


def test_overwrite_and_csv(run_dir: Path, photos, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("someone else's file")
    argv = ["predict", "--checkpoint", str(run_dir), "--labels", "cat,dog", str(photos[0] / "sub"), "--out", str(out),
            "--format", "csv", "--threshold", "0.5", "--quiet", "--workers", "1"]
    assert main(argv) == 2  # a folder that holds something else
    assert main([*argv, "--overwrite"]) == 0 and (out / "mine.txt").is_file()
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and list(rows[0]) == ["key", "path", "shard", "width", "height", "labels", "score:cat",
                                                 "score:dog"]  # fmt: skip
    assert all(set(filter(None, r["labels"].split("|"))) == {lab for lab in ("cat", "dog")
                                                             if float(r[f"score:{lab}"]) >= 0.5} for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["thresholds"] == {"per_label": {"cat": 0.5, "dog": 0.5}, "global": 0.5, "source": "--threshold"}


def test_all_bad_is_exit_2_in_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.jpg").write_text("text")
    (tmp_path / "b.png").write_bytes(b"")
    argv = ["predict", "--checkpoint", str(run_dir), "--labels", "cat", str(tmp_path), str(tmp_path / "gone.jpg")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no image could be scored (3 skipped" in err and "skipped.csv" in err
    assert main(argv) == 2  # without --out: a line per skip, then the one-line error
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and "gone.jpg: missing_file" in lines[2] and "no image could be scored" in lines[3]


def test_without_out_good_images_are_printed_and_bad_ones_counted(run_dir: Path, photos,
                                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    root, bad = photos
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", "cat,dog", str(root / "sub"), *bad,
                 "--json"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert len(results["results"]) == 3 and {s["image"]: s["reason"] for s in results["skipped"]} == bad
    assert len(err.strip().splitlines()) == 4 and err.strip().splitlines()[-1].endswith(
        "3 images scored, 3 skipped (empty_file: 1, not_an_image: 1, truncated: 1)")


def test_without_out_a_large_collection_is_pointed_to_out(run_dir: Path, photos, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from vgclip.tagging import job

    monkeypatch.setattr(job, "STDOUT_LIMIT", 2)
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", "cat", str(photos[0] / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 images: give --out DIR" in err
