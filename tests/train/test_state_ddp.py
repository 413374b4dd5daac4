"""Exact resume under DDP: a 2-process run (gloo) killed with SIGKILL mid-epoch and resumed ends with the
weights of an uninterrupted 2-process run, bit for bit (each rank restores its own random streams)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._multiprocess import Launcher, rank_env
from tests._train_fixtures import write_shards

WORLD = 2
# 16 samples per rank, batch 4: 4 steps an epoch, 8 in all; a checkpoint every 2 steps, so the
# first one (step 2) is mid-epoch. The tiny text tower has dropout: its masks differ per rank.
OVERRIDES = ["data.num_workers=0", "data.batch_size=4", "train.epochs=2", "train.checkpoint_every=2",
             "train.keep_checkpoints=1", "train.warmup_steps=2"]
TIMEOUT_S = 240


def _launch(launcher: Launcher, shards: Path, run: Path, *extra: str) -> list[subprocess.Popen]:
    """The two processes torchrun would start (its environment variables, its agent's store on a port the
    kernel picked), each in its own session."""
    store = launcher.store(WORLD)
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               **rank_env(rank, WORLD, store)}
        cmd = [sys.executable, "-m", "vgclip.cli", "train", "--data", str(shards), "--out", str(run),
               "--config", "tiny", *extra, *OVERRIDES]
        procs.append(launcher.start(cmd, env))
    return procs


def _stdouts(launcher: Launcher, procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout; fails (the launcher kills the rest) if one fails or runs past the time limit."""
    ends = launcher.wait(procs, timeout=TIMEOUT_S)
    for end in ends:
        assert end.returncode == 0, end.stderr[-3000:]
    return [end.stdout for end in ends]


@pytest.mark.slow
def test_two_process_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    shards = write_shards(tmp_path / "shards", n_train=32, n_val=8, per_shard=8)  # 2 shards per rank
    with Launcher(tmp_path / "logs") as launcher:
        straight = _launch(launcher, shards, tmp_path / "straight")  # the reference runs alongside the killed one
        killed = tmp_path / "killed"
        procs = _launch(launcher, shards, killed)
        first = killed / "checkpoints" / "step-2" / "state.json"
        deadline = time.monotonic() + TIMEOUT_S
        while not first.is_file() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        for proc in procs:  # a node failure: every process dies at once, nothing is flushed
            proc.send_signal(signal.SIGKILL)
        ends = launcher.wait(procs, timeout=60)
        assert [e.returncode for e in ends] == [-signal.SIGKILL] * WORLD, "training ended before it could be killed"
        assert not (killed / "model.safetensors").exists()
        position = json.loads(first.read_text())["position"]
        assert position["epoch"] == 0 and position["batch_in_epoch"] == 2  # mid-epoch

        outs = _stdouts(launcher, _launch(launcher, shards, killed, "--resume", "latest"))
        summaries = [json.loads(out.strip().splitlines()[-1]) for out in outs]
        assert [s["steps"] for s in summaries] == [8, 8] and summaries[0]["steps_this_session"] == 6
        _stdouts(launcher, straight)

    a = load_file(str(killed / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ (largest difference {worst:.3g}), e.g. {different[:3]}"
