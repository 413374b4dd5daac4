"""Zero-shot tracking while training: --val-voc-root scored every epoch, train.select_by=zeroshot_map, resume."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vgclip
from tests._multiprocess import run_gloo_workers
from tests._train_fixtures import write_shards
from vgclip.cli import main as cli
from vgclip.config import load_config
from vgclip.data.views import VIEWS
from vgclip.data.voc import load_voc
from vgclip.errors import VgclipError
from vgclip.eval.voc_evaluation import ZeroshotSettings, evaluate_zeroshot
from vgclip.synthetic.writers import write_synthetic_voc
from vgclip.train import state as S
from vgclip.train import zeroshot_tracking as zt
from vgclip.train.loop import train

TINY = ["data.num_workers=0", "train.checkpoint_every=0", "model.image.image_size=32", "train.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_voc(root / "voc", 12, seed=5, min_side=64, max_side=96)
    return write_shards(root / "shards", n_train=16, n_val=8), root / "voc"


@pytest.fixture(scope="module")
def tracked_run(data, tmp_path_factory):
    """Two epochs with select_by=zeroshot_map through the CLI; (run folder, printed summary)."""
    shards, voc = data
    run = tmp_path_factory.mktemp("runs") / "run"
    argv = ["train", "--data", str(shards), "--out", str(run), "--config", "tiny", "--val-voc-root", str(voc),
            *TINY, "train.epochs=2", "train.select_by=zeroshot_map"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli(argv) == 0
    return run, json.loads(printed.getvalue().strip().splitlines()[-1])


def _history(run) -> dict[int, float]:
    """epoch -> zero-shot mAP from the val rows of metrics.csv."""
    rows = csv.DictReader((run / "metrics.csv").open(encoding="utf-8"))
    return {int(r["epoch"]): float(r["zeroshot_map"]) for r in rows if r["split"] == "val" and r["zeroshot_map"]}


def _kept_best(run) -> tuple[int, float]:
    """(epoch, mAP) of the checkpoint kept as best (the newest one is kept too: keep_checkpoints=1)."""
    path, value = S.best_checkpoint(run / "checkpoints", "zeroshot_map")
    position = json.loads((path / S.STATE_FILE).read_text())["position"]
    return position["epoch"] - 1, value  # an epoch-end checkpoint's position is the start of the next epoch


def test_every_epoch_records_a_map_and_the_best_is_kept(tracked_run):
    run, _ = tracked_run
    history = _history(run)
    assert sorted(history) == [0, 1] and all(0.0 <= v <= 1.0 for v in history.values())
    epoch, value = _kept_best(run)
    assert value == pytest.approx(max(history.values()), abs=1e-6)
    assert history[epoch] == pytest.approx(max(history.values()), abs=1e-6)
    # The best checkpoint survives pruning alongside the newest; its weights and why are in best.safetensors.
    assert len(S.list_checkpoints(run / "checkpoints")) in (1, 2)
    with safe_open(str(run / "best.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["select_by"] == "zeroshot_map" and float(meta["value"]) == pytest.approx(value)
    model, _, _ = vgclip.load_checkpoint(run / "best.safetensors")
    kept = S.best_checkpoint(run / "checkpoints", "zeroshot_map")[0] / "model.safetensors"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_file(str(kept)).items())


def test_summary_names_the_metric_and_value(tracked_run):
    run, summary = tracked_run
    best = max(_history(run).values())
    assert summary["best"]["select_by"] == "zeroshot_map" and summary["best"]["value"] == pytest.approx(best, abs=1e-6)
    assert summary["best"]["checkpoint"] == str(S.best_checkpoint(run / "checkpoints", "zeroshot_map")[0])
    # One epoch numbering everywhere: the summary names the epoch as the console and metrics.csv do.
    assert summary["best"]["epoch"] == _kept_best(run)[0] and _history(run)[summary["best"]["epoch"]] == best
    assert summary["best_zeroshot_map"] == pytest.approx(best, abs=1e-6)
    assert summary["val"]["zeroshot_map"] == pytest.approx(_history(run)[1], abs=1e-5)  # the last epoch's


def test_resume_keeps_the_best_map(data, tracked_run, tmp_path):
    shards, voc = data
    run = tmp_path / "run"
    shutil.copytree(tracked_run[0], run)  # the two-epoch run, continued here for a third epoch
    first = tracked_run[1]
    saved = json.loads((S.resolve_resume(run, "latest") / S.STATE_FILE).read_text())["position"]
    assert saved["best_zeroshot_map"] == pytest.approx(first["best_zeroshot_map"])
    more = load_config("tiny", TINY + ["train.epochs=3", "train.select_by=zeroshot_map"])
    resumed = train(more, shards, run, resume="latest", val_voc_root=voc)
    history = _history(run)
    assert sorted(history) == [0, 1, 2]  # the first session's rows are kept in metrics.csv
    # The best so far came along in the checkpoint: the best of all three epochs, not of the third alone.
    assert resumed["best_zeroshot_map"] == pytest.approx(max(history.values()), abs=1e-6)
    assert resumed["best_zeroshot_map"] >= first["best_zeroshot_map"]
    assert _kept_best(run)[1] == pytest.approx(max(history.values()), abs=1e-6)


def test_pruning_keeps_the_best_by_the_chosen_metric(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    for step, (loss, zs_map) in enumerate([(0.5, 0.3), (0.2, 0.6), (0.9, 0.7), (0.4, None), (0.7, 0.5)], start=1):
        S.save_train_state(tmp_path, model=model, optimizer=opt, scheduler=sched, scaler=None, config={},
                           position=S.Position(step=step, val_loss=loss, zeroshot_map=zs_map))
    # Not the newest: lowest loss at step 2, highest mAP at step 3.
    assert S.best_checkpoint(tmp_path, "val_loss") == (tmp_path / "step-2", 0.2)
    assert S.best_checkpoint(tmp_path, "zeroshot_map") == (tmp_path / "step-3", 0.7)
    S.prune_checkpoints(tmp_path, keep=1, select_by="zeroshot_map")
    assert [p.name for p in S.list_checkpoints(tmp_path)] == ["step-3", "step-5"]


def test_select_by_zeroshot_map_needs_the_folder(data, tmp_path):
    shards, voc = data
    config = load_config("tiny", TINY + ["train.select_by=zeroshot_map"])
    with pytest.raises(VgclipError, match="--val-voc-root"):
        train(config, shards, tmp_path / "run")
    with pytest.raises(VgclipError, match="--val-voc-root.*not a folder"):
        train(config, shards, tmp_path / "run", val_voc_root=tmp_path / "missing")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _ddp_worker(rank: int, shards: str, voc: str, run: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    config = load_config("tiny", TINY + ["train.epochs=1", "train.select_by=zeroshot_map"])
    return train(config, shards, run, val_voc_root=voc)


@pytest.mark.slow
def test_two_processes_only_rank0_scores_and_none_waits_forever(data, tmp_path):
    shards, voc = data
    run = tmp_path / "run"
    rank0, rank1 = run_gloo_workers(_ddp_worker, 2, args=(str(shards), str(voc), str(run)))
    history = _history(run)
    assert sorted(history) == [0]  # rank 0 alone scores and logs
    assert rank0["best"]["value"] == pytest.approx(max(history.values()), abs=1e-6)
    assert rank1["steps"] == rank0["steps"]


# --- issue 26.16: a locked image tower's features of the --val-voc-root photos are computed once per run ---

LOCKED = ["model.image.lock=true", "eval.crops=multi"]
SCORING = ZeroshotSettings(tune_split=None, plots=False, num_workers=0)


def _model(*overrides: str):
    config = load_config("tiny", [*TINY, *overrides])
    model, eval_tf, tokenizer = vgclip.create_model(config)
    return config, model, eval_tf, tokenizer


@contextlib.contextmanager
def _counting(module: torch.nn.Module):
    """Images (rows) that go through `module`'s forward while inside, as a one-item list."""
    seen = [0]
    handle = module.register_forward_hook(lambda _m, args, _out: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _full_path(model, eval_tf, tokenizer, voc, config):
    """The uncached scoring of the held-out split: evaluate_zeroshot with the whole image tower."""
    return evaluate_zeroshot(model, eval_tf, tokenizer, voc.root, voc.split, config.eval, SCORING, device="cpu")


def _train_the_head(model, seed: int) -> None:
    """What an epoch of LiT training changes: the projections and the temperature, never the tower."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (model.image_proj.weight, model.text_proj.weight):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
        model.logit_scale.add_(0.3)


def test_locked_tower_embeds_the_photos_once_and_scores_as_the_full_path(data, capsys):
    _, voc_root = data
    config, model, eval_tf, tokenizer = _model(*LOCKED)
    voc = zt.check_val_voc(voc_root, config)
    assert capsys.readouterr().err == ""  # nothing to warn about: tracking costs one evaluation
    photos = len(load_voc(voc_root, voc.split).image_ids)
    assert zt.trunk_cached(model, config)
    for epoch in range(3):
        with _counting(model.visual.trunk) as rows:
            value, note = zt.zeroshot_map(model, eval_tf, tokenizer, voc, config, torch.device("cpu"))
        assert note == "" and value is not None
        assert rows[0] == (photos * VIEWS if epoch == 0 else 0)  # every view once, then never again
        full = _full_path(model, eval_tf, tokenizer, voc, config)
        assert value == pytest.approx(float(full.report.mAP), abs=1e-6)
        _train_the_head(model, seed=epoch)
    # The scores themselves, not only their mAP, are the full path's.
    encode = zt._cached_encoder(model, eval_tf, voc, config, torch.device("cpu"), 0)
    cached = evaluate_zeroshot(model, eval_tf, tokenizer, voc.root, voc.split, config.eval, SCORING, device="cpu",
                               encode=encode)
    full = _full_path(model, eval_tf, tokenizer, voc, config)
    assert cached.evaluated.data.image_ids == full.evaluated.data.image_ids
    assert np.allclose(cached.evaluated.scores, full.evaluated.scores, atol=1e-5)
    assert cached.report.AP == pytest.approx(full.report.AP, abs=1e-6)


def test_changed_tower_weights_are_embedded_again(data):
    _, voc_root = data
    config, model, eval_tf, tokenizer = _model(*LOCKED)
    voc = zt.check_val_voc(voc_root, config)
    zt.zeroshot_map(model, eval_tf, tokenizer, voc, config, torch.device("cpu"))
    with torch.no_grad():  # e.g. weights loaded into the tower: the kept features no longer match it
        next(model.visual.trunk.parameters()).mul_(1.5)
    with _counting(model.visual.trunk) as rows:
        value, _ = zt.zeroshot_map(model, eval_tf, tokenizer, voc, config, torch.device("cpu"))
    assert rows[0] > 0
    assert value == pytest.approx(float(_full_path(model, eval_tf, tokenizer, voc, config).report.mAP), abs=1e-6)


def test_unlocked_tower_takes_the_full_path_every_epoch_and_says_so(data, capsys):
    _, voc_root = data
    for overrides in ([], ["model.image.lock=true", "model.image.unlocked_blocks=1"]):
        config, model, eval_tf, tokenizer = _model("eval.crops=multi", *overrides)
        voc = zt.check_val_voc(voc_root, config)
        photos = len(load_voc(voc_root, voc.split).image_ids)
        err = capsys.readouterr().err
        assert f"zero-shot tracking encodes {photos} photos x {VIEWS} view(s)" in err
        assert "through the whole image tower every epoch" in err and len(err.splitlines()) == 1
        assert not zt.trunk_cached(model, config)
        for _ in range(2):
            with _counting(model.visual.trunk) as rows:
                value, _ = zt.zeroshot_map(model, eval_tf, tokenizer, voc, config, torch.device("cpu"))
            assert rows[0] == photos * VIEWS
            assert value == pytest.approx(float(_full_path(model, eval_tf, tokenizer, voc, config).report.mAP),
                                          abs=1e-6)
        assert voc.cache.features is None


def test_a_locked_run_embeds_the_val_photos_once(data, tmp_path, monkeypatch):
    """Through train(): two epochs on the LiT cache, the held-out photos go through the tower once."""
    shards, voc = data
    calls = []
    real = zt.encode_images
    monkeypatch.setattr(zt, "encode_images", lambda *a, **k: calls.append(k.get("rows")) or real(*a, **k))
    config = load_config("tiny", TINY + LOCKED + ["train.epochs=2"])
    train(config, shards, tmp_path / "run", val_voc_root=voc)
    assert sorted(_history(tmp_path / "run")) == [0, 1]
    assert len(calls) == 1 and calls[0] is not None  # the tower's features, once, for both epochs
