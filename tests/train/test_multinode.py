"""Several nodes (issue 12.6), simulated on one machine with gloo: two `torchrun --nnodes 2 --nproc_per_node 2`
launchers meeting at a c10d rendezvous on 127.0.0.1 train to the same weights, bit for bit, as one
`torchrun --nproc_per_node 4` launcher; a run folder that the nodes do not share fails with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._multiprocess import Launcher
from tests._train_fixtures import write_shards

# 4 ranks x batch 4 over 48 images in shards of 10 (the last one 8): 3 steps, no validation split to wait on.
OVERRIDES = ["data.num_workers=0", "data.batch_size=4", "train.epochs=1", "train.checkpoint_every=0",
             "train.warmup_steps=1"]
TIMEOUT_S = 420


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Leave the thread count to torchrun (1 per process when it starts several), as a user's launch would.
    env.pop("OMP_NUM_THREADS", None)
    return env


def _torchrun(launcher: Launcher, launch: list[str], shards: Path, run: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "vgclip.cli", "train", "--data",
           str(shards), "--out", str(run), "--config", "tiny", *OVERRIDES]
    return launcher.start(cmd, _env())


def _nodes(nproc: int, port: int) -> list[str]:
    """One node's launcher of a 2-node job whose rendezvous is at 127.0.0.1:port."""
    return ["--nnodes", "2", "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"vgclip-test-{port}"]


def _rendezvous_port(launcher: Launcher) -> int:
    """The port of a rendezvous store this test serves, bound before any launcher is told about it.

    Both launchers see 127.0.0.1 as their own address, try to host the store there, find the port taken
    and join as clients: the way the second launcher of the pair joins when the first one hosts. A port
    picked free and bound later by a launcher could be taken by another process in between."""
    return launcher.store().port


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = write_shards(tmp_path_factory.mktemp("multinode") / "shards", n_train=48, n_val=0, per_shard=10)
    (root / "val").rmdir()  # no val split: validation would only add rank 0's time
    return root


@pytest.mark.slow
def test_two_launchers_of_two_equal_one_launcher_of_four_bit_for_bit(shards, tmp_path):
    with Launcher(tmp_path / "logs") as launcher:
        port = _rendezvous_port(launcher)
        procs = [_torchrun(launcher, _nodes(2, port), shards, tmp_path / "two-nodes") for _ in range(2)]
        procs.append(_torchrun(launcher, ["--standalone", "--nproc_per_node", "4"], shards, tmp_path / "one-node"))
        for end in launcher.wait(procs, timeout=TIMEOUT_S):
            assert end.returncode == 0, end.stderr[-3000:]
    a = load_file(str(tmp_path / "two-nodes" / "model.safetensors"))
    b = load_file(str(tmp_path / "one-node" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ (largest difference {worst:.3g}), e.g. {different[:3]}"
    assert (tmp_path / "two-nodes" / "checkpoints" / "step-3").is_dir()  # the planned 3 steps, written once


@pytest.mark.slow
def test_a_run_folder_the_nodes_do_not_share_fails_with_one_line(shards, tmp_path):
    with Launcher(tmp_path / "logs") as launcher:
        port = _rendezvous_port(launcher)
        # Each "node" gets its own folder, as node-local disks under the same path would.
        procs = [_torchrun(launcher, _nodes(1, port), shards, tmp_path / f"node{n}" / "run") for n in range(2)]
        results = [(end.returncode, end.stderr) for end in launcher.wait(procs, timeout=TIMEOUT_S)]
    assert all(code != 0 for code, _ in results)
    for _, err in results:
        assert "do not see the run folder rank 0 writes" in err, err[-3000:]
    written = [n for n in range(2) if (tmp_path / f"node{n}" / "run" / "config.yaml").exists()]
    assert written == [], "no half-written run folder"
