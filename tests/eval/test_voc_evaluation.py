"""Zero-shot evaluation end to end: scores, report files, thresholds tuned on one split and applied to another."""

from __future__ import annotations

import csv
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn

from tests._paths import SHARED_DATA
from vgclip.config import EvalConfig
from vgclip.data.transforms import build_image_transform
from vgclip.errors import VgclipError
from vgclip.eval.job import run_zeroshot
from vgclip.eval.prompts import ENSEMBLE_TEMPLATES, build_text_classifier, load_name_overrides, readable_name
from vgclip.eval.records import ZeroshotReport
from vgclip.eval.report_files import summary_table
from vgclip.eval.scoring import score_embeddings
from vgclip.eval.voc_evaluation import ZeroshotSettings


class FakeTokenizer:
    """Words -> ids by crc32 (stable across processes), padded to a fixed length like the real tokenizer."""

    def __init__(self, max_length: int = 12, vocab: int = 997) -> None:
        self.max_length, self.vocab = max_length, vocab

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, text in enumerate(texts):
            for c, word in enumerate(text.lower().replace(".", " ").split()[: self.max_length]):
                ids[r, c] = 1 + zlib.crc32(word.encode()) % (self.vocab - 1)
                mask[r, c] = 1
        return {"input_ids": ids, "attention_mask": mask}


