"""Model cards: a run folder's README.md (written by train, refreshed by zeroshot) and an export's."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import yaml

from tests._train_fixtures import write_shards
from vgclip.cli import main
from vgclip.config import config_to_dict, load_config
from vgclip.export.model_card import write_run_card
from vgclip.export.run_facts import RUN_INFO_FILE, data_summary, gather_run_facts, nearest_preset, record_training
from vgclip.summary import TrainSummary
from vgclip.synthetic.writers import write_synthetic_voc
from vgclip.train.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step tiny run with validation and a zero-shot report (train --voc-root)."""
    root = tmp_path_factory.mktemp("card")
    shards = write_shards(root / "shards", n_train=16, n_val=8)
    write_synthetic_voc(root / "voc", 10, seed=0, min_side=64, max_side=96)
    overrides = ["data.num_workers=0", "train.checkpoint_every=0", "train.max_steps=1"]
    summary = train(load_config("tiny", overrides), shards, root / "run", voc_root=root / "voc")
    return root, summary


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.slow  # shares a tiny training run with --voc-root (tens of seconds)
def test_training_writes_a_hub_card(trained):
    root, summary = trained
    run = root / "run"
    text = (run / "README.md").read_text()
    front = _front_matter(text)
    assert front["library_name"] == "vgclip" and {"clip", "vgclip"} <= set(front["tags"])
    assert set(front["metrics"]) == {"recall", "mAP"}
    results = front["model-index"][0]["results"]
    values = {m["name"]: m["value"] for r in results for m in r["metrics"]}
    report = json.loads((run / "zeroshot" / "report.json").read_text())
    assert values == {"zero-shot mAP": round(report["mAP"], 4), "chance mAP": round(report["chance_mean"], 4)}
    assert f"**mAP {report['mAP']:.4f}** against a chance level of {report['chance_mean']:.4f}" in text
    assert 'vgclip.load_checkpoint("run")' in text and str(root) not in text  # paths relative to the run folder
    assert "vgclip export --checkpoint run --out run-open_clip" in text and "local-dir:run-open_clip" in text
    # preset, data manifest, training time / hardware, validation recall
    assert "preset: `tiny`, with 3 setting(s) differing" in text and "`train.max_steps: 0 -> 1`" in text
    assert "- train: 16 images, 48 phrases, 1 shards" in text
    info = json.loads((run / RUN_INFO_FILE).read_text())
    assert info["train_seconds"] == pytest.approx(summary["seconds"]) and info["steps"] == 1
    assert f"hardware: {info['hardware']} x 1 process(es)" in text
    assert "image->text recall@1/5/10" in text
    assert "max_steps: 1" in text  # the resolved config


