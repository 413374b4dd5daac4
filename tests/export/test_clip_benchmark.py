"""CLIP_benchmark on an exported run agrees with `vgclip zeroshot` run with CLIP_benchmark's protocol.

Both tools evaluate a VOC2007-layout copy of the synthetic VOC folder (shapes renamed to VOC class names, the
only names CLIP_benchmark's VOC loader knows; prompts still say the shape names) with no download.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import vgclip
from tests._paths import SHARED_DATA
from tests._voc_fixtures import write_renumbered_voc
from vgclip.cli import main as vgclip_main
from vgclip.errors import VgclipError
from vgclip.export.clip_benchmark import (
    DATASET,
    clip_benchmark_protocol,
    protocol_map,
    write_protocol_files,
    write_voc2007_copy,
)
from vgclip.export.open_clip import export_open_clip, load_open_clip_folder
from vgclip.model.checkpoint import save_model
from vgclip.synthetic.writers import SYNTH_CLASSES, write_synthetic_voc

pytest.importorskip("open_clip")
pytest.importorskip("clip_benchmark")

REAL_VOC = SHARED_DATA / "voc2012-sample"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """An offline-small run (pretrained towers, untrained heads), its export, the VOC copy and protocol files."""
    root = tmp_path_factory.mktemp("bench")
    config = vgclip.load_config("offline-small")
    with torch.random.fork_rng():  # the untrained projection heads: a fixed draw
        torch.manual_seed(0)
        model, _, tokenizer = vgclip.create_model(config)
    save_model(root / "run", model, tokenizer, config)
    export_open_clip(root / "run", root / "open_clip")
    write_synthetic_voc(root / "synth", 80, seed=0)
    protocol = clip_benchmark_protocol()
    class_map = dict(zip(SYNTH_CLASSES, protocol.classes))
    write_voc2007_copy(root / "synth", root / "voc2007", class_map)
    files = write_protocol_files(root / "protocol", {voc: shape for shape, voc in class_map.items()})
    return {"root": root, "protocol": protocol, "files": files}


def _run_clip_benchmark(bench, monkeypatch, voc_copy: str = "voc2007") -> float:
    from clip_benchmark import cli
    from clip_benchmark.datasets import voc2007

    def no_download(*args, **kwargs):
        raise AssertionError(f"CLIP_benchmark tried to download {args}")

    monkeypatch.setattr(voc2007, "download_url", no_download)
    root, out = bench["root"], bench["root"] / f"clip_benchmark-{voc_copy}.json"
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--dataset", DATASET, "--dataset_root", str(root / voc_copy), "--split", "test",
        "--model", f"local-dir:{root / 'open_clip'}", "--pretrained", "vgclip", "--no_amp", "--num_workers", "0",
        "--batch_size", "16", "--custom_classname_file", str(bench["files"]["clip_benchmark_classnames"]),
        "--output", str(out),
    ])  # fmt: skip
    cli.main()
    return json.loads(out.read_text())["metrics"]["mean_average_precision"]


def _vgclip_protocol_report(bench, capsys, voc_copy: str = "voc2007") -> dict:
    """`vgclip zeroshot` on a VOC2007 copy with CLIP_benchmark's protocol (the documented command)."""
    root, files = bench["root"], bench["files"]
    out = root / f"report-{voc_copy}"
    argv = ["zeroshot", "--checkpoint", str(root / "run"), "--voc-root", str(root / voc_copy), "--split", "test",
            "--tune-split", "none", "--classes", str(files["classes"]), "--class-names", str(files["class_names"]),
            "--templates", str(files["templates"]), "--difficult", "positive", "--score", "cosine",
            "--no-plots", "--workers", "0", "--out", str(out), "eval.crops=centre"]  # fmt: skip
    assert vgclip_main(argv) == 0, capsys.readouterr().err
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_clip_benchmark_agrees_with_vgclip_zeroshot(bench, monkeypatch, capsys):
    cb_map = _run_clip_benchmark(bench, monkeypatch)
    report = _vgclip_protocol_report(bench, capsys)
    settings = report["settings"]
    assert settings["template_texts"] == ["a photo of a {}."] and settings["difficult"] == "positive"
    assert settings["crops"] == "centre"  # CLIP_benchmark embeds one centre crop (offline-small's default is 8)
    assert settings["class_texts"]["aeroplane"] == SYNTH_CLASSES[0] and settings["class_texts"]["cow"] == "cow"
    ours = protocol_map(report, bench["protocol"].classes)
    # Each side decodes and resizes the files its own way (the same geometry: a rounding step apart).
    assert abs(cb_map - ours) <= 0.002, (cb_map, ours)
    assert ours < report["mAP"]  # 12 of CLIP_benchmark's 20 classes have no positive here and count as 0


