"""Synthetic data (`vgclip synth`): files parse as the real VG / VOC formats and agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import defusedxml.ElementTree as DET
import numpy as np
import pytest
from PIL import Image

from tests._paths import SHARED_DATA
from vgclip import cli
from vgclip.errors import VgclipError
from vgclip.synthetic import writers as synthetic
from vgclip.synthetic.draw import render_scene
from vgclip.synthetic.text import object_phrases, scene_regions
from vgclip.synthetic.writers import SYNTH_CLASSES, scene_rng, write_synthetic_vg, write_synthetic_voc

SHARED = SHARED_DATA
REAL_VG = SHARED / "vg-json-sample" / "v1.2"
REAL_VOC_XML = SHARED / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "Annotations"
REAL_VOC_SETS = SHARED / "voc2007-imagesets" / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"

IMAGE_KEYS = ["width", "url", "height", "image_id", "coco_id", "flickr_id"]
REGION_KEYS = ["region_id", "width", "height", "image_id", "phrase", "y", "x"]
CLASS_LINE = re.compile(r"^\d{6} (?: 1|-1| 0)$")
SIZES = {"min_side": 96, "max_side": 160}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    vg = write_synthetic_vg(root / "vg", 30, seed=3, **SIZES)
    voc = write_synthetic_voc(root / "voc", 30, seed=3, **SIZES)
    return root, vg, voc


def _voc_objects(xml_path: Path):
    """The parsed <annotation> root and its (name, difficult) pairs."""
    root = DET.parse(xml_path).getroot()
    return root, [(o.findtext("name"), int(o.findtext("difficult"))) for o in root.findall("object")]


def _intersection(a, b) -> int:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0)


def _class_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) & set(SYNTH_CLASSES)


def test_vg_json_keys_and_types(data):
    root, counts, _ = data
    images = json.loads((root / "vg" / "image_data.json").read_text())
    regions = json.loads((root / "vg" / "region_descriptions.json").read_text())
    assert len(images) == len(regions) == counts["images"] == 30
    assert sum(len(r["regions"]) for r in regions) == counts["regions"]
    for entry in images:
        assert list(entry) == IMAGE_KEYS
        assert entry["coco_id"] is None and entry["flickr_id"] is None
        assert all(isinstance(entry[k], int) for k in ("width", "height", "image_id"))
    for entry in regions:
        assert list(entry) == ["regions", "id"]
        assert entry["regions"], "every image has at least one region"
        for region in entry["regions"]:
            assert list(region) == REGION_KEYS
            assert region["image_id"] == entry["id"]
            assert isinstance(region["phrase"], str)
            assert all(isinstance(region[k], int) for k in REGION_KEYS if k != "phrase")
    ids = [r["region_id"] for e in regions for r in e["regions"]]
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not REAL_VG.is_dir(), reason=f"real Visual Genome sample not found at {REAL_VG}")
def test_vg_json_matches_real_sample(data):
    root, _, _ = data
    for name in ("image_data.json", "region_descriptions.json"):
        real = json.loads((REAL_VG / name).read_text())[0]
        ours = json.loads((root / "vg" / name).read_text())[0]
        assert list(ours) == list(real)
        assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in real.items()}
    real_region = json.loads((REAL_VG / "region_descriptions.json").read_text())[0]["regions"][0]
    our_region = json.loads((root / "vg" / "region_descriptions.json").read_text())[0]["regions"][0]
    assert {k: type(v) for k, v in our_region.items()} == {k: type(v) for k, v in real_region.items()}
    assert list(our_region) == list(real_region)


def test_vg_images_match_urls_sizes_and_boxes(data):
    root, counts, _ = data
    images = json.loads((root / "vg" / "image_data.json").read_text())
    regions = {e["id"]: e["regions"] for e in json.loads((root / "vg" / "region_descriptions.json").read_text())}
    folders = {"VG_100K": 0, "VG_100K_2": 0}
    for entry in images:
        match = re.fullmatch(r"https://cs\.stanford\.edu/people/rak248/(VG_100K(?:_2)?)/(\d+)\.jpg", entry["url"])
        assert match and int(match.group(2)) == entry["image_id"]
        folders[match.group(1)] += 1
        with Image.open(root / "vg" / match.group(1) / f"{entry['image_id']}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (entry["width"], entry["height"])
        assert SIZES["min_side"] <= min(img.size) and max(img.size) <= SIZES["max_side"]
        for r in regions[entry["image_id"]]:
            assert r["width"] > 0 and r["height"] > 0 and r["x"] >= 0 and r["y"] >= 0
            assert r["x"] + r["width"] <= entry["width"] and r["y"] + r["height"] <= entry["height"]
    assert folders == {k: counts[k] for k in folders}
    n_files = sum(1 for _ in (root / "vg").rglob("*.jpg"))
    assert n_files == len(images)


def test_every_phrase_names_a_class(data):
    root, _, _ = data
    for entry in json.loads((root / "vg" / "region_descriptions.json").read_text()):
        for region in entry["regions"]:
            assert _class_words(region["phrase"]), region["phrase"]
    # Each object's own phrases name that object's class, whatever else they mention.
    for index in range(40):
        rng = scene_rng(11, 0, index)
        scene = render_scene(rng, **SIZES)
        for i, obj in enumerate(scene.objects):
            others = [o for j, o in enumerate(scene.objects) if j != i]
            phrases = object_phrases(obj, others, rng)
            assert 1 <= len(phrases) <= 3
            for phrase in phrases:
                assert re.search(rf"\b{obj.cls}\b", phrase.lower()), (obj, phrase)


def test_scene_objects_are_large_separate_and_inside():
    for index in range(40):
        scene = render_scene(scene_rng(5, 0, index), **SIZES)
        assert 1 <= len(scene.objects) <= 4
        short = min(scene.width, scene.height)
        for obj in scene.objects:
            x, y, w, h = obj.box
            assert 0 <= x and 0 <= y and x + w <= scene.width and y + h <= scene.height
            assert max(w, h) >= (0.09 if obj.tiny else 0.17) * short
            assert max(w, h) <= 0.46 * short
        for k, a in enumerate(scene.objects):
            for b in scene.objects[:k]:
                assert _intersection(a.box, b.box) <= 0.15 * min(a.box[2] * a.box[3], b.box[2] * b.box[3])
        regions = scene_regions(scene, scene_rng(5, 9, index))
        assert {b for _, b in regions} >= {o.box for o in scene.objects}


def test_voc_annotations_parse_like_real_voc(data):
    root, _, counts = data
    voc = root / "voc" / "VOCdevkit" / "VOC2007"
    n_objects = n_difficult = 0
    for xml_path in sorted((voc / "Annotations").glob("*.xml")):
        ann, objects = _voc_objects(xml_path)
        assert ann.tag == "annotation" and ann.findtext("folder") == "VOC2007"
        assert ann.findtext("filename") == f"{xml_path.stem}.jpg"
        assert ann.findtext("segmented") == "0" and ann.find("source/database") is not None
        width, height = int(ann.findtext("size/width")), int(ann.findtext("size/height"))
        assert ann.findtext("size/depth") == "3"
        with Image.open(voc / "JPEGImages" / f"{xml_path.stem}.jpg") as img:
            assert img.size == (width, height)
        assert objects
        for obj in ann.findall("object"):
            assert obj.findtext("name") in SYNTH_CLASSES
            assert obj.findtext("pose") == "Unspecified" and obj.findtext("truncated") == "0"
            box = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= box[0] < box[2] <= width and 1 <= box[1] < box[3] <= height
        n_objects += len(objects)
        n_difficult += sum(d for _, d in objects)
    assert (n_objects, n_difficult) == (counts["objects"], counts["difficult"])


@pytest.mark.skipif(not REAL_VOC_XML.is_dir(), reason=f"real VOC annotations not found at {REAL_VOC_XML}")
def test_voc_xml_has_the_real_fields(data):
    root, _, _ = data
    real, _ = _voc_objects(sorted(REAL_VOC_XML.glob("*.xml"))[0])
    ours, _ = _voc_objects(root / "voc" / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml")

    def shape(element):
        return [(c.tag, shape(c)) for c in element if c.tag not in ("owner", "part", "actions", "point")]

    assert {t for t, _ in shape(ours)} == {t for t, _ in shape(real)}
    assert dict(shape(ours))["size"] == dict(shape(real))["size"]
    assert dict(shape(ours))["object"] == dict(shape(real))["object"]


def test_voc_image_sets_agree_with_annotations(data):
    root, _, counts = data
    voc = root / "voc" / "VOCdevkit" / "VOC2007"
    main = voc / "ImageSets" / "Main"
    ann_ids = sorted(p.stem for p in (voc / "Annotations").glob("*.xml"))
    assert ann_ids == sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    assert ann_ids[0] == "000001" and len(ann_ids) == 30
    splits = {s: (main / f"{s}.txt").read_bytes().decode().splitlines() for s in ("trainval", "test")}
    assert not set(splits["trainval"]) & set(splits["test"])
    assert sorted(splits["trainval"] + splits["test"]) == ann_ids
    assert (len(splits["trainval"]), len(splits["test"])) == (counts["trainval"], counts["test"]) == (15, 15)
    expected = {}
    for image_id in ann_ids:
        _, objects = _voc_objects(voc / "Annotations" / f"{image_id}.xml")
        for cls in SYNTH_CLASSES:
            flags = [d for name, d in objects if name == cls]
            expected[image_id, cls] = -1 if not flags else (1 if 0 in flags else 0)
    for split, ids in splits.items():
        for cls in SYNTH_CLASSES:
            raw = (main / f"{cls}_{split}.txt").read_bytes()
            assert b"\r" not in raw
            lines = raw.decode().splitlines()
            assert [line.split()[0] for line in lines] == ids
            for line in lines:
                assert CLASS_LINE.match(line), line
                assert int(line.split()[1]) == expected[line.split()[0], cls]


@pytest.mark.skipif(not REAL_VOC_SETS.is_dir(), reason=f"real VOC2007 ImageSets not found at {REAL_VOC_SETS}")
def test_voc_class_lines_look_like_real_voc2007():
    lines = (REAL_VOC_SETS / "aeroplane_trainval.txt").read_bytes().decode().splitlines()
    assert all(CLASS_LINE.match(line) for line in lines)
    assert {line[-2:] for line in lines} == {" 1", "-1", " 0"}


def test_deterministic_and_streams_differ(tmp_path):
    a = write_synthetic_vg(tmp_path / "a", 4, seed=7, **SIZES)
    b = write_synthetic_vg(tmp_path / "b", 4, seed=7, **SIZES)
    write_synthetic_vg(tmp_path / "c", 4, seed=8, **SIZES)
    write_synthetic_voc(tmp_path / "v", 4, seed=7, **SIZES)
    assert a == b

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    for k in range(1, 5):
        vg_path = next((tmp_path / "a").rglob(f"{k}.jpg"))
        vg_img = np.asarray(Image.open(vg_path))
        voc_img = np.asarray(Image.open(tmp_path / "v" / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{k:06d}.jpg"))
        assert vg_img.shape != voc_img.shape or not np.array_equal(vg_img, voc_img)


def test_existing_output_refused_and_failures_leave_nothing(tmp_path, monkeypatch):
    write_synthetic_vg(tmp_path / "vg", 2, seed=0, **SIZES)
    with pytest.raises(VgclipError, match="already exists"):
        write_synthetic_vg(tmp_path / "vg", 2, seed=0, **SIZES)
    write_synthetic_vg(tmp_path / "vg", 3, seed=1, overwrite=True, **SIZES)
    assert len(json.loads((tmp_path / "vg" / "image_data.json").read_text())) == 3
    for bad in ({"n_images": 0}, {"n_images": 2, "seed": -1}, {"n_images": 2, "min_side": 32}):
        with pytest.raises(VgclipError):
            write_synthetic_voc(tmp_path / "bad", **{"seed": 0, **bad})

    calls = []

    def failing(rng, min_side, max_side):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("disk on fire")
        return render_scene(rng, min_side, max_side)

    monkeypatch.setattr(synthetic, "render_scene", failing)
    with pytest.raises(RuntimeError):
        write_synthetic_voc(tmp_path / "voc", 5, seed=0, **SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vg"], "no partial or staging folders left"


def test_cli_writes_both_folders(tmp_path, monkeypatch, capsys):
    # Only register `synth`, so this test does not depend on the other commands' modules.
    monkeypatch.setattr(cli, "COMMANDS", ("synth",))
    argv = ["synth", "--out", str(tmp_path), "--train-images", "6", "--voc-images", "4",
            "--seed", "2", "--image-size", "128"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "vg") in out and "6 images" in out and "4 images" in out
    images = json.loads((tmp_path / "vg" / "image_data.json").read_text())
    assert len(images) == 6 and all(64 <= min(e["width"], e["height"]) and e["width"] <= 128 for e in images)
    assert len(list((tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "Annotations").glob("*.xml"))) == 4
    assert cli.main(argv) == 2, "existing output without --overwrite is a user error"
    assert cli.main([*argv, "--overwrite"]) == 0
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--train-images", "0"]) == 2
    assert cli.main(["synth", "--out", str(tmp_path / "y"), "--image-size", "32"]) == 2
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
