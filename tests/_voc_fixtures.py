"""Real VOC photos in the layouts the tests need (the samples under ../shared/data keep VOC2012 ids)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["write_renumbered_voc"]


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
