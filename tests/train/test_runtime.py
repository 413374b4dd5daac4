"""Settings a run resolves on the machine it starts on, the memory report, and compile-friendly text."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from tests._train_fixtures import write_shards
from vgclip.config import load_config
from vgclip.model.clip import create_model
from vgclip.model.image_tower import ImageTower, resolved_image_config
from vgclip.train.distributed import DistInfo
from vgclip.train.runtime import GIB, memory_plan, resolve_for_device, static_memory_bytes, workers_per_process

CPU = DistInfo(device=torch.device("cpu"))


def test_auto_settings_resolve_on_a_cpu(monkeypatch):
    config = load_config("seed")  # precision auto, num_workers -1
    resolved = resolve_for_device(config, CPU)
    assert resolved.train.precision == "fp32"  # bf16 autocast is for GPUs that support it
    assert resolved.data.num_workers == workers_per_process(1) >= 1
    explicit = load_config("tiny", ["train.precision=bf16", "data.num_workers=3"])
    assert resolve_for_device(explicit, CPU) == explicit  # explicit choices stay


def test_workers_are_split_between_the_processes_of_a_node(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert [workers_per_process(n) for n in (1, 2, 8, 32)] == [15, 7, 1, 1]


def test_memory_plan_says_the_global_batch_and_what_fits():
    plan = memory_plan(static=2 * GIB, per_sample=None, micro_batch=128, accum_steps=2, world_size=8,
                       device_bytes=None)
    assert plan.startswith("global batch 2048 = 128 per micro-batch x 2 accumulation step(s) x 8 process(es)")
    fits = memory_plan(static=2 * GIB, per_sample=0.25 * GIB, micro_batch=128, accum_steps=1, world_size=1,
                       device_bytes=80 * GIB)
    assert "expected peak memory 34.0 GiB per device of 80.0 GiB" in fits and "try" not in fits
    too_big = memory_plan(static=2 * GIB, per_sample=1 * GIB, micro_batch=128, accum_steps=1, world_size=8,
                          device_bytes=80 * GIB)
    assert "will not fit; try data.batch_size=64 train.accum_steps=2 (global batch 1024" in too_big
    hopeless = memory_plan(static=79 * GIB, per_sample=1 * GIB, micro_batch=8, accum_steps=1, world_size=1,
                           device_bytes=80 * GIB)
    assert "the model alone does not fit" in hopeless


def test_static_memory_counts_gradients_and_adam_moments_only_for_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))
    model[0].requires_grad_(False)
    assert static_memory_bytes(model) == 110 * 4 + 110 * (4 + 4 + 8)


def test_hub_weights_tag_and_normalisation_are_written_into_the_config():
    trunk = torch.nn.Linear(2, 2)
    trunk.num_features = 2
    trunk.pretrained_cfg = {"tag": "aa_in1k"}
    tower = ImageTower(trunk, 456, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    cfg = load_config("seed").model.image
    untagged = dataclasses.replace(cfg, name="tf_efficientnet_b5")
    resolved = resolved_image_config(untagged, tower)
    assert resolved.name == "tf_efficientnet_b5.aa_in1k"
    assert (resolved.mean, resolved.std, resolved.image_size) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 456)
    assert resolved_image_config(cfg, tower).name == "tf_efficientnet_b5.aa_in1k"  # a given tag stays
    random_init = dataclasses.replace(untagged, weights="none")  # no weights: no tag to pin
    assert resolved_image_config(random_init, tower).name == "tf_efficientnet_b5"


@pytest.mark.slow
def test_a_run_saves_its_resolved_settings(tmp_path, capfd):
    from vgclip.train.loop import train

    shards = write_shards(tmp_path / "shards", n_train=16, n_val=0)
    config = load_config("tiny", ["train.epochs=1", "data.batch_size=8", "train.precision=auto",
                                  "data.num_workers=-1"])
    train(config, shards, tmp_path / "run")
    # The memory line goes with the other progress lines: a caller's stdout (a benchmark's JSON) stays its own.
    out, err = capfd.readouterr()
    assert "vgclip train: global batch 8 = 8 per micro-batch" in err and "global batch" not in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    tower = create_model(config.model)[0].visual
    assert saved["train"]["precision"] == "fp32" and saved["data"]["num_workers"] >= 1
    assert tuple(saved["model"]["image"]["mean"]) == tower.mean and tuple(saved["model"]["image"]["std"]) == tower.std


def _graphs_compiled(tokenizer, texts_per_batch) -> int:
    """How many graphs torch.compile builds for a tiny text model over these batches."""
    compiled = []

    def counting_backend(graph_module, example_inputs):
        compiled.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    embed = torch.nn.Embedding(tokenizer.hf_tokenizer.vocab_size, 8)
    model = torch.compile(lambda ids, mask: (embed(ids) * mask.unsqueeze(-1)).sum(1), backend=counting_backend)
    for texts in texts_per_batch:
        tokens = tokenizer(texts)
        model(tokens["input_ids"], tokens["attention_mask"])
    return len(compiled)


def test_compiled_training_pads_text_to_one_length():
    tokenizer = create_model(load_config("tiny"))[2]
    batches = [["a cat"], ["a red car parked near the old stone wall"], ["two dogs on the grass by a tree"]]
    assert _graphs_compiled(tokenizer.with_fixed_length(), batches) == 1
    assert _graphs_compiled(tokenizer, batches) > 1  # padding to the longest text recompiles
