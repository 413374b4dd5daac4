"""Real VOC photos in the layouts the tests need (the samples under ../shared/data keep VOC2012 ids)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["VOC_LIKE", "write_renumbered_voc"]


def write_renumbered_voc(src: Path, dst: Path) -> Path:
    """Copy a VOC-layout folder's images and annotations to `dst`/VOCdevkit/VOC2007 as ids 000001, 000002, ...
    (sorted by the original id), with ImageSets/Main/test.txt listing them all.

    CLIP_benchmark's VOC2007 loader downloads VOC2007 unless JPEGImages/000001.jpg exists, so a copy of other
    VOC photos must be renumbered before `write_voc2007_copy` can make it readable offline.
    """
    from vgclip.data.voc import find_voc_root

    src_root = find_voc_root(src)
    voc = dst / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = sorted(path.stem for path in (src_root / "Annotations").glob("*.xml"))
    new_ids = [f"{n:06d}" for n in range(1, len(ids) + 1)]
    for old, new in zip(ids, new_ids):
        shutil.copyfile(src_root / "JPEGImages" / f"{old}.jpg", voc / "JPEGImages" / f"{new}.jpg")
        shutil.copyfile(src_root / "Annotations" / f"{old}.xml", voc / "Annotations" / f"{new}.xml")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in new_ids))
    return dst


# A thresholds.json as `vgclip zeroshot` writes it for VOC classes (per class, with recorded class texts).
VOC_LIKE = {
    "version": 1, "mode": "per_class", "objective": "f1", "score": "sigmoid", "templates": "single",
    "classes": ["aeroplane", "diningtable", "person", "tvmonitor"], "global": 0.1518,
    "per_class": {"aeroplane": 0.142, "diningtable": 0.2, "person": 0.3, "tvmonitor": 0.4},
    "class_texts": {"aeroplane": "airplane", "diningtable": "dining table", "person": "person",
                    "tvmonitor": "tv monitor"},
}  # fmt: skip