@pytest.fixture(scope="module")
def real_voc2007(bench):
    """The 100 real VOC2012 photos of ../shared/data as a VOC2007 copy CLIP_benchmark reads offline."""
    if not REAL_VOC.is_dir():
        pytest.skip(f"real photos not found under {REAL_VOC}")
    root = bench["root"]
    renumbered = write_renumbered_voc(REAL_VOC, root / "real-renumbered")
    protocol = bench["protocol"]
    write_voc2007_copy(renumbered, root / "real-voc2007", dict(zip(protocol.classes, protocol.classes)))
    return root / "real-voc2007"


@pytest.mark.slow
@torch.inference_mode()
def test_real_photos_embed_alike_in_vgclip_and_open_clip(bench, real_voc2007):
    """Each side with its own preprocessing (vgclip zeroshot's decoder and transform, open_clip's preprocess on
    PIL): the same geometry, so every photo's embedding agrees (a half-pixel shift alone gave cosines ~0.985)."""
    from PIL import Image

    from vgclip.data.voc import ImageListDataset

    model, transform, _ = vgclip.load_checkpoint(bench["root"] / "run")
    oc_model, oc_preprocess, _ = load_open_clip_folder(bench["root"] / "open_clip")
    paths = sorted((real_voc2007 / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))
    assert len(paths) == 100
    dataset = ImageListDataset(paths, transform)
    cosines = []
    for start in range(0, len(paths), 25):
        batch = range(start, min(start + 25, len(paths)))
        ours = torch.stack([dataset[i][1] for i in batch]).contiguous()
        theirs = torch.stack([oc_preprocess(Image.open(paths[i])) for i in batch])
        cosines.append((model.encode_image(ours) * oc_model.encode_image(theirs, normalize=True)).sum(-1))
    cosine = torch.cat(cosines)
    assert cosine.min() >= 0.9995, (cosine.min(), paths[int(cosine.argmin())].name)


@pytest.mark.slow
def test_clip_benchmark_agrees_with_vgclip_zeroshot_on_real_photos(bench, real_voc2007, monkeypatch, capsys):
    cb_map = _run_clip_benchmark(bench, monkeypatch, real_voc2007.name)
    report = _vgclip_protocol_report(bench, capsys, real_voc2007.name)
    assert report["data"]["evaluated_images"] == 100 and report["data"]["unreadable_images"] == 0
    ours = protocol_map(report, bench["protocol"].classes)
    assert abs(cb_map - ours) <= 0.002, (cb_map, ours)


