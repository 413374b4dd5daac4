"""The built-in synthetic data through the real readers, and one short end-to-end demo run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vgclip.cli import main as cli
from vgclip.data.voc import load_voc
from vgclip.prepare.cleaning import CleaningSettings, Skips
from vgclip.prepare.visual_genome import iter_vg_records
from vgclip.synthetic.writers import SYNTH_CLASSES, write_synthetic_vg, write_synthetic_voc


def test_synthetic_visual_genome_is_read_by_the_real_reader(tmp_path):
    counts = write_synthetic_vg(tmp_path / "vg", 12, seed=3)
    skips = Skips()
    records = list(iter_vg_records(tmp_path / "vg", CleaningSettings(), skips))
    raw = json.loads((tmp_path / "vg" / "region_descriptions.json").read_text())

    assert len(records) == counts["images"] == 12
    # Only exact duplicate phrases of an image may be dropped by cleaning.
    kept = sum(len(r["regions"]) for r in records)
    assert kept + skips.counts.get("phrase_duplicate", 0) == sum(len(e["regions"]) for e in raw)
    assert set(skips.counts) <= {"phrase_duplicate"}
    for record in records:
        assert os.path.isfile(record["path"])


def test_synthetic_voc_is_read_by_the_real_reader(tmp_path):
    write_synthetic_voc(tmp_path / "voc", 16, seed=4)
    test_split = load_voc(tmp_path / "voc", split="test")
    trainval = load_voc(tmp_path / "voc", split="trainval")

    assert set(test_split.classes) == set(SYNTH_CLASSES)
    assert len(test_split.image_ids) + len(trainval.image_ids) == 16
    assert not set(test_split.image_ids) & set(trainval.image_ids)
    assert test_split.labels.shape == (len(test_split.image_ids), len(SYNTH_CLASSES))
    # Every image holds at least one (possibly difficult-only) object.
    assert np.all((test_split.labels > 0).any(axis=1) | test_split.ignore.any(axis=1))
    assert not test_split.skipped


@pytest.mark.slow
def test_demo_runs_end_to_end_with_tiny_towers(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--config", "tiny", "--train-images", "48", "--voc-images", "24",
            "train.epochs=1", "model.image.image_size=64", "data.batch_size=8", "data.num_workers=0"]
    code = cli(argv)
    printed = capsys.readouterr().out

    assert code == 0, printed
    # Running the demo again into the same folder starts it afresh instead of refusing.
    assert cli(argv) == 0, capsys.readouterr()
    report = json.loads((out / "report" / "report.json").read_text())
    # One epoch of tiny random towers learns little; the report must still be complete and consistent.
    assert 0.0 <= report["chance_mean"] < 1.0 and 0.0 <= report["mAP"] <= 1.0
    assert report["mAP"] == pytest.approx(sum(report["AP"].values()) / len(report["AP"]))
    assert set(report["AP"]) == set(SYNTH_CLASSES)
    assert (out / "run" / "model.safetensors").is_file()
    assert (out / "report" / "scores.csv").is_file()
    assert "mAP" in printed and "chance" in printed