@pytest.mark.slow  # shares a tiny training run with --voc-root (tens of seconds)
def test_zeroshot_refreshes_the_run_card_and_ignores_stale_reports(trained, tmp_path):
    root, _ = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    shutil.rmtree(run / "zeroshot")
    write_run_card(run)
    text = (run / "README.md").read_text()
    assert "model-index" not in _front_matter(text) and "Zero-shot: not evaluated yet" in text
    out = tmp_path / "report"
    args = ["zeroshot", "--checkpoint", str(run), "--voc-root", str(root / "voc"), "--out", str(out),
            "--workers", "0", "--no-plots", "--tune-split", "none"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    text = (run / "README.md").read_text()
    assert f"**mAP {report['mAP']:.4f}**" in text and "Full report: `../report`" in text
    # a later refresh (e.g. by a resumed training) still finds the report run_info.json names
    write_run_card(run)
    assert "Full report: `../report`" in (run / "README.md").read_text()
    # weights newer than the report: the report is about an earlier model and leaves the card
    later = (out / "report.json").stat().st_mtime + 10
    os.utime(run / "model.safetensors", (later, later))
    write_run_card(run)
    assert "Zero-shot: not evaluated yet" in (run / "README.md").read_text()


@pytest.mark.slow  # shares a tiny training run with --voc-root (tens of seconds)
def test_step_checkpoint_evaluation_leaves_the_card_alone(trained, tmp_path):
    from vgclip.export.model_card import refresh_after_zeroshot

    root, _ = trained
    step = root / "run" / "checkpoints" / "step-1"
    assert (step / "model.safetensors").is_file()
    assert refresh_after_zeroshot(step, tmp_path) is None
    assert refresh_after_zeroshot(root / "run" / "config.yaml", tmp_path) is None


def test_card_from_a_run_folder_without_training(tmp_path):
    """The card reads only the run folder: config.yaml, metrics.csv, run_info.json, RUN/zeroshot/report.json."""
    import vgclip
    from vgclip.model.checkpoint import save_model

    config = load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    run = tmp_path / "my-run"
    save_model(run, model, tokenizer, config)
    (run / "metrics.csv").write_text("step,epoch,split,loss,i2t_r1,i2t_r5,i2t_r10,t2i_r1,t2i_r5,t2i_r10\n"
                                     "4,0,val,1.5,0.1,0.2,0.3,0.4,0.5,0.6\n")  # fmt: skip
    (run / "zeroshot").mkdir()
    report = {"mAP": 0.61234, "chance_mean": 0.2, "settings": {"split": "test", "voc_root": "/data/VOC2007"}}
    (run / "zeroshot" / "report.json").write_text(json.dumps(report))
    text = write_run_card(run).read_text()
    front = _front_matter(text)
    assert front["model-index"][0]["name"] == "my-run" and "datasets" not in front  # no manifest: source unknown
    assert "**mAP 0.6123** against a chance level of 0.2000" in text
    assert "image->text recall@1/5/10 0.1000 / 0.2000 / 0.3000; text->image 0.4000 / 0.5000 / 0.6000" in text
    assert "training time and hardware: not recorded" in text and "preset: `tiny`, with 0 setting(s)" in text
    assert 'vgclip.load_checkpoint("my-run")' in text and "on `VOC2007` (split test" in text


def test_training_time_adds_up_over_resumed_sessions(tmp_path):
    first = TrainSummary(seconds=100.0, steps=10, steps_this_session=10, data=str(tmp_path / "nowhere"))
    assert record_training(tmp_path, first, world_size=2, device="cpu")["train_seconds"] == 100.0
    resumed = dataclasses.replace(first, seconds=50.0, steps=15, steps_this_session=5)
    info = record_training(tmp_path, resumed, world_size=2, device="cpu")
    assert info["train_seconds"] == 150.0 and info["sessions"] == 2 and info["processes"] == 2
    fresh = record_training(tmp_path, first, world_size=1, device="cpu")  # a new run in the same folder
    assert fresh["train_seconds"] == 100.0 and fresh["sessions"] == 1


def test_nearest_preset_lists_what_differs():
    config = config_to_dict(load_config("offline-small", ["train.lr=0.5"]))
    name, diffs = nearest_preset(config)
    assert name == "offline-small"
    assert len(diffs) == 1 and diffs[0].startswith("train.lr: ") and diffs[0].endswith("-> 0.5")


@pytest.mark.slow  # shares a tiny training run with --voc-root (tens of seconds)
def test_export_card_quotes_the_run(trained, tmp_path):
    pytest.importorskip("open_clip")
    root, _ = trained
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(out), "--hub-id", "me/tiny-clip"]) == 0
    text = (out / "README.md").read_text()
    front = _front_matter(text)
    assert front["library_name"] == "open_clip" and "open_clip" in front["tags"]
    assert front["model-index"][0]["name"] == "tiny-clip"
    assert 'create_model_and_transforms("hf-hub:me/tiny-clip")' in text
    assert f'vgclip.load_checkpoint("{out.resolve()}")' in text and "**mAP " in text


def _bare_run(tmp_path, name: str = "my-run", data: str | None = None, **info):
    """A run folder with the tiny preset's weights and a run_info.json (no training)."""
    import vgclip
    from vgclip.model.checkpoint import save_model

    config = load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    run = tmp_path / "runs" / name
    save_model(run, model, tokenizer, config)
    record = {"train_seconds": 60.0, "steps": 8, "epochs": 2, "hardware": "CPU", "data": data, **info}
    (run / RUN_INFO_FILE).write_text(json.dumps(record))
    return run