@pytest.mark.slow
@torch.inference_mode()
def test_same_tensors_give_same_scores_and_ap(bench):
    from clip_benchmark.datasets.voc2007 import PASCALVoc2007
    from clip_benchmark.metrics import zeroshot_classification as zc

    from vgclip.data.voc import load_voc
    from vgclip.eval.metrics import ranking_metrics
    from vgclip.eval.prompts import build_text_classifier, read_template_file

    root, protocol = bench["root"], bench["protocol"]
    model, transform, tokenizer = vgclip.load_checkpoint(root / "run")
    oc_model, _, oc_tokenizer = load_open_clip_folder(root / "open_clip")
    texts = json.loads(bench["files"]["clip_benchmark_classnames"].read_text())[DATASET]
    dataset = PASCALVoc2007(str(root / "voc2007"), "test", transform=lambda img: transform(img).contiguous())
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    classifier = zc.zero_shot_classifier(oc_model, oc_tokenizer, texts, ["a photo of a {c}."], "cpu", amp=False)
    cb_logits, cb_labels = zc.run_classification(oc_model, classifier, loader, "cpu", amp=False)

    data = load_voc(root / "voc2007", "test", list(protocol.classes), difficult="positive")
    assert data.image_ids == list(dataset.paths)
    assert np.array_equal(data.labels, cb_labels.numpy())  # difficult objects count as positives on both sides
    class_emb = build_text_classifier(model, tokenizer, texts, read_template_file(bench["files"]["templates"]))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    scores = torch.cat([model.encode_image(images[i : i + 16]) for i in range(0, len(images), 16)]) @ class_emb.T
    np.testing.assert_allclose(scores.numpy(), cb_logits.numpy() / 100.0, rtol=0, atol=1e-6)
    # The two AP definitions agree on the same scores (no ties here).
    ours = ranking_metrics(scores.double().numpy(), data.labels, np.ones_like(data.labels, dtype=bool),
                           protocol.classes)  # fmt: skip
    theirs = zc.average_precision_per_class(scores, torch.from_numpy(data.labels))
    assert protocol_map(ours, protocol.classes) == pytest.approx(float(theirs.mean()), abs=1e-6)


def test_voc_copy_is_what_clip_benchmark_reads(tmp_path):
    from clip_benchmark.datasets.voc2007 import PASCALVoc2007

    from vgclip.data.voc import load_voc

    write_synthetic_voc(tmp_path / "synth", 12, seed=1, min_side=64, max_side=96)
    class_map = dict(zip(SYNTH_CLASSES, clip_benchmark_protocol().classes))
    write_voc2007_copy(tmp_path / "synth", tmp_path / "voc2007", class_map)
    theirs = PASCALVoc2007(str(tmp_path / "voc2007"), "test")
    ours = load_voc(tmp_path / "synth", "test", list(SYNTH_CLASSES), difficult="positive")
    assert list(theirs.paths) == ours.image_ids
    assert np.array_equal(theirs.labels.numpy()[:, : len(SYNTH_CLASSES)], ours.labels)
    assert not theirs.labels.numpy()[:, len(SYNTH_CLASSES) :].any()

    with pytest.raises(VgclipError, match="distinct VOC class names"):
        write_voc2007_copy(tmp_path / "synth", tmp_path / "a", {"circle": "spaceship"})
    with pytest.raises(VgclipError, match="has no VOC name"):
        write_voc2007_copy(tmp_path / "synth", tmp_path / "b", {"circle": "aeroplane"})
    with pytest.raises(VgclipError, match="not empty"):
        write_voc2007_copy(tmp_path / "synth", tmp_path / "voc2007", class_map)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_protocol_files_and_template_file(tmp_path):
    from vgclip.eval.prompts import read_template_file, templates_for

    protocol = clip_benchmark_protocol()
    assert len(protocol.classes) == 20 and protocol.classes[10] == "diningtable"
    files = write_protocol_files(tmp_path, {"aeroplane": "circle"})
    assert files["classes"].read_text().split("\n")[:2] == ["aeroplane", "bicycle"]
    assert templates_for(str(files["templates"])) == protocol.templates == ("a photo of a {}.",)
    assert json.loads(files["clip_benchmark_classnames"].read_text())[DATASET][:2] == ["circle", "bicycle"]
    (tmp_path / "mine.txt").write_text("# CLIP_benchmark style\na sketch of a {c}.\nthe {}\n")
    assert read_template_file(tmp_path / "mine.txt") == ("a sketch of a {}.", "the {}")
    (tmp_path / "bad.txt").write_text("a {} and a {}\n")
    with pytest.raises(VgclipError, match="exactly one"):
        read_template_file(tmp_path / "bad.txt")
    with pytest.raises(VgclipError, match="prompt names for classes CLIP_benchmark does not have: circle"):
        write_protocol_files(tmp_path, {"circle": "circle"})
