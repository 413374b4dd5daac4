"""CLIP_benchmark's zero-shot VOC2007 protocol as `vgclip zeroshot` options, and a VOC2007 folder it reads offline.

CLIP_benchmark (`clip_benchmark eval --dataset voc2007_multilabel`) scores every image against its 20 fixed
VOC class names with its prompt templates, counts every annotated object as a positive ("difficult" ones
included), ranks by cosine similarity and averages the per-class AP over all 20 classes, a class without
positives counting 0. `vgclip zeroshot --classes classes.txt --class-names class_names.yaml
--templates templates.txt --difficult positive --score cosine eval.crops=centre` follows the same protocol
(CLIP_benchmark embeds one centre crop per image); `protocol_map` averages its per-class APs the same way.

Its VOC loader knows only the 20 VOC class names and downloads VOC2007 unless the folder already holds
`VOCdevkit/VOC2007/JPEGImages/000001.jpg` and `ImageSets/Main/aeroplane_test.txt`. `write_voc2007_copy`
writes such a folder from any VOC-layout folder, renaming its classes to VOC names (the synthetic shapes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vgclip.data.voc import find_voc_root, read_id_list
from vgclip.errors import VgclipError
from vgclip.io import atomic_write_text

DATASET = "voc2007_multilabel"
SPLITS = ("train", "test")  # the splits CLIP_benchmark's VOC2007 loader accepts


@dataclass(frozen=True)
class Protocol:
    """CLIP_benchmark's class names (label order) and prompt templates (vgclip's `{}` placeholder)."""

    classes: tuple[str, ...]
    templates: tuple[str, ...]


def clip_benchmark_protocol(dataset: str = DATASET) -> Protocol:
    """The class names and templates the installed CLIP_benchmark uses for `dataset` (VOC2007 only)."""
    if dataset not in ("voc2007", DATASET):
        raise VgclipError(f"only CLIP_benchmark's VOC2007 protocol is mirrored, not '{dataset}'")
    try:  # CLIP_benchmark is optional (a check against it, not a dependency)
        from clip_benchmark.datasets import voc2007
    except ImportError:
        raise VgclipError('CLIP_benchmark is not installed: pip install "vgclip[dev]" (or clip-benchmark)') from None
    text = resources.files("clip_benchmark.datasets").joinpath("en_zeroshot_classification_templates.json")
    templates = json.loads(text.read_text(encoding="utf-8"))[dataset]
    return Protocol(tuple(voc2007.object_categories), tuple(t.replace("{c}", "{}") for t in templates))


def write_protocol_files(out_dir: str | Path, prompt_names: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Files that make `vgclip zeroshot` (and CLIP_benchmark) use one protocol; returns their paths.

    classes.txt (CLIP_benchmark's class order), class_names.yaml (class -> text in prompts: the class name
    itself unless `prompt_names` says otherwise), templates.txt (one template per line) and
    clip_benchmark_classnames.json (the same prompt texts for `clip_benchmark eval --custom_classname_file`).
    """
    import yaml

    protocol = clip_benchmark_protocol()
    unknown = sorted(set(prompt_names or {}) - set(protocol.classes))
    if unknown:
        raise VgclipError(f"prompt names for classes CLIP_benchmark does not have: {', '.join(unknown)}")
    texts = [(prompt_names or {}).get(name, name) for name in protocol.classes]
    out_dir = Path(out_dir)
    paths = {key: out_dir / name for key, name in (
        ("classes", "classes.txt"), ("class_names", "class_names.yaml"), ("templates", "templates.txt"),
        ("clip_benchmark_classnames", "clip_benchmark_classnames.json"))}  # fmt: skip
    atomic_write_text(paths["classes"], "".join(f"{name}\n" for name in protocol.classes))
    atomic_write_text(paths["class_names"], yaml.safe_dump(dict(zip(protocol.classes, texts)), sort_keys=False))
    atomic_write_text(paths["templates"], "".join(f"{t}\n" for t in protocol.templates))
    atomic_write_text(paths["clip_benchmark_classnames"], json.dumps({DATASET: texts}, indent=1) + "\n")
    return paths


