"""Multi-word class names ("traffic light") end to end: classes file -> labels -> report -> thresholds -> predict.

Issue 11: the classes file was read with the ImageSets row reader, so "traffic light" became "traffic"
and every traffic-light object was silently skipped. The VOC folder here is written by the test itself,
and labels are checked against the test's own XML parse (xml.etree, not the reader under test).
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgclip.cli import main
from vgclip.data.voc import load_voc

CLASSES = ["traffic light", "stop sign", "potted plant", "teddy bear", "parking meter"]
# image id -> objects (name, difficult). "teddy bear" appears only in trainval (no positive in test);
# "parking meter" appears nowhere (the notice); "cell phone" is annotated but not in the class list.
TEST = {
    "t1": [("traffic light", 0), ("stop sign", 0)],
    "t2": [("potted plant", 0)],
    "t3": [("traffic light", 1), ("potted plant", 0)],
    "t4": [("stop sign", 0), ("cell phone", 0)],
    "t5": [("traffic light", 0)],
    "t6": [("potted plant", 0), ("stop sign", 1)],
}
TRAINVAL = {
    "v1": [("teddy bear", 0), ("traffic light", 0)],
    "v2": [("stop sign", 0)],
    "v3": [("potted plant", 0), ("teddy bear", 0)],
    "v4": [("traffic light", 0), ("potted plant", 0)],
    "v5": [("stop sign", 0), ("potted plant", 0)],
    "v6": [("teddy bear", 0)],
}
COLOURS = {"traffic light": (30, 200, 40), "stop sign": (220, 20, 20), "potted plant": (40, 120, 30),
           "teddy bear": (150, 100, 50), "cell phone": (20, 20, 20)}  # fmt: skip


def _write_voc(root: Path) -> Path:
    """A VOC2007-layout folder: JPEGImages, Annotations (names with spaces), ImageSets/Main/{test,trainval}.txt."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for split, images in (("test", TEST), ("trainval", TRAINVAL)):
        (voc / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
        for image_id, objects in images.items():
            img = Image.new("RGB", (48, 40), (90, 90, 90))
            for k, (name, _) in enumerate(objects):
                img.paste(COLOURS[name], (4 + 20 * k, 8, 20 + 20 * k, 32))
            img.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
            ann = ET.Element("annotation")
            ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
            for name, hard in objects:
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = name
                ET.SubElement(obj, "difficult").text = str(hard)
            ET.ElementTree(ann).write(voc / "Annotations" / f"{image_id}.xml", encoding="utf-8")
    return voc


def _xml_labels(xml: Path) -> tuple[set[str], set[str]]:
    """(positive names, difficult-only names) of one image, parsed independently of vgclip."""
    root = ET.parse(xml).getroot()
    objs = [(o.findtext("name").strip(), o.findtext("difficult") == "1") for o in root.iter("object")]
    easy = {n for n, hard in objs if not hard}
    return easy, {n for n, hard in objs if hard} - easy


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("names")
    voc = _write_voc(root / "voc")
    classes = root / "classes.txt"
    classes.write_text("# COCO-style names, one per line\n" + "\n".join(CLASSES) + "\n\n")
    names_yaml = root / "names.yaml"
    names_yaml.write_text('traffic light: traffic signal\n"stop sign": red stop sign\nfire hydrnt: fire hydrant\n')
    return {"root": root, "voc": voc, "classes": classes, "names": names_yaml}


@pytest.fixture(scope="module")
def run_dir(case: dict[str, Path]) -> Path:
    """A saved run of the tiny config (random weights, no download)."""
    import vgclip
    from vgclip.model.checkpoint import save_model

    config = vgclip.load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    save_model(case["root"] / "run", model, tokenizer, config)
    return case["root"] / "run"


def test_class_list_and_labels_match_an_independent_parse(case: dict[str, Path]) -> None:
    data = load_voc(case["voc"], "test", str(case["classes"]))
    assert data.classes == tuple(CLASSES)  # whole lines: nothing cut at the first space
    assert data.image_ids == list(TEST)
    for i, image_id in enumerate(data.image_ids):
        pos, ignored = _xml_labels(case["voc"] / "Annotations" / f"{image_id}.xml")
        assert {c for k, c in enumerate(data.classes) if data.labels[i, k]} == pos - {"cell phone"}, image_id
        assert {c for k, c in enumerate(data.classes) if data.ignore[i, k]} == ignored, image_id
    assert data.unknown_classes == {"cell phone": 1}
    assert data.class_images["parking meter"] == 0 and data.class_images["teddy bear"] == 0
    assert data.class_images["traffic light"] == 3  # t3's difficult one counts as a use of the name


@pytest.mark.slow
def test_zeroshot_report_thresholds_and_predict_round_trip(case: dict[str, Path], run_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = case["root"] / "report"
    argv = ["zeroshot", "--checkpoint", str(run_dir), "--voc-root", str(case["voc"]), "--out", str(out),
            "--classes", str(case["classes"]), "--class-names", str(case["names"]), "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    assert "no annotation uses class(es) parking meter" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["classes"] == CLASSES
    for key in ("AP", "AP_voc07_11pt", "roc_auc", "chance", "counts"):
        assert list(report[key]) == CLASSES, key
    texts = report["settings"]["class_texts"]
    assert texts == {"traffic light": "traffic signal", "stop sign": "red stop sign", "potted plant": "potted plant",
                     "teddy bear": "teddy bear", "parking meter": "parking meter"}  # fmt: skip
    assert report["counts"]["traffic light"] == {"positives": 2, "negatives": 3, "ignored": 1}
    assert report["undefined_classes"] == ["teddy bear", "parking meter"]
    assert report["unused_classes"] == ["parking meter"]  # teddy bear is used, in trainval
    assert report["data"]["unknown_class_objects"] == {"cell phone": 1}
    assert any("--class-names" in n and "fire hydrnt" in n for n in report["data"]["notices"])  # a misspelt key
    md = (out / "report.md").read_text()
    assert "Classes that no annotation uses" in md and "parking meter" in md.split("no annotation uses")[1]
    assert "| traffic light | traffic signal |" in md
    for png in ("pr_curves.png", "roc_curves.png", "ap_per_class.png"):
        assert (out / png).stat().st_size > 0

    with (out / "scores.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image_id", *(f"score_{c}" for c in CLASSES), *(f"label_{c}" for c in CLASSES)]
    assert [r["image_id"] for r in rows] == list(TEST) and rows[2]["label_traffic light"] == ""  # t3: difficult only

    saved = json.loads((out / "thresholds.json").read_text())
    assert saved["classes"] == CLASSES and list(saved["per_class"]) == CLASSES
    assert saved["class_texts"] == texts and saved["fallback_classes"] == ["parking meter"]

    images = [str(case["voc"] / "JPEGImages" / f"{i}.jpg") for i in TEST]
    assert main(["predict", "--checkpoint", str(run_dir), "--labels-file", str(case["classes"]),
                 "--thresholds", str(out / "thresholds.json"), "--json", *images]) == 0  # fmt: skip
    pred = json.loads(capsys.readouterr().out)
    assert pred["thresholds"] == saved["per_class"]
    for row, result in zip(rows, pred["results"]):
        assert list(result["scores"]) == CLASSES
        # Same model, label set, score kind and prompt texts (from thresholds.json): the scores zeroshot wrote.
        np.testing.assert_allclose([result["scores"][c] for c in CLASSES],
                                   [float(row[f"score_{c}"]) for c in CLASSES], rtol=1e-5, atol=1e-6)  # fmt: skip
        assert result["predicted"] == [c for c in CLASSES if result["scores"][c] >= saved["per_class"][c]]

    comma = ", ".join(CLASSES)  # a comma list on the command line names the same labels
    assert main(["predict", "--checkpoint", str(run_dir), "--labels", comma,
                 "--thresholds", str(out / "thresholds.json"), "--json", images[0]]) == 0  # fmt: skip
    first = json.loads(capsys.readouterr().out)["results"][0]
    assert first["predicted"] == pred["results"][0]["predicted"]
    assert first["scores"] == pytest.approx(pred["results"][0]["scores"], abs=1e-6)  # batch of 1 vs 6: float noise


def test_prompts_hold_whole_names(case: dict[str, Path], run_dir: Path) -> None:
    import vgclip
    from vgclip.eval.tagging import predict

    model, transform, tokenizer = vgclip.load_checkpoint(run_dir)
    seen: list[str] = []

    def recording(texts: list[str]):
        seen.extend(texts)
        return tokenizer(texts)

    image = case["voc"] / "JPEGImages" / "t1.jpg"
    predict(model, transform, recording, [image], ["traffic light", "teddy bear"], templates="single",
            class_texts={"traffic light": "traffic signal"}, device="cpu")  # fmt: skip
    assert {"a photo of a traffic signal.", "a photo of a teddy bear."} <= set(seen)
