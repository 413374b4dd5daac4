"""Pascal VOC reader (VOC2007 / VOC2012 layouts) giving image-level multi-hot labels.

Annotations are parsed with defusedxml (entity-expansion bombs raise instead of eating memory).
Bad files never change the evaluated set silently: each one is a counted skip with a reason.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET
from PIL import Image

from vgclip.data.decoding import decode_image
from vgclip.data.transforms import PixelTransform, stack_images
from vgclip.errors import VgclipError
from vgclip.names import check_unique, looks_like_list_file, read_name_file, split_comma_list

log = logging.getLogger(__name__)

STANDARD_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
DIFFICULT_MODES = ("ignore", "positive")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class VocSplit:
    """One evaluated set: ids, image paths and labels (rows = images, columns = classes).

    `labels[i, c]` is 1 for a positive; `ignore[i, c]` marks entries left out of class c's
    metrics (official VOC: the class is present in image i only as "difficult").
    """

    root: Path
    split: str | None
    classes: tuple[str, ...]
    image_ids: list[str]
    image_paths: list[Path]
    labels: np.ndarray
    ignore: np.ndarray
    difficult: str
    label_source: str  # "annotations" or "imagesets"
    skipped: list[dict[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    unknown_classes: dict[str, int] = field(default_factory=dict)
    # Per class: listed images whose labels name it at all (positive or difficult), counted before images
    # with missing files are dropped; 0 means no annotation uses the name (a typo, or a name cut short).
    class_images: dict[str, int] = field(default_factory=dict)

    def subset(self, keep: Sequence[int]) -> VocSplit:
        """The same split restricted to rows `keep` (skip bookkeeping is shared)."""
        idx = np.asarray(keep, dtype=np.int64)
        return VocSplit(
            self.root, self.split, self.classes, [self.image_ids[i] for i in idx], [self.image_paths[i] for i in idx],
            self.labels[idx], self.ignore[idx], self.difficult, self.label_source,
            list(self.skipped), list(self.notices), dict(self.unknown_classes), dict(self.class_images),
        )  # fmt: skip


def find_voc_root(path: str | Path) -> Path:
    """The VOC20xx folder, given it, the VOCdevkit folder, or the folder holding VOCdevkit."""
    path = Path(path)
    if not path.is_dir():
        raise VgclipError(f"VOC root {path} is not a folder")
    if any((path / sub).is_dir() for sub in ("Annotations", "ImageSets", "JPEGImages")):
        return path
    for devkit in (path, path / "VOCdevkit"):
        years = sorted(p for p in devkit.glob("VOC*") if p.is_dir() and p.name != "VOCdevkit")
        if len(years) == 1:
            return years[0]
        if len(years) > 1:
            names = ", ".join(p.name for p in years)
            raise VgclipError(f"{devkit} holds several VOC sets ({names}); pass one of them as --voc-root")
    raise VgclipError(f"{path} is not a VOC folder (no Annotations/, ImageSets/ or JPEGImages/, no VOCdevkit/VOC20xx)")


def read_id_list(path: Path) -> list[list[str]]:
    """Rows of whitespace-separated fields from an ImageSets list (CRLF and blank lines tolerated).

    Only for ImageSets rows (`id` or `id  1`); lists of names are read by `vgclip.names.read_name_file`.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise VgclipError(f"{path}: cannot read image list ({exc})") from None
    return [line.split() for line in text.splitlines() if line.strip()]


class Annotation(NamedTuple):
    """One VOC XML file: the image file name it names and (class name, difficult) per object."""

    filename: str | None
    objects: list[tuple[str, bool]]


