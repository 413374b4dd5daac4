"""Several processes (issue 27.7): `torchrun --nproc_per_node 2` (gloo) splits the parts between ranks; rank 0
merges them and writes the summary; the result equals the one-process run (rows, scores, embeddings)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._multiprocess import Launcher
from tests._train_fixtures import write_shards
from tests.tagging._tagging_fixtures import LABELS, add_bad_files, embeddings, photo_folder, predictions
from vgclip.cli import main

TIMEOUT_S = 420


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(run_dir: Path, tmp_path: Path) -> None:
    photos = photo_folder(tmp_path / "imgs")
    add_bad_files(photos)
    shards = write_shards(tmp_path / "shards", n_train=10, n_val=4, per_shard=5)  # 3 shards: 2 train, 1 val
    args = ["predict", "--checkpoint", str(run_dir), "--labels", LABELS, str(photos), "--data", str(shards),
            "--part-size", "4", "--batch-size", "3", "--workers", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with Launcher(tmp_path / "logs") as launcher:
        port = launcher.store().port  # the rendezvous store, bound before torchrun is told about it
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"tag-{port}",
               "-m", "vgclip.cli", *args, "--out", str(tmp_path / "two")]  # fmt: skip
        (end,) = launcher.wait([launcher.start(cmd, env)], timeout=TIMEOUT_S)
        assert end.returncode == 0, end.stderr[-3000:]
    two = tmp_path / "two"
    ranks = {p.name[len("predictions-r"):][:2] for p in (two / "parts").glob("predictions-*.parquet")}
    assert ranks == {"00", "01"}  # both ranks wrote parts
    a, b = predictions(tmp_path / "one"), predictions(two)
    order_a, order_b = np.argsort(a["key"]), np.argsort(b["key"])
    assert len(a["key"]) == 11 + 14
    for column in a:
        left, right = [a[column][i] for i in order_a], [b[column][i] for i in order_b]
        if column.startswith("score:"):
            assert np.allclose(left, right, atol=1e-5, rtol=0), column
        else:
            assert left == right, column
    emb_a, keys_a = embeddings(tmp_path / "one")
    emb_b, keys_b = embeddings(two)
    assert keys_a == keys_b and np.allclose(emb_a.astype(np.float32), emb_b.astype(np.float32), atol=2e-3)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["this_run"]["ranks"] == 2 and summary["counts"]["scored"] == 25
    assert (two / "skipped.csv").read_bytes() == (tmp_path / "one" / "skipped.csv").read_bytes()
