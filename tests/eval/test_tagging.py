"""`vgclip predict`: scores and label sets per image from a saved run, thresholds from file or flag, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.serve._serve_fixtures import make_run
from vgclip.cli import main
from vgclip.errors import VgclipError
from vgclip.eval.tagging import read_labels
from vgclip.eval.thresholds import save_thresholds


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("predict") / "run")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "red.png", folder / "blue.jpg"]
    Image.new("RGB", (40, 30), "red").save(paths[0])
    Image.new("RGB", (30, 40), "blue").save(paths[1])
    return paths


def _predict_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(["predict", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_scores_and_default_top_label(run_dir: Path, images: list[Path], capsys: pytest.CaptureFixture) -> None:
    out = _predict_json(capsys, ["--checkpoint", str(run_dir), "--labels", "cat, dog,person", *map(str, images)])
    assert out["score"] == "softmax" and out["thresholds"] is None
    assert [r["image"] for r in out["results"]] == [str(p) for p in images]
    for r in out["results"]:
        assert list(r["scores"]) == ["cat", "dog", "person"]
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == [max(r["scores"], key=r["scores"].get)]


def test_global_threshold_flag(run_dir: Path, images: list[Path], capsys: pytest.CaptureFixture) -> None:
    argv = ["--checkpoint", str(run_dir), "--labels", "cat,dog", "--score", "cosine", str(images[0])]
    low = _predict_json(capsys, [*argv, "--threshold", "-2"])["results"][0]
    assert low["predicted"] == ["cat", "dog"]  # every cosine is >= -2
    assert _predict_json(capsys, [*argv, "--threshold", "2"])["results"][0]["predicted"] == []


def test_thresholds_file_per_label(run_dir: Path, images: list[Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    info = {"version": 1, "mode": "per_class", "objective": "f1", "classes": ["cat", "dog"], "global": 0.5,
            "per_class": {"cat": 0.0, "dog": 1.01}, "score": "sigmoid", "templates": "single"}  # fmt: skip
    save_thresholds(info, tmp_path / "thresholds.json")
    argv = ["--checkpoint", str(run_dir), "--labels-file", str(tmp_path / "labels.txt"), *map(str, images)]
    (tmp_path / "labels.txt").write_text("# labels\ndog\n\ncat\n")
    out = _predict_json(capsys, [*argv, "--thresholds", str(tmp_path / "thresholds.json")])
    assert out["score"] == "sigmoid" and out["thresholds"] == {"dog": 1.01, "cat": 0.0}
    assert all(r["predicted"] == ["cat"] for r in out["results"])  # sigmoid > 0 always, never > 1.01
    assert main(["predict", *argv, "--thresholds", str(tmp_path / "thresholds.json"), "--score", "cosine"]) == 2
    assert "tuned with score=sigmoid" in capsys.readouterr().err


def test_table_output(run_dir: Path, images: list[Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", "cat,dog", *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["image", "cat", "dog"] and lines[2].startswith("red.png")


def test_unreadable_image_is_a_counted_skip(run_dir: Path, images: list[Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is text, not a JPEG")
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", "cat", str(images[0]), str(bad)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[2].startswith("red.png")  # the good image is still printed
    skip, total = err.strip().splitlines()  # one line naming the file and the problem, then the counts
    assert "notes.jpg" in skip and "BytesIO" not in skip
    assert skip.endswith("notes.jpg: not_an_image (not a JPEG, PNG, GIF, BMP, WEBP or TIFF image)")
    assert total.endswith("1 images scored, 1 skipped (not_an_image: 1)")
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", "cat", str(bad)]) == 2  # nothing scored
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "no image could be scored (1 skipped: not_an_image: 1)")


def test_read_labels(tmp_path: Path) -> None:
    assert read_labels("a, b ,c", None) == ["a", "b", "c"]
    with pytest.raises(VgclipError, match="no labels"):
        read_labels(" , ", None)
    with pytest.raises(VgclipError, match="repeat"):
        read_labels("a,a", None)
    with pytest.raises(VgclipError, match="missing.txt"):
        read_labels(None, tmp_path / "missing.txt")
    assert read_labels("traffic light , stop sign", None) == ["traffic light", "stop sign"]
    path = tmp_path / "labels.txt"
    path.write_text("# COCO\ntraffic light\r\n  teddy bear \n\n")
    assert read_labels(None, path) == ["traffic light", "teddy bear"]  # whole lines, as `zeroshot --classes`
    path.write_text("# only a comment\n\n")
    with pytest.raises(VgclipError, match="labels.txt: label list is empty"):
        read_labels(None, path)