def parse_annotation(path: Path) -> Annotation:
    """Parse a VOC XML file; VgclipError if it is malformed or unsafe (entity expansion, external entities)."""
    try:
        tree = SafeET.parse(str(path), forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise VgclipError(f"{path}: unsafe XML refused ({type(exc).__name__})") from None
    except ET.ParseError as exc:
        raise VgclipError(f"{path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise VgclipError(f"{path}: cannot read ({exc})") from None
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise VgclipError(f"{path}: an <object> has no <name>")
        flag = (obj.findtext("difficult") or "0").strip()
        objects.append((name, flag not in ("0", "", "false", "False")))
    filename = (tree.getroot().findtext("filename") or "").strip()
    # Only the base name: an annotation must never point the reader outside JPEGImages/.
    return Annotation(Path(filename).name or None, objects)


def resolve_classes(spec: str | Sequence[str] | None, discovered: set[str] | None = None) -> tuple[str, ...]:
    """The class list: "auto", "voc" (the standard 20), "a,b,c", a file with one name per line, or a list.

    A file is read by `vgclip.names.read_name_file` (whole lines, so multi-word names stay whole).

    "auto" keeps the standard 20 (in their usual order) when every discovered name is one of them,
    otherwise the sorted discovered names (e.g. the synthetic set's circle/square/triangle).
    """
    if spec is None or spec == "auto":
        if not discovered or discovered <= set(STANDARD_CLASSES):
            return STANDARD_CLASSES
        return tuple(sorted(discovered))
    if spec == "voc":
        return STANDARD_CLASSES
    if isinstance(spec, str) and looks_like_list_file(spec):
        if not Path(spec).is_file():
            raise VgclipError(f"class list file {spec} not found")
        return tuple(read_name_file(spec, "class list"))  # whole lines: "traffic light" stays one name
    if isinstance(spec, str):
        names = split_comma_list(spec, f"class list {spec!r}")
    else:
        names = check_unique([str(n).strip() for n in spec], "class list")
    if not names:
        raise VgclipError(f"class list {spec!r} is empty")
    return tuple(names)


def _split_ids(root: Path, split: str | None, notices: list[str]) -> tuple[list[str], str | None]:
    """Image ids of `split` from ImageSets/Main, or every annotated image when there are no ImageSets."""
    main = root / "ImageSets" / "Main"
    if not main.is_dir():
        ann = root / "Annotations"
        if not ann.is_dir():
            raise VgclipError(f"{root}: neither ImageSets/Main nor Annotations/ found")
        notices.append(f"{root} has no ImageSets/Main: evaluating every annotated image (split '{split}' ignored)")
        return sorted(p.stem for p in ann.glob("*.xml")), None
    split_file = main / f"{split}.txt"
    if not split_file.is_file():
        known = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)
        raise VgclipError(f"{split_file} not found (splits here: {', '.join(known) or 'none'})")
    return [row[0] for row in read_id_list(split_file)], split


def _image_path(root: Path, image_id: str, filename: str | None) -> Path | None:
    folder = root / "JPEGImages"
    candidates = [folder / filename] if filename else []
    candidates += [folder / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
    return next((p for p in candidates if p.is_file()), None)


def load_voc(
    voc_root: str | Path,
    split: str | None = "test",
    classes: str | Sequence[str] | None = "auto",
    difficult: str = "ignore",
    strict_classes: bool = False,
    require_images: bool = True,
) -> VocSplit:
    """Read a VOC split into image-level labels.

    Labels come from Annotations/*.xml when that folder exists, else from ImageSets/Main/<class>_<split>.txt
    (1 positive, 0 difficult-only, -1 negative). Bad annotations and missing images are counted skips.
    """
    if difficult not in DIFFICULT_MODES:
        raise VgclipError(f"eval.difficult must be one of {', '.join(DIFFICULT_MODES)}, got {difficult!r}")
    root = find_voc_root(voc_root)
    notices: list[str] = []
    ids, used_split = _split_ids(root, split, notices)
    if not ids:
        raise VgclipError(f"{root}: split '{split}' lists no images")
    if (root / "Annotations").is_dir():
        parsed, skipped = _parse_all(root, ids)
        discovered = {name for ann in parsed.values() for name, _ in ann.objects} | _listed_classes(root, used_split)
        names = resolve_classes(classes, discovered)
        kept, labels, ignore, unknown = _labels_from_objects(parsed, names, difficult, strict_classes, root)
        source = "annotations"
    else:
        if used_split is None:
            raise VgclipError(f"{root}: no Annotations/ and no ImageSets/Main to read labels from")
        names = resolve_classes(classes, None)
        kept, labels, ignore = _labels_from_lists(root, used_split, ids, names, difficult)
        skipped, unknown, source, parsed = [], {}, "imagesets", {}
    if unknown:
        notices.append(
            "objects of classes outside the class list were skipped: "
            + ", ".join(f"{n} ({k})" for n, k in sorted(unknown.items()))
        )
        log.warning(notices[-1])
    used = ((labels != 0) | ignore).sum(axis=0)
    result = VocSplit(root, used_split, names, [], [], labels, ignore, difficult, source, skipped, notices, unknown,
                      {name: int(k) for name, k in zip(names, used)})  # fmt: skip
    keep_rows: list[int] = []
    for row, image_id in enumerate(kept):
        path = _image_path(root, image_id, parsed[image_id].filename if image_id in parsed else None)
        if path is None and require_images:
            skipped.append({"image_id": image_id, "reason": f"image file missing in {root / 'JPEGImages'}"})
            continue
        keep_rows.append(row)
        result.image_ids.append(image_id)
        result.image_paths.append(path if path is not None else root / "JPEGImages" / f"{image_id}.jpg")
    result.labels, result.ignore = labels[keep_rows], ignore[keep_rows]
    if skipped:
        first = "; ".join(f"{s['image_id']}: {s['reason']}" for s in skipped[:3])
        log.warning("%s: skipped %d of %d listed images (%s%s)", root, len(skipped), len(ids), first,
                    ", ..." if len(skipped) > 3 else "")  # fmt: skip
    if not result.image_ids:
        raise VgclipError(f"{root}: none of the {len(ids)} images of split '{split}' is usable ({skipped[0]['reason']})")
    return result


def _listed_classes(root: Path, split: str | None) -> set[str]:
    """Class names that have an ImageSets/Main/<class>_<split>.txt list (a class may be absent from a small split)."""
    if split is None:
        return set()
    suffix = f"_{split}.txt"
    return {p.name[: -len(suffix)] for p in (root / "ImageSets" / "Main").glob(f"*{suffix}")}


def _parse_all(root: Path, ids: list[str]) -> tuple[dict[str, Annotation], list[dict[str, str]]]:
    parsed: dict[str, Annotation] = {}
    skipped: list[dict[str, str]] = []
    for image_id in ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            skipped.append({"image_id": image_id, "reason": f"annotation {xml} missing"})
            continue
        try:
            parsed[image_id] = parse_annotation(xml)
        except VgclipError as exc:
            skipped.append({"image_id": image_id, "reason": str(exc)})
    return parsed, skipped


def _labels_from_objects(
    parsed: dict[str, Annotation], names: tuple[str, ...], difficult: str, strict: bool, root: Path
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, int]]:
    index = {name: c for c, name in enumerate(names)}
    ids = list(parsed)
    labels = np.zeros((len(ids), len(names)), dtype=np.int8)
    ignore = np.zeros((len(ids), len(names)), dtype=bool)
    unknown: Counter[str] = Counter()
    for row, image_id in enumerate(ids):
        hard = set()
        for name, is_difficult in parsed[image_id].objects:
            if name not in index:
                if strict:
                    raise VgclipError(f"{root / 'Annotations' / image_id}.xml: class '{name}' is not in the class list")
                unknown[name] += 1
            elif is_difficult and difficult == "ignore":
                hard.add(index[name])
            else:
                labels[row, index[name]] = 1
        for c in hard:
            ignore[row, c] = labels[row, c] == 0  # present only as difficult: leave out of class c's metrics
    return ids, labels, ignore, dict(unknown)


def _labels_from_lists(
    root: Path, split: str, ids: list[str], names: tuple[str, ...], difficult: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(names)), dtype=np.int8)
    ignore = np.zeros((len(ids), len(names)), dtype=bool)
    for c, name in enumerate(names):
        if "/" in name or "\\" in name:  # the name becomes part of a path: never leave ImageSets/Main
            raise VgclipError(f"class '{name}': a name with a path separator cannot name an ImageSets/Main list")
        path = root / "ImageSets" / "Main" / f"{name}_{split}.txt"
        if not path.is_file():
            raise VgclipError(f"{path} not found: no Annotations/ and no per-class list for '{name}'")
        for fields in read_id_list(path):
            if len(fields) != 2 or fields[1] not in ("1", "0", "-1") or fields[0] not in row_of:
                raise VgclipError(f"{path}: bad line {' '.join(fields)!r} (expected '<id listed in {split}> 1|0|-1')")
            r = row_of[fields[0]]
            if fields[1] == "1" or (fields[1] == "0" and difficult == "positive"):
                labels[r, c] = 1
            elif fields[1] == "0":
                ignore[r, c] = True
    return ids, labels, ignore