def _csv_shards(folder) -> None:
    folder.mkdir(parents=True)
    manifest = {"format": "webdataset", "inputs": {"source": "csv", "captions_csv": "../photos/caps.csv"},
                "splits": {"train": {"images": 7, "regions": 9, "shards": ["train/shard-000000.tar"]}},
                "skipped": {"counts": {"missing_image_file": 2}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_card_describes_the_data_used_with_paths_relative_to_the_run(tmp_path, monkeypatch):
    """A CSV-trained run is not called Visual Genome; no path of the machine it ran on is in the card."""
    _csv_shards(tmp_path / "shards" / "csv")
    monkeypatch.chdir(tmp_path)
    recorded = record_training(tmp_path, TrainSummary(data="shards/csv", steps=8, steps_this_session=8),
                               world_size=1, device="cpu")
    assert recorded["data"] == str(tmp_path / "shards" / "csv")  # absolute: later refreshes run from anywhere
    run = _bare_run(tmp_path, data=recorded["data"])
    monkeypatch.chdir(run)  # a refresh from another folder reads the same shards
    text = write_run_card(run).read_text()
    front = _front_matter(text)
    assert "image-captions" in front["tags"] and "visual-genome" not in front["tags"]
    assert "datasets" not in front
    assert "trained with vgclip on whole-image captions from a CSV file `caps.csv`." in text
    assert "region descriptions" not in text.split("## Model")[0]
    assert "- shards: `../../shards/csv`" in text and "reasons in `../../shards/csv/manifest.json`" in text
    assert "- train: 7 images, 9 captions, 1 shards" in text and "- pairing `single`" in text
    assert str(tmp_path) not in text


def test_card_tags_follow_the_source_kind(tmp_path):
    from vgclip.export.model_card import card_data

    assert data_summary("cc3m/{00000..00331}.tar")["kind"] == "img2dataset"
    assert data_summary(str(tmp_path))["kind"] is None  # a folder without manifest.json: unknown
    run = _bare_run(tmp_path, name="cc3m-run", data="https://host/cc3m/{00000..00331}.tar")
    text = write_run_card(run).read_text()
    assert {"img2dataset", "image-captions"} <= set(_front_matter(text)["tags"])
    assert "img2dataset / open_clip layout" in text and "- shards: `https://host/cc3m/{00000..00331}.tar`" in text
    vg_data = {"location": "x", "manifest": None, "kind": "vg", "source": "vg"}
    vg = dataclasses.replace(gather_run_facts(run), data=vg_data)
    data = card_data(vg, "r", "vgclip")
    assert "visual-genome" in data.tags and data.datasets == ["ranjaykrishna/visual_genome"]


def test_card_reports_the_tracked_zero_shot_map_and_the_chosen_checkpoint(tmp_path):
    """--val-voc-root with train.select_by=zeroshot_map: the card quotes the tracked mAP and the best checkpoint."""
    from vgclip.model.weights_file import read_safetensors, write_safetensors

    best = {"select_by": "zeroshot_map", "value": 0.5123, "checkpoint": "/elsewhere/run/checkpoints/step-8",
            "step": 8, "epoch": 1, "weights": "/elsewhere/run/best.safetensors"}
    run = _bare_run(tmp_path, val_voc_root=str(tmp_path / "data" / "heldout-voc"), best=best)
    (run / "metrics.csv").write_text("step,epoch,split,loss,zeroshot_map,note\n4,0,val,1.5,0.4321,\n"
                                     "8,1,val,1.4,0.5123,\n")  # fmt: skip
    meta = {"format": "pt", "producer": "vgclip", **{k: str(v) for k, v in best.items() if k != "weights"}}
    write_safetensors(run / "best.safetensors", read_safetensors(run / "model.safetensors"), metadata=meta)
    text = write_run_card(run).read_text()
    assert "Zero-shot: not evaluated yet" not in text and "mAP" in _front_matter(text)["metrics"]
    assert "held-out VOC-layout `heldout-voc`" in text and "epoch 0 0.4321, epoch 1 0.5123" in text
    assert "highest **0.5123** (epoch 1)" in text  # 0-based, as the console
    assert ("Best checkpoint (`train.select_by=zeroshot_map`, the highest zero-shot mAP): `checkpoints/step-8` "
            "(after epoch 1, step 8), mAP **0.5123**") in text
    assert 'vgclip.load_checkpoint("my-run/best.safetensors")' in text and "/elsewhere" not in text
    # without run_info.json's record, best.safetensors' metadata names the same checkpoint
    (run / RUN_INFO_FILE).write_text(json.dumps({"train_seconds": 1.0}))
    assert "`checkpoints/step-8` (after epoch 1, step 8), mAP **0.5123**" in write_run_card(run).read_text()


def test_card_says_how_to_install_what_exists(tmp_path):
    text = write_run_card(_bare_run(tmp_path)).read_text()
    assert "pip install vgclip" not in text and 'pip install "vgclip[' not in text
    assert "installed from a clone of its repository: `pip install -e .`" in text
