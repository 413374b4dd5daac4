"""Resume (issue 27.5): a run killed with SIGKILL after its first parts, run again, ends with the files of a
run that was never interrupted, bit for bit (predictions, skips, every embeddings file)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests._multiprocess import Launcher
from tests._train_fixtures import write_shards
from tests.tagging._tagging_fixtures import LABELS, add_bad_files, output_files, photo_folder
from vgclip.cli import main

TIMEOUT_S = 300


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(run_dir: Path, tmp_path: Path) -> None:
    photos = photo_folder(tmp_path / "imgs")
    add_bad_files(photos)
    shard = write_shards(tmp_path / "shards", n_train=5, n_val=0, per_shard=5) / "train" / "shard-000000.tar"
    delay = tmp_path / "delay"
    delay.write_text("0")
    # The last unit is a pipe: shard that waits `delay` seconds first: the killed run is surely mid-way.
    pipe = f"pipe:sh -c 'sleep \"$(cat {delay})\"; cat {shard}'"
    argv = ["predict", "--checkpoint", str(run_dir), "--labels", LABELS, str(photos), "--data", pipe,
            "--part-size", "4", "--batch-size", "3", "--workers", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0

    killed = tmp_path / "killed"
    delay.write_text("120")
    with Launcher(tmp_path / "logs") as launcher:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = launcher.start([sys.executable, "-m", "vgclip.cli", *argv, "--out", str(killed)], env)
        last_file_part = killed / "parts" / "predictions-r00-000003.parquet"  # 15 files in parts of 4: 0..3
        deadline = time.monotonic() + TIMEOUT_S
        while not last_file_part.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the command, its loader worker and the sleeping pipe
        (end,) = launcher.wait([proc], timeout=60)
        assert end.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{end.stderr[-2000:]}"
    assert not (killed / "predictions.parquet").exists() and not (killed / "parts" /
                                                                  "predictions-r00-000004.parquet").exists()
    delay.write_text("0")
    assert main([*argv, "--out", str(killed)]) == 0
    assert output_files(killed) == output_files(tmp_path / "straight")
    assert '"resumed_parts": 4' in (killed / "summary.json").read_text()
