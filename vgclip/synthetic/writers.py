"""Built-in synthetic data written in the real dataset layouts (used by `vgclip synth`).

`write_synthetic_vg` writes a Visual Genome v1.2 folder (image_data.json, region_descriptions.json and
JPEGs split between VG_100K/ and VG_100K_2/); `write_synthetic_voc` writes a Pascal VOC2007 folder
(Annotations/, JPEGImages/, ImageSets/Main/). Both draw scenes from `synthetic_draw` with separate seed
streams, so VOC test images never coincide with VG training images. Each folder is built in a hidden
temporary directory beside the target and renamed into place at the end, so a crash never leaves a
half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vgclip.synthetic.draw import SYNTH_CLASSES, SYNTH_COLOURS, Scene, render_scene
from vgclip.synthetic.text import scene_regions
from vgclip.errors import VgclipError
from vgclip.io import atomic_write_text

__all__ = ["SYNTH_CLASSES", "SYNTH_COLOURS", "scene_rng", "write_synthetic_vg", "write_synthetic_voc"]

VG_URL = "https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg"
VG_FOLDERS = ("VG_100K", "VG_100K_2")
_VG_STREAM, _VOC_STREAM, _SPLIT_STREAM = 0, 1, 2
_JPEG_QUALITY = 90


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator for one image: independent per (seed, dataset stream, image index)."""
    return np.random.default_rng([seed, stream, index])


def _check_args(n_images: int, seed: int, min_side: int, max_side: int) -> None:
    if seed < 0:
        raise VgclipError(f"synthetic data seed must be a non-negative integer, got {seed}")
    if n_images < 1:
        raise VgclipError(f"number of synthetic images must be at least 1, got {n_images}")
    if not 64 <= min_side <= max_side:
        raise VgclipError(f"synthetic image sides need 64 <= min_side <= max_side, got {min_side}..{max_side}")