class FakeClip(nn.Module):
    """The model contract (encode_image / encode_text / get_logit_scale) with tiny fixed random weights."""

    def __init__(self, dim: int = 8, scale: float = 10.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img = nn.Linear(12, dim)
        self.txt = nn.EmbeddingBag(997, dim, mode="sum")
        with torch.no_grad():
            self.img.weight.copy_(torch.randn(dim, 12, generator=g))
            self.txt.weight.copy_(torch.randn(997, dim, generator=g))
        self.scale = scale

    def get_logit_scale(self) -> torch.Tensor:
        return torch.tensor(self.scale)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.img(F.adaptive_avg_pool2d(images, 2).flatten(1))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        f = self.txt(tokens["input_ids"], per_sample_weights=tokens["attention_mask"].float())
        return F.normalize(f, dim=-1) if normalize else f


@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vgclip.synthetic.writers import write_synthetic_voc

    out = tmp_path_factory.mktemp("zs") / "voc"
    write_synthetic_voc(out, 40, seed=5, min_side=64, max_side=80)
    return out


def _run(voc: Path, out: Path | None, **opts) -> ZeroshotReport:
    cfg = EvalConfig(**opts.pop("cfg", {}))
    return run_zeroshot(FakeClip(), build_image_transform(32, (0.5,) * 3, (0.5,) * 3), FakeTokenizer(), voc,
                        "test", cfg, out, ZeroshotSettings(num_workers=opts.pop("workers", 0), **opts))  # fmt: skip


def _read_scores(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    classes = [k[len("score_") :] for k in rows[0] if k.startswith("score_")]
    scores = np.array([[float(r[f"score_{c}"]) for c in classes] for r in rows])
    labels = np.array([[float(r[f"label_{c}"]) if r[f"label_{c}"] else np.nan for c in classes] for r in rows])
    return [r["image_id"] for r in rows], classes, scores, labels


def test_report_files_and_metrics_agree_with_sklearn(synth_voc: Path, tmp_path: Path) -> None:
    report = _run(synth_voc, tmp_path / "rep", workers=1, cfg={"difficult": "ignore"})
    for name in ("report.json", "report.md", "scores.csv", "thresholds.json", "threshold_curve.png",
                 "pr_curves.png", "roc_curves.png", "ap_per_class.png"):  # fmt: skip
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["mAP"] == pytest.approx(report.mAP)
    ids, classes, scores, labels = _read_scores(tmp_path / "rep" / "scores.csv")
    test_ids = (synth_voc / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text().split()
    assert ids == test_ids and classes == report.settings.classes
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)  # softmax over classes
    aps = []
    for c, name in enumerate(classes):
        keep = ~np.isnan(labels[:, c])
        if labels[keep, c].sum():
            aps.append(average_precision_score(labels[keep, c], scores[keep, c]))
            assert report.AP[name] == pytest.approx(aps[-1], abs=1e-4)
    assert report.mAP == pytest.approx(np.mean(aps), abs=1e-4)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "official VOC" in md and "chance" in md and "split `trainval`" in md
    assert "mAP" in summary_table(report)


def test_thresholds_tuned_on_trainval_are_applied_to_test(synth_voc: Path, tmp_path: Path) -> None:
    report = _run(synth_voc, tmp_path / "rep", objective="sensitivity:0.9", threshold_mode="per_class", plots=False)
    tuning = report.tuning.to_dict()
    saved = json.loads((tmp_path / "rep" / "thresholds.json").read_text())
    assert saved["tuned_on"]["split"] == "trainval" and not saved["tuned_on"]["is_eval_split"]
    assert saved["score"] == "softmax" and saved["per_class"] == tuning["thresholds"]["per_class"]
    assert tuning["eval_split"]["threshold"] == saved["per_class"] == tuning["tune_split"]["threshold"]
    for name, m in tuning["tune_split"]["per_class"].items():
        if name not in saved["fallback_classes"]:
            assert m["sensitivity"] >= 0.9, name  # the target is met on the tuning split
    # Re-applying the saved thresholds to scores.csv reproduces the reported evaluation-split counts.
    _, classes, scores, labels = _read_scores(tmp_path / "rep" / "scores.csv")
    for c, name in enumerate(classes):
        keep = ~np.isnan(labels[:, c])
        pred = scores[keep, c] >= saved["per_class"][name]
        assert int((pred & (labels[keep, c] == 1)).sum()) == tuning["eval_split"]["per_class"][name]["tp"]


def test_tuning_on_eval_split_needs_flag(synth_voc: Path) -> None:
    with pytest.raises(VgclipError, match="--tune-on-eval"):
        _run(synth_voc, None, tune_split="test")
    report = _run(synth_voc, None, tune_on_eval=True, threshold_mode="global", objective="youden", plots=False)
    assert report.tuning.on_eval_split and "evaluation split itself" in report.tuning.note
    assert report.tuning.tune_split["micro"] == report.tuning.eval_split["micro"]
    assert _run(synth_voc, None, tune_split="none").tuning.tuned is False


def test_unreadable_image_is_counted_not_silent(synth_voc: Path, tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    shutil.copytree(synth_voc, voc)
    root = voc / "VOCdevkit/VOC2007"
    victim = (root / "ImageSets/Main/test.txt").read_text().split()[0]
    (root / "JPEGImages" / f"{victim}.jpg").write_bytes(b"\xff\xd8 truncated")
    report = _run(voc, tmp_path / "rep", tune_split="none", plots=False)
    n_test = len((root / "ImageSets/Main/test.txt").read_text().split())
    assert report.data.unreadable_images == 1 and report.data.evaluated_images == n_test - 1
    assert report.data.skipped[0]["image_id"] == victim
    ids, *_ = _read_scores(tmp_path / "rep" / "scores.csv")
    assert victim not in ids and len(ids) == n_test - 1
    assert victim in (tmp_path / "rep" / "report.md").read_text()


def test_score_kinds() -> None:
    img = F.normalize(torch.randn(5, 4), dim=-1)
    cls = F.normalize(torch.randn(3, 4), dim=-1)
    cos = (img.double() @ cls.double().T).numpy()
    soft, _ = score_embeddings(img, cls, "softmax", 20.0)
    np.testing.assert_allclose(soft, torch.softmax(20.0 * torch.from_numpy(cos), 1).numpy())
    sig, rank = score_embeddings(img, cls, "sigmoid", 20.0, -1.0)
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-(20.0 * cos - 1.0))))
    np.testing.assert_allclose(rank, 20.0 * cos - 1.0)  # unsaturated ranking for AP
    np.testing.assert_allclose(score_embeddings(img, cls, "cosine", 20.0)[0], cos)
    with pytest.raises(VgclipError, match="eval.score"):
        score_embeddings(img, cls, "probit", 1.0)


