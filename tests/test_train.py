"""The training loop: optimizer groups, schedule, a tiny end-to-end run, user errors, divergence."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from _train_fixtures import ToyClip, write_shards

import vgclip
from vgclip.config import TrainConfig, load_config
from vgclip.errors import VgclipError
from vgclip.train.evaluate import recall_at_k
from vgclip.train.loop import train
from vgclip.train.optim import build_optimizer, cosine_with_warmup, param_groups

TINY = ["data.num_workers=0", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n_train=32, n_val=16)


def test_no_weight_decay_on_biases_norms_and_temperature():
    model = ToyClip()
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-3, weight_decay=0.1, image_lr=1e-4))}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups.values() if g["weight_decay"] > 0 for p in g["params"]}
    assert {"logit_scale", "visual.0.bias", "visual.4.weight", "visual.4.bias", "text_proj.bias"} <= no_decay
    assert decay == {"visual.0.weight", "text.weight", "image_proj.weight", "text_proj.weight"}
    assert groups["image/decay"]["lr"] == 1e-4  # per-tower lr
    assert groups["text/decay"]["lr"] == 1e-3  # text_lr=0 -> lr
    assert groups["other/decay"]["lr"] == 1e-3  # projections are not part of a tower


def test_frozen_parameters_get_no_optimizer_state():
    model = ToyClip()
    model.visual.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.visual.parameters())
    model.requires_grad_(False)
    with pytest.raises(VgclipError, match="frozen"):
        build_optimizer(model, TrainConfig())


def test_warmup_then_cosine():
    f = cosine_with_warmup(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(2, 12))


def test_recall_at_k():
    emb = torch.eye(4)
    r = recall_at_k(emb, emb[[0, 1, 3, 2]], ks=(1, 2))
    assert r["i2t_r1"] == 0.5 and r["t2i_r1"] == 0.5 and r["i2t_r2"] == 0.5
    r = recall_at_k(emb, emb, ks=(1,))
    assert r["i2t_r1"] == 1.0


def test_tiny_run_writes_a_loadable_run_folder(shards, tmp_path):
    run = tmp_path / "run"
    summary = train(load_config("tiny", TINY + ["train.epochs=2"]), shards, run)
    assert summary["steps"] == 8 and summary["epochs"] == 2 and summary["bad_steps"] == 0
    assert set(summary["val"]) >= {"loss", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert math.isfinite(summary["final_train_loss"])
    assert load_config(str(run / "config.yaml")).train.epochs == 2
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows if r["split"] == "train"] == [str(i) for i in range(1, 9)]
    assert len([r for r in rows if r["split"] == "val"]) == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] in (["step-8"], ["step-4", "step-8"])
    model, transform, tokenizer = vgclip.load_checkpoint(run)
    trained = vgclip.load_checkpoint(run / "checkpoints" / "step-8")[0]
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name


def test_accumulation_and_max_steps(shards, tmp_path):
    cfg = load_config("tiny", TINY + ["train.accum_steps=2", "train.max_steps=1", "data.batch_size=4"])
    summary = train(cfg, shards, tmp_path / "run")
    assert summary["steps"] == 1 and summary["samples_seen"] == 8


def test_missing_or_empty_data_is_a_one_line_error(tmp_path):
    cfg = load_config("tiny", TINY)
    with pytest.raises(VgclipError, match="no such folder"):
        train(cfg, tmp_path / "nope", tmp_path / "run")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(VgclipError, match="no shards"):
        train(cfg, tmp_path / "empty", tmp_path / "run")


def test_non_finite_losses_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch):
    from vgclip.model.loss import ClipLoss

    def nan_loss(self, image_embeds, text_embeds, logit_scale):
        return (image_embeds * text_embeds).sum() * float("nan")

    monkeypatch.setattr(ClipLoss, "forward", nan_loss)
    run = tmp_path / "run"
    with pytest.raises(VgclipError, match="max_bad_steps=2"):
        train(load_config("tiny", TINY + ["train.max_bad_steps=2"]), shards, run)
    notes = [r["note"] for r in csv.DictReader((run / "metrics.csv").open()) if r["note"]]
    assert len(notes) == 3 and all("skipped non-finite" in n for n in notes)
