"""Re-tagging stored embeddings (issue 27.6): a new label set scored from OUT/embeddings/ equals encoding the
images again with that label set (1e-5), with the crops the embeddings were made with; a thresholds file tuned
on other crops, or a checkpoint with other weights, is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.serve._serve_fixtures import make_run
from tests.tagging._tagging_fixtures import photo_folder, predictions
from vgclip.cli import main
from vgclip.eval.thresholds import save_thresholds

FIRST, SECOND = "cat,dog", "traffic light,person,red car on a street"


@pytest.fixture(scope="module")
def stored(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(photo folder, a finished --out of it with 8-crop embeddings)."""
    root = tmp_path_factory.mktemp("retag")
    photos = photo_folder(root / "imgs", count=5, sub=2)
    out = root / "out"
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", FIRST, str(photos), "--out", str(out),
                 "--crops", "multi", "--part-size", "3", "--workers", "1", "--quiet"]) == 0  # fmt: skip
    return photos, out


def test_retag_equals_encoding_again(run_dir: Path, stored, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photos, out = stored
    assert main(["predict", "--embeddings", str(out), "--labels", SECOND, "--score", "sigmoid",
                 "--threshold", "0.5"]) == 0  # fmt: skip
    (folder,) = out.glob("retag-*")
    assert str(folder) in capsys.readouterr().out
    again = tmp_path / "again"
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", SECOND, str(photos), "--out", str(again),
                 "--crops", "multi", "--score", "sigmoid", "--threshold", "0.5", "--workers", "0",
                 "--quiet"]) == 0  # fmt: skip
    a, b = predictions(folder), predictions(again)
    assert list(a) == list(b) and len(a["key"]) == 7
    for column in ("key", "path", "shard", "width", "height", "labels"):
        assert a[column] == b[column], column
    for column in (c for c in a if c.startswith("score:")):
        assert np.allclose(a[column], b[column], atol=1e-5, rtol=0), column
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["crops"] == "multi" and summary["labels"] == SECOND.split(",") and summary["score"] == "sigmoid"
    assert summary["thresholds"]["source"] == "--threshold" and summary["counts"] == {"scored": 7}


def test_retag_into_a_folder_and_csv(stored, tmp_path: Path) -> None:
    _, out = stored
    assert main(["predict", "--embeddings", str(out), "--labels", FIRST, "--out", str(tmp_path / "new"),
                 "--format", "csv"]) == 0  # fmt: skip
    assert (tmp_path / "new" / "predictions.csv").read_text().splitlines()[0] == \
        "key,path,shard,width,height,labels,score:cat,score:dog"
    first = predictions(out)  # the same labels as the run itself: its own scores
    lines = (tmp_path / "new" / "predictions.csv").read_text().splitlines()[1:]
    assert np.allclose([float(line.split(",")[-2]) for line in lines], first["score:cat"], atol=1e-6)


def test_retag_refusals(stored, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, out = stored
    thresholds = tmp_path / "thresholds.json"
    save_thresholds({"version": 1, "mode": "global", "objective": "f1", "classes": ["cat"], "global": 0.5,
                     "per_class": {}, "score": "softmax", "templates": "single", "crops": "centre"}, thresholds)
    assert main(["predict", "--embeddings", str(out), "--labels", "cat", "--thresholds", str(thresholds)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "crops=centre" in err and "crops=multi" in err
    other = make_run(tmp_path / "other-run")
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes() + b" ")
    assert main(["predict", "--embeddings", str(out), "--labels", "cat", "--checkpoint", str(other)]) == 2
    assert "other weights" in capsys.readouterr().err
    assert main(["predict", "--embeddings", str(out), "--labels", "cat", "--crops", "centre"]) == 2
    assert "were made with crops=multi" in capsys.readouterr().err
    assert main(["predict", "--embeddings", str(tmp_path), "--labels", "cat"]) == 2
    assert "no summary.json" in capsys.readouterr().err
