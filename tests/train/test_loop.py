"""The training loop: optimizer groups, schedule, a tiny end-to-end run, user errors, divergence."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import vgclip
from tests._train_fixtures import ToyClip, write_shards
from vgclip.config import TrainConfig, load_config
from vgclip.errors import VgclipError
from vgclip.train.evaluate import recall_at_k
from vgclip.train.grads import keep_embedding_grads
from vgclip.train.loop import seed_everything, train
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
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # sims rows: image0 -> [1, .8, 0] (own text first), image1 -> [0, .6, 1] (own text 2nd),
    # image2 -> [.6, .96, .8] (own text 2nd)
    r = recall_at_k(images, texts, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == 1.0
    # columns: text0 -> [1, 0, .6] (1st), text1 -> [.8, .6, .96] (3rd), text2 -> [0, 1, .8] (2nd)
    assert r["t2i_r1"] == pytest.approx(1 / 3) and r["t2i_r2"] == pytest.approx(2 / 3)


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
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) in (["step-8"], ["step-4", "step-8"])
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
    assert len(notes) == 2 and all("skipped non-finite" in n for n in notes)


def test_cached_image_features_match_the_locked_tower(shards):
    from vgclip.data.loader import list_shards
    from vgclip.model.clip import create_model
    from vgclip.train.cache import CachedImageClip, compute_features

    cfg = load_config("tiny", TINY + ["model.image.lock=true", "data.augment=false"])
    model, eval_tf, tokenizer = create_model(cfg.model)
    model.train()  # the locked tower stays in eval mode (frozen BatchNorm statistics)
    features, keys, metas = compute_features(model.visual, list_shards(shards, "train"), eval_tf, torch.device("cpu"))
    assert features.shape == (32, model.visual.output_dim) and len(keys) == len(set(keys)) == 32
    assert all(m["regions"][0]["phrase"].startswith("a ") for m in metas)

    from vgclip.data.loader import make_loader

    images, tokens = next(iter(make_loader(shards, "train", cfg.data, eval_tf, tokenizer, train=False, seed=0)))
    model.eval()  # no text dropout: compare the image side through both paths
    full = model(images, tokens)
    cached = CachedImageClip(model)(features[: len(images)], tokens)
    torch.testing.assert_close(cached["image_embeds"], full["image_embeds"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached["text_embeds"], full["text_embeds"])


def test_locked_image_tower_trains_on_the_cache(shards, tmp_path):
    from vgclip.train.cache import CACHE_FILE

    overrides = TINY + ["model.image.lock=true", "data.augment=false", "train.epochs=2"]
    run = tmp_path / "run"
    summary = train(load_config("tiny", overrides), shards, run)
    assert summary["steps"] == 8 and (run / CACHE_FILE).is_file()
    seed_everything(0)  # as train() does before building the model: the initial weights
    initial = vgclip.create_model(load_config("tiny", overrides))[0]
    trained = vgclip.load_checkpoint(run)[0]
    for (name, before), after in zip(initial.visual.state_dict().items(), trained.visual.state_dict().values()):
        assert torch.equal(before, after), f"locked tower changed: {name}"
    assert not torch.equal(initial.text_proj.weight, trained.text_proj.weight)
    stamp = (run / CACHE_FILE).stat().st_mtime_ns
    train(load_config("tiny", overrides), shards, tmp_path / "run", resume="latest")  # finished: nothing to do
    assert (run / CACHE_FILE).stat().st_mtime_ns == stamp  # same tower and shards: the cache is reused


@pytest.mark.parametrize("extra", [["train.precision=bf16", "train.channels_last=true"],
                                   ["train.precision=fp16", "train.accum_steps=2", "data.batch_size=4"]])
def test_mixed_precision_steps(shards, tmp_path, extra):
    summary = train(load_config("tiny", TINY + ["train.max_steps=2", *extra]), shards, tmp_path / "run")
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    weights = vgclip.load_checkpoint(tmp_path / "run")[0].state_dict()
    assert all(v.dtype != torch.float16 and v.dtype != torch.bfloat16 for v in weights.values())  # fp32 master weights


def test_unknown_precision_is_a_config_error(shards, tmp_path):
    with pytest.raises(VgclipError, match="train.precision"):
        train(load_config("tiny", TINY + ["train.precision=fp8"]), shards, tmp_path / "run")


def test_cli_user_errors_are_one_line(shards, tmp_path, capsys):
    from vgclip.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--config", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vgclip train: error:") and "no such folder" in err and "\n" not in err
    (tmp_path / "run" / "checkpoints" / "step-1").mkdir(parents=True)
    assert main(["train", "--data", str(shards), "--out", str(tmp_path / "run"), "--config", "tiny"]) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert main(["train", "--data", str(shards), "--out", str(tmp_path / "run"), "--config", "tiny",
                 "train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err


def test_voc_root_adds_a_zero_shot_report(shards, tmp_path):
    from vgclip.synthetic.writers import write_synthetic_voc

    write_synthetic_voc(tmp_path / "voc", 12, seed=0, min_side=64, max_side=96)
    run = tmp_path / "run"
    summary = train(load_config("tiny", TINY + ["train.max_steps=1"]), shards, run, voc_root=tmp_path / "voc")
    assert 0.0 <= summary["zeroshot"]["mAP"] <= 1.0
    assert (run / "zeroshot" / "report.json").is_file()


def test_sparse_embedding_grads_switch_changes_no_update(shards, tmp_path, monkeypatch):
    """train.sparse_embedding_grads=false (plain dense gradients) trains to the same weights."""
    import vgclip.train.loop as loop

    switched = []
    monkeypatch.setattr(loop, "keep_embedding_grads", lambda model: switched.append(keep_embedding_grads(model)))
    runs = {}
    for sparse in ("true", "false"):
        cfg = load_config("tiny", TINY + ["train.max_steps=2", f"train.sparse_embedding_grads={sparse}"])
        train(cfg, shards, tmp_path / sparse)
        runs[sparse] = vgclip.load_checkpoint(tmp_path / sparse)[0].state_dict()
    assert switched == [1]  # the vocabulary table, in the sparse run only
    for name, value in runs["true"].items():
        torch.testing.assert_close(runs["false"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_temperature_above_the_cap_comes_back_down(shards, tmp_path):
    """A logit_scale parameter past ln(max_logit_scale) is clamped after the step, then trains again.

    Random towers contrast poorly, so the loss wants a lower temperature (a smaller scale); inside
    forward the clamp at the cap gives the parameter no gradient, so only clamping the parameter
    itself after each optimizer step lets it come down.
    """
    cfg = load_config("tiny", TINY + ["train.max_steps=3", "model.init_temperature=0.005"])  # ln(200) > ln(100)
    train(cfg, shards, tmp_path / "run")
    scale = float(vgclip.load_checkpoint(tmp_path / "run")[0].logit_scale.detach())
    assert 4.5 < scale < math.log(100)


def test_an_epoch_cut_short_by_the_loader_is_noted(shards, tmp_path, monkeypatch):
    import itertools

    import vgclip.data.loader as loader_module

    real = loader_module.make_loader

    def short_loader(*args, **kwargs):  # a loader that gives 2 of the 4 planned batches (e.g. unreadable images)
        batches = real(*args, **kwargs)
        return itertools.islice(batches, 2) if kwargs.get("train") else batches

    monkeypatch.setattr(loader_module, "make_loader", short_loader)
    summary = train(load_config("tiny", TINY), shards, tmp_path / "run")
    assert summary["steps"] == 2
    notes = [r["note"] for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if r["note"]]
    assert notes == ["epoch ended after 2 of 4 planned micro-batches: a rank's loader ran short"]