class ImageListDataset(torch.utils.data.Dataset):
    """Images by path, transformed; a bad file yields (index, None, reason) instead of killing the worker.

    Images are opened as the training loader opens shard images (`vgclip.data.decoding`: allowed
    formats only, pixel limit checked before decoding). A `PixelTransform` (vgclip's) gets them
    decoded as cheaply as it allows (JPEG DCT scaling when the image is much larger than the model
    input); any other callable (e.g. a torchvision pipeline) gets a full-size RGB PIL image.
    """

    def __init__(self, paths: Sequence[Path], transform: PixelTransform | Callable[[Image.Image], torch.Tensor],
                 fast_decode: bool = True) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = Path(self.paths[index])
        ours = isinstance(self.transform, PixelTransform)
        try:
            data = path.read_bytes()
            if not data:
                raise VgclipError(f"{path}: empty file")
            pixels = decode_image(str(path), data, draft_size=self.transform.draft_size if ours else None,
                                  tensor_ok=ours, fast=self.fast_decode)
            return index, self.transform(pixels), ""
        except VgclipError as exc:
            return index, None, str(exc)
        except OSError as exc:
            return index, None, f"{path}: cannot read ({exc.strerror or exc})"


def collate_images(items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    """Stack the good images of a batch; report the bad ones as (index, reason)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    return {
        "index": torch.tensor([i for i, _ in good], dtype=torch.long),
        "images": stack_images([x for _, x in good]) if good else None,
        "failed": [(i, reason) for i, x, reason in items if x is None],
    }
