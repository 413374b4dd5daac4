"""Pascal VOC reader: layouts, labels (checked against an independent parse), difficult handling, bad input."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests._paths import SHARED_DATA
from vgclip.data.voc import (
    STANDARD_CLASSES,
    ImageListDataset,
    collate_images,
    find_voc_root,
    load_voc,
    parse_annotation,
    resolve_classes,
)
from vgclip.errors import VgclipError

SHARED = SHARED_DATA
VOC2012_SAMPLE = SHARED / "voc2012-sample"
VOC2007_SETS = SHARED / "voc2007-imagesets"
needs_sample = pytest.mark.skipif(not VOC2012_SAMPLE.is_dir(), reason=f"real VOC2012 sample absent ({VOC2012_SAMPLE})")
needs_sets = pytest.mark.skipif(not VOC2007_SETS.is_dir(), reason=f"real VOC2007 ImageSets absent ({VOC2007_SETS})")


def _torchvision_labels(xml: Path, difficult_positive: bool) -> tuple[set[str], set[str]]:
    """(positive classes, ignored classes) of one image via torchvision's own VOC XML parser."""
    from torchvision.datasets import VOCDetection

    ann = VOCDetection.parse_voc_xml(ET.parse(xml).getroot())["annotation"]
    objs = ann["object"] if isinstance(ann["object"], list) else [ann["object"]]
    easy = {o["name"] for o in objs if o.get("difficult", "0") == "0"}
    hard = {o["name"] for o in objs if o.get("difficult", "0") != "0"}
    if difficult_positive:
        return easy | hard, set()
    return easy, hard - easy


@needs_sample
@pytest.mark.parametrize("mode", ["ignore", "positive"])
def test_sample_labels_match_torchvision_parse(mode: str) -> None:
    data = load_voc(VOC2012_SAMPLE, "test", difficult=mode)
    assert data.split is None and "no ImageSets" in data.notices[0]
    assert data.classes == STANDARD_CLASSES and len(data.image_ids) == 100 and not data.skipped
    for i, image_id in enumerate(data.image_ids):
        pos, ign = _torchvision_labels(data.root / "Annotations" / f"{image_id}.xml", mode == "positive")
        assert {c for k, c in enumerate(data.classes) if data.labels[i, k]} == pos, image_id
        assert {c for k, c in enumerate(data.classes) if data.ignore[i, k]} == ign, image_id
        assert data.image_paths[i].name == f"{image_id}.jpg"
    if mode == "ignore":
        assert data.ignore.sum() > 0  # the sample has difficult-only classes: the two modes must differ


@needs_sample
def test_root_may_be_parent_devkit_or_year_folder() -> None:
    year = VOC2012_SAMPLE / "VOCdevkit" / "VOC2012"
    assert find_voc_root(VOC2012_SAMPLE) == year
    assert find_voc_root(VOC2012_SAMPLE / "VOCdevkit") == year
    assert find_voc_root(year) == year


@needs_sets
def test_voc2007_class_lists_crlf() -> None:
    data = load_voc(VOC2007_SETS, "test", require_images=False)
    assert data.label_source == "imagesets" and len(data.image_ids) == 4952
    assert all("\r" not in i for i in data.image_ids)
    person = data.classes.index("person")
    lines = (data.root / "ImageSets/Main/person_test.txt").read_bytes().decode().split("\r\n")
    flags = dict(line.split() for line in lines if line.strip())
    for i, image_id in enumerate(data.image_ids[:500]):
        assert data.labels[i, person] == (flags[image_id] == "1")
        assert data.ignore[i, person] == (flags[image_id] == "0")
    with pytest.raises(VgclipError, match="none of the 4952 images"):
        load_voc(VOC2007_SETS, "test")  # no JPEGImages here: nothing is silently evaluated


@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vgclip.synthetic.writers import write_synthetic_voc

    out = tmp_path_factory.mktemp("voc") / "voc"
    write_synthetic_voc(out, 16, seed=3, min_side=64, max_side=96)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return find_voc_root(dst)


def test_synthetic_auto_classes_and_xml_agree_with_class_lists(synth_voc: Path, tmp_path: Path) -> None:
    from vgclip.synthetic.writers import SYNTH_CLASSES

    xml = load_voc(synth_voc, "test")
    assert xml.classes == tuple(sorted(SYNTH_CLASSES)) and xml.label_source == "annotations"
    root = _copy(synth_voc, tmp_path / "lists")
    shutil.rmtree(root / "Annotations")
    lists = load_voc(tmp_path / "lists", "test", classes=",".join(xml.classes))
    assert lists.label_source == "imagesets" and lists.image_ids == xml.image_ids
    np.testing.assert_array_equal(lists.labels, xml.labels)
    np.testing.assert_array_equal(lists.ignore, xml.ignore)
    assert lists.class_images == xml.class_images and sum(xml.class_images.values()) > 0


