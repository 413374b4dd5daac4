"""Shared by the tagging tests: a tiny run, folders of real photos with bad files beside them, reading outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests._paths import SHARED_DATA

PHOTOS = SHARED_DATA / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
LABELS = "cat,dog,traffic light,person"
COMPARED = ("predictions.parquet", "skipped.csv")  # besides every file under embeddings/


def real_photos(count: int) -> list[Path]:
    """The first `count` real VOC photos (the test is skipped when the shared data is absent)."""
    photos = sorted(PHOTOS.glob("*.jpg"))[:count] if PHOTOS.is_dir() else []
    if len(photos) < count:
        pytest.skip(f"real photos not found: {PHOTOS} (the shared data samples)")
    return photos


def photo_folder(root: Path, count: int = 8, sub: int = 3) -> Path:
    """`root` with `count` real photos, `sub` more of them in sub/deeper/, and nothing else."""
    photos = real_photos(count + sub)
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos):
        target = root / photo.name if i < count else root / "sub" / "deeper" / photo.name.replace(".jpg", ".JPG")
        shutil.copyfile(photo, target)
    return root


def add_bad_files(root: Path) -> dict[str, str]:
    """A non-image, a truncated JPEG and a zero-byte file in `root`; their keys -> the reason each must get."""
    (root / "notes.jpg").write_text("this is text, not a JPEG")
    whole = sorted(root.glob("*.jpg"))[0].read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "readme.txt").write_text("not an image extension: not listed")
    return {str(root / "notes.jpg"): "not_an_image", str(root / "cut.jpg"): "truncated",
            str(root / "empty.png"): "empty_file"}


def predictions(out: Path) -> dict:
    """OUT/predictions.parquet as a dict of columns."""
    return pq.read_table(out / "predictions.parquet").to_pydict()


def embeddings(out: Path) -> tuple[np.ndarray, list[str]]:
    """Every stored embedding (part order) and the keys of their metadata rows."""
    files = sorted((out / "embeddings" / "img_emb").glob("*.npy"))
    metadata = sorted((out / "embeddings" / "metadata").glob("*.parquet"))
    keys = [k for f in metadata for k in pq.read_table(f)["key"].to_pylist()]
    return np.concatenate([np.load(f) for f in files]), keys


def output_files(out: Path) -> dict[str, bytes]:
    """The bytes of every output that must not depend on how the run went (not summary.json's timings)."""
    files = {name: (out / name).read_bytes() for name in COMPARED}
    for path in sorted((out / "embeddings").rglob("*")):
        if path.is_file():
            files[str(path.relative_to(out))] = path.read_bytes()
    return files