@contextlib.contextmanager
def _staged_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise VgclipError(f"{target} already exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "data")
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _save_jpeg(scene: Scene, path: Path) -> None:
    # The whole folder is staged and renamed at the end, so plain writes here are still atomic overall.
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.image.save(path, format="JPEG", quality=_JPEG_QUALITY)


def write_synthetic_vg(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    *,
    min_side: int = 160,
    max_side: int = 320,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write `n_images` synthetic scenes as a Visual Genome v1.2 folder at `out_dir`; returns counts."""
    _check_args(n_images, seed, min_side, max_side)
    out_dir = Path(out_dir)
    image_data, descriptions = [], []
    counts = {"images": 0, "regions": 0, "objects": 0, VG_FOLDERS[0]: 0, VG_FOLDERS[1]: 0}
    region_id = 0
    with _staged_dir(out_dir, overwrite) as staging:
        for index in range(n_images):
            rng = scene_rng(seed, _VG_STREAM, index)
            image_id = index + 1
            folder = VG_FOLDERS[1] if rng.random() < 0.4 else VG_FOLDERS[0]  # real VG: ~60/40 split
            scene = render_scene(rng, min_side, max_side)
            _save_jpeg(scene, staging / folder / f"{image_id}.jpg")
            # Key order and types follow the real v1.2 files.
            image_data.append({
                "width": scene.width, "url": VG_URL.format(folder=folder, image_id=image_id),
                "height": scene.height, "image_id": image_id, "coco_id": None, "flickr_id": None,
            })
            regions = []
            for phrase, (x, y, w, h) in scene_regions(scene, rng):
                region_id += 1
                regions.append({"region_id": region_id, "width": w, "height": h, "image_id": image_id,
                                "phrase": phrase, "y": y, "x": x})
            descriptions.append({"regions": regions, "id": image_id})
            counts["images"] += 1
            counts["objects"] += len(scene.objects)
            counts["regions"] += len(regions)
            counts[folder] += 1
        atomic_write_text(staging / "image_data.json", json.dumps(image_data))
        atomic_write_text(staging / "region_descriptions.json", json.dumps(descriptions))
    return counts


def _sub(parent: ET.Element, tag: str, text: object | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def voc_annotation_xml(image_name: str, scene: Scene, difficult: list[bool]) -> str:
    """The VOC XML for one scene (1-based inclusive pixel boxes, like the real annotations)."""
    root = ET.Element("annotation")
    _sub(root, "folder", "VOC2007")
    _sub(root, "filename", image_name)
    source = _sub(root, "source")
    _sub(source, "database", "The VOC2007 Database")
    _sub(source, "annotation", "PASCAL VOC2007")
    _sub(source, "image", "vgclip synthetic")
    size = _sub(root, "size")
    _sub(size, "width", scene.width)
    _sub(size, "height", scene.height)
    _sub(size, "depth", 3)
    _sub(root, "segmented", 0)
    for obj, hard in zip(scene.objects, difficult):
        element = _sub(root, "object")
        _sub(element, "name", obj.cls)
        _sub(element, "pose", "Unspecified")
        _sub(element, "truncated", 0)  # shapes are always drawn fully inside the image
        _sub(element, "difficult", int(hard))
        box = _sub(element, "bndbox")
        x, y, w, h = obj.box
        for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            _sub(box, tag, value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _image_set_lines(ids: list[str], labels: dict[str, dict[str, int]], cls: str | None) -> str:
    """'000001' lines, or '000001  1' / '000001 -1' / '000001  0' per-class lines as in VOC2007."""
    if cls is None:
        return "".join(f"{i}\n" for i in ids)
    return "".join(f"{i} {labels[i].get(cls, -1):2d}\n" for i in ids)


def write_image_sets(main: Path, splits: dict[str, list[str]], labels: dict[str, dict[str, int]]) -> None:
    """ImageSets/Main/<split>.txt and <class>_<split>.txt for every split (labels: image id -> class -> 1/0/-1)."""
    for split, ids in splits.items():
        atomic_write_text(main / f"{split}.txt", _image_set_lines(ids, labels, None))
        for cls in SYNTH_CLASSES:
            atomic_write_text(main / f"{cls}_{split}.txt", _image_set_lines(ids, labels, cls))


def write_synthetic_voc(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    *,
    trainval_fraction: float = 0.5,
    min_side: int = 160,
    max_side: int = 320,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write `n_images` synthetic scenes as `out_dir`/VOCdevkit/VOC2007 (VOC2007 layout); returns counts.

    Per-class image labels follow VOC: 1 if a non-difficult object of the class is present, 0 if only
    difficult ones are, -1 otherwise. Tiny objects are marked difficult.
    """
    _check_args(n_images, seed, min_side, max_side)
    if not 0.0 <= trainval_fraction <= 1.0:
        raise VgclipError(f"trainval_fraction must be in [0, 1], got {trainval_fraction}")
    out_dir = Path(out_dir)
    ids = [f"{index + 1:06d}" for index in range(n_images)]
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n_images)
    trainval = set(order[: round(n_images * trainval_fraction)].tolist())
    splits = {"trainval": [i for k, i in enumerate(ids) if k in trainval],
              "test": [i for k, i in enumerate(ids) if k not in trainval]}
    labels: dict[str, dict[str, int]] = {}
    counts = {"images": 0, "objects": 0, "difficult": 0}
    with _staged_dir(out_dir, overwrite) as staging:
        voc = staging / "VOCdevkit" / "VOC2007"
        for index, image_id in enumerate(ids):
            scene = render_scene(scene_rng(seed, _VOC_STREAM, index), min_side, max_side)
            difficult = [obj.tiny for obj in scene.objects]
            _save_jpeg(scene, voc / "JPEGImages" / f"{image_id}.jpg")
            atomic_write_text(voc / "Annotations" / f"{image_id}.xml",
                              voc_annotation_xml(f"{image_id}.jpg", scene, difficult))
            labels[image_id] = {}
            for obj, hard in zip(scene.objects, difficult):
                labels[image_id][obj.cls] = max(labels[image_id].get(obj.cls, 0), 0 if hard else 1)
            counts["images"] += 1
            counts["objects"] += len(scene.objects)
            counts["difficult"] += sum(difficult)
        write_image_sets(voc / "ImageSets" / "Main", splits, labels)
    counts["trainval"], counts["test"] = len(splits["trainval"]), len(splits["test"])
    return counts