def test_ensemble_is_renormalised_mean_of_templates() -> None:
    model, tok = FakeClip(), FakeTokenizer()
    ens = build_text_classifier(model, tok, ["dining table"], ENSEMBLE_TEMPLATES)
    single = torch.cat([build_text_classifier(model, tok, ["dining table"], [t]) for t in ENSEMBLE_TEMPLATES])
    expected = F.normalize(single.mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(ens, expected)
    assert ens.norm(dim=-1).item() == pytest.approx(1.0)


def test_readable_names(tmp_path: Path) -> None:
    assert [readable_name(n) for n in ("diningtable", "pottedplant", "tvmonitor", "aeroplane", "motorbike", "cat")] == [
        "dining table", "potted plant", "tv monitor", "airplane", "motorbike", "cat"]  # fmt: skip
    path = tmp_path / "names.yaml"
    path.write_text("tvmonitor: television\n")
    assert readable_name("tvmonitor", load_name_overrides(path)) == "television"
    path.write_text("- a list\n")
    with pytest.raises(VgclipError, match="names.yaml"):
        load_name_overrides(path)
    path.write_text("traffic light: traffic signal\n'no': a no-entry sign\n")
    assert load_name_overrides(path) == {"traffic light": "traffic signal", "no": "a no-entry sign"}
    path.write_text("no: a no-entry sign\n")  # YAML 1.1 reads a bare `no` as False
    with pytest.raises(VgclipError, match="names.yaml: YAML reads key False as bool.*quote"):
        load_name_overrides(path)


def test_cli_with_tiny_real_model(synth_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import vgclip
    from vgclip.cli import main
    from vgclip.model.checkpoint import save_model

    config = vgclip.load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    save_model(tmp_path / "run", model, tokenizer, config)
    out = tmp_path / "rep"
    argv = ["zeroshot", "--checkpoint", str(tmp_path / "run"), "--voc-root", str(synth_voc), "--out", str(out),
            "--workers", "0", "--no-plots", "--templates", "ensemble", "eval.score=cosine", "eval.batch_size=7"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["score"] == "cosine" and report["settings"]["templates"] == "ensemble"
    assert report["mAP"] is not None and (out / "thresholds.json").is_file()
    assert "mAP" in capsys.readouterr().out
    assert main([*argv[:-2], "model.embed_dim=3"]) == 2
    assert "only eval.*" in capsys.readouterr().err


SAMPLE = SHARED_DATA / "voc2012-sample"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real VOC2012 sample absent ({SAMPLE})")
def test_real_sample_without_imagesets(tmp_path: Path) -> None:
    report = _run(SAMPLE, tmp_path / "rep", plots=False, cfg={"difficult": "positive", "templates": "ensemble"})
    assert report.data.evaluated_images == 100 and report.data.skipped_images == 0
    assert any("no ImageSets" in n for n in report.data.notices)
    assert report.tuning.tuned is False and not (tmp_path / "rep" / "thresholds.json").exists()
    assert report.data.ignored_entries == 0  # difficult=positive: nothing left out
    assert "CLIP_benchmark" in (tmp_path / "rep" / "report.md").read_text()
    assert len(report.AP) == 20 and report.chance["person"] == pytest.approx(report.counts["person"]["positives"] / 100)


def test_rerun_without_tuning_removes_stale_thresholds(synth_voc: Path, tmp_path: Path) -> None:
    """`predict --thresholds` must never pick up thresholds of an earlier run in the same folder."""
    _run(synth_voc, tmp_path / "rep", plots=False)
    assert (tmp_path / "rep" / "thresholds.json").is_file()
    report = _run(synth_voc, tmp_path / "rep", plots=False, tune_split=None)
    assert not report.tuning.tuned
    assert not (tmp_path / "rep" / "thresholds.json").exists()