def test_multi_word_class_from_imagesets_lists(synth_voc: Path, tmp_path: Path) -> None:
    """Per-class lists named "<class>_<split>.txt" work for a name with a space; a path separator is refused."""
    xml = load_voc(synth_voc, "test")
    root = _copy(synth_voc, tmp_path / "lists")
    shutil.rmtree(root / "Annotations")
    first = xml.classes[0]
    (root / "ImageSets/Main" / f"{first}_test.txt").rename(root / "ImageSets/Main" / f"big {first}_test.txt")
    names = (f"big {first}", *xml.classes[1:])
    lists = load_voc(tmp_path / "lists", "test", classes=list(names))
    assert lists.classes == names
    np.testing.assert_array_equal(lists.labels, xml.labels)
    with pytest.raises(VgclipError, match="path separator"):
        load_voc(tmp_path / "lists", "test", classes=["../../x", *xml.classes[1:]])


def test_crlf_split_file_and_unknown_split(synth_voc: Path, tmp_path: Path) -> None:
    root = _copy(synth_voc, tmp_path / "crlf")
    split = root / "ImageSets/Main/test.txt"
    split.write_bytes(split.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    assert load_voc(root, "test").image_ids == load_voc(synth_voc, "test").image_ids
    with pytest.raises(VgclipError, match="val.txt not found"):
        load_voc(root, "val")


def _first_test_id(root: Path) -> str:
    return (root / "ImageSets/Main/test.txt").read_text().split()[0]


def test_bad_annotations_are_counted_skips(synth_voc: Path, tmp_path: Path) -> None:
    root = _copy(synth_voc, tmp_path / "bad")
    ids = (root / "ImageSets/Main/test.txt").read_text().split()
    (root / "Annotations" / f"{ids[0]}.xml").write_text("<annotation><object><name>circle</name>")
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            "<annotation><object><name>&lol2;</name></object></annotation>")  # fmt: skip
    (root / "Annotations" / f"{ids[1]}.xml").write_text(bomb)
    (root / "JPEGImages" / f"{ids[2]}.jpg").unlink()
    data = load_voc(root, "test")
    reasons = {s["image_id"]: s["reason"] for s in data.skipped}
    assert "malformed XML" in reasons[ids[0]]
    assert "unsafe XML" in reasons[ids[1]]
    assert "image file missing" in reasons[ids[2]]
    assert len(data.image_ids) == len(ids) - 3 and not set(reasons) & set(data.image_ids)


def test_unknown_class_skipped_with_warning_or_strict_error(synth_voc: Path, tmp_path: Path) -> None:
    root = _copy(synth_voc, tmp_path / "unknown")
    image_id = _first_test_id(root)
    xml = root / "Annotations" / f"{image_id}.xml"
    head, _, tail = xml.read_text().rpartition("</annotation>")  # the last one: <source> holds an <annotation> too
    xml.write_text(head + "<object><name>unicorn</name></object></annotation>" + tail)
    known = load_voc(synth_voc, "test").classes
    data = load_voc(root, "test", classes=list(known))
    assert data.unknown_classes == {"unicorn": 1} and any("unicorn" in n for n in data.notices)
    assert len(data.image_ids) == len(load_voc(synth_voc, "test").image_ids)
    with pytest.raises(VgclipError, match="unicorn"):
        load_voc(root, "test", classes=list(known), strict_classes=True)
    assert "unicorn" in load_voc(root, "test").classes  # auto: discovered names when not all standard


def test_parse_annotation_difficult_flags(tmp_path: Path) -> None:
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><filename>../../etc/x.jpg</filename><object><name>cat</name><difficult>1</difficult>"
                   "</object><object><name> dog </name></object></annotation>")  # fmt: skip
    ann = parse_annotation(xml)
    assert ann.objects == [("cat", True), ("dog", False)] and ann.filename == "x.jpg"


def test_resolve_classes(tmp_path: Path) -> None:
    assert resolve_classes("auto", {"cat", "dog"}) == STANDARD_CLASSES
    assert resolve_classes("auto", {"square", "circle"}) == ("circle", "square")
    assert resolve_classes("b, a") == ("b", "a")
    f = tmp_path / "classes.txt"
    f.write_text("zebra\r\nyak\r\n\r\n")
    assert resolve_classes(str(f)) == ("zebra", "yak")
    with pytest.raises(VgclipError, match="repeated name.*'a'"):
        resolve_classes("a,a")
    assert resolve_classes("traffic light, stop sign") == ("traffic light", "stop sign")
    f.write_bytes("\ufeff# COCO names\n traffic light \n\nstop sign\n".encode())
    assert resolve_classes(str(f)) == ("traffic light", "stop sign")  # whole lines, BOM and comment dropped
    f.write_text("traffic light\nstop sign\ntraffic light\n")
    with pytest.raises(VgclipError, match=r"classes\.txt: repeated name\(s\): 'traffic light'"):
        resolve_classes(str(f))
    with pytest.raises(VgclipError, match="missing.txt not found"):
        resolve_classes(str(tmp_path / "missing.txt"))  # never a one-class list called "missing.txt"


def test_image_dataset_reports_unreadable_file(tmp_path: Path) -> None:
    from PIL import Image

    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (8, 8), "red").save(good)
    bad.write_bytes(b"not an image at all")
    import torchvision.transforms as T

    batch = collate_images([ImageListDataset([good, bad], T.ToTensor())[i] for i in range(2)])
    assert batch["index"].tolist() == [0] and batch["images"].shape == (1, 3, 8, 8)
    assert batch["failed"][0][0] == 1 and "bad.jpg" in batch["failed"][0][1]