def protocol_map(report: Mapping[str, Any], classes: Sequence[str]) -> float:
    """mAP as CLIP_benchmark averages it: over all of `classes`, a class without positives counting 0.

    `report` is a `vgclip zeroshot` report.json (per-class AP is null where a class has no positive).
    """
    ap = report["AP"]
    missing = [name for name in classes if name not in ap]
    if missing:
        raise VgclipError(f"the report has no AP for {', '.join(missing[:5])}: evaluate with --classes classes.txt")
    return sum(ap[name] or 0.0 for name in classes) / len(classes)


def write_voc2007_copy(src: str | Path, dst: str | Path, class_map: Mapping[str, str],
                       splits: Sequence[str] = ("test",)) -> Path:  # fmt: skip
    """Copy a VOC-layout folder to `dst`/VOCdevkit/VOC2007 with classes renamed by `class_map`.

    Every object class must be mapped onto one of CLIP_benchmark's VOC names. ImageSets/Main gets `<split>.txt`
    and, for all 20 classes, `<class>_<split>.txt` (1 / 0 difficult only / -1), as VOC2007 has them.
    """
    protocol = clip_benchmark_protocol()
    bad = sorted(set(class_map.values()) - set(protocol.classes))
    if bad or len(set(class_map.values())) != len(class_map):
        raise VgclipError(f"class_map must map onto distinct VOC class names (not {', '.join(bad) or 'repeats'})")
    src_root, dst = find_voc_root(src), Path(dst)
    if not set(splits) <= set(SPLITS) or "test" not in splits:
        raise VgclipError(f"CLIP_benchmark reads VOC2007 splits {' and '.join(SPLITS)} and needs 'test', got {splits}")
    if not (src_root / "JPEGImages" / "000001.jpg").is_file():
        raise VgclipError(f"{src_root}: no JPEGImages/000001.jpg; CLIP_benchmark would download VOC2007 without it")
    if dst.exists() and any(dst.iterdir()):
        raise VgclipError(f"{dst} exists and is not empty")
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=_parent(dst)))
    try:
        voc = staging / "VOCdevkit" / "VOC2007"
        for split in splits:
            ids = [row[0] for row in read_id_list(src_root / "ImageSets" / "Main" / f"{split}.txt")]
            labels = {image_id: _copy_annotation(src_root, voc, image_id, class_map) for image_id in ids}
            _write_split_lists(voc / "ImageSets" / "Main", split, ids, labels, protocol.classes)
        shutil.copytree(src_root / "JPEGImages", voc / "JPEGImages")
        staging.chmod(0o755)
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def _copy_annotation(src_root: Path, voc: Path, image_id: str, class_map: Mapping[str, str]) -> dict[str, int]:
    """Write one XML with renamed classes; returns class -> 1 (present) or 0 (only difficult objects)."""
    from defusedxml import ElementTree as SafeET

    src = src_root / "Annotations" / f"{image_id}.xml"
    try:
        tree = SafeET.parse(str(src), forbid_entities=True, forbid_external=True)
    except Exception as exc:  # malformed, unsafe or missing: the copy would be incomplete
        raise VgclipError(f"{src}: cannot copy annotation ({type(exc).__name__}: {exc})") from None
    labels: dict[str, int] = {}
    for obj in tree.getroot().iter("object"):
        name_el = obj.find("name")
        name = (name_el.text or "").strip() if name_el is not None else ""
        if name not in class_map:
            raise VgclipError(f"{src}: class '{name}' has no VOC name in the class map")
        name_el.text = class_map[name]
        hard = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        labels[class_map[name]] = max(labels.get(class_map[name], 0), 0 if hard else 1)
    atomic_write_text(voc / "Annotations" / f"{image_id}.xml", ET.tostring(tree.getroot(), encoding="unicode"))
    return labels


def _write_split_lists(main: Path, split: str, ids: list[str], labels: Mapping[str, dict[str, int]],
                       classes: Sequence[str]) -> None:  # fmt: skip
    atomic_write_text(main / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    for name in classes:
        atomic_write_text(main / f"{name}_{split}.txt", "".join(f"{i} {labels[i].get(name, -1):2d}\n" for i in ids))
