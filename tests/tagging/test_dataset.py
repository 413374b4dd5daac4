"""The decoding dataset of `vgclip predict` (issue 27.2-3): batches never span units, every bad input a skip
with its reason (over the pixel limit, missing; a GIF's first frame decodes), original sizes kept."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
from PIL import Image

from vgclip.data.transforms import ImageTransform
from vgclip.data.views import eval_transform
from vgclip.tagging.dataset import TaggingDataset, make_loader
from vgclip.tagging.inputs import list_inputs

TRANSFORM = ImageTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (no pixel data): refused from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_batches_skips_and_sizes(tmp_path: Path) -> None:
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (50 * i, 0, 0)).save(tmp_path / f"ok{i}.png")
    frames = [Image.new("RGB", (24, 20), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    (tmp_path / "empty.jpg").mkdir()  # a folder named like an image: searched, holds none
    inputs = list_inputs([str(tmp_path), str(tmp_path / "empty.jpg"), str(tmp_path / "gone.webp")], part_size=4)
    dataset = TaggingDataset(inputs.units, eval_transform(TRANSFORM, "multi"), batch_size=2)
    batches = list(make_loader(dataset, workers=2))
    assert sorted({b.unit for b in batches}) == [0, 1] and sum(b.last for b in batches) == 2
    by_unit = {u: [b for b in batches if b.unit == u] for u in range(2)}
    assert all(group[-1].last and not any(b.last for b in group[:-1]) for group in by_unit.values())
    keys = [k for u in range(2) for b in by_unit[u] for k in b.keys]
    sizes = {k: (w, h) for b in batches for k, w, h in zip(b.keys, b.widths, b.heights)}
    assert keys == [str(tmp_path / n) for n in ("anim.gif", "ok0.png", "ok1.png", "ok2.png", "ok3.png", "ok4.png")]
    assert sizes[str(tmp_path / "ok4.png")] == (44, 30) and sizes[str(tmp_path / "anim.gif")] == (24, 20)
    assert all(b.images is None or (b.images.dtype == torch.uint8 and b.images.shape[1:] == (8, 3, 16, 16))
               for b in batches)  # multi-crop pixels, normalised in the main process
    skips = {s.key: s.reason for b in batches for s in b.skips}
    assert skips == {str(tmp_path / "bomb.png"): "too_many_pixels", str(tmp_path / "gone.webp"): "missing_file"}


def test_one_part_is_shared_by_the_workers_in_order(tmp_path: Path) -> None:
    for i in range(7):
        Image.new("RGB", (20 + i, 18), (30 * i, 0, 0)).save(tmp_path / f"img{i}.png")
    (tmp_path / "img3.png").write_bytes(b"not an image")
    inputs = list_inputs([str(tmp_path)], part_size=5000)  # one part: every worker decodes some of its batches
    dataset = TaggingDataset(inputs.units, TRANSFORM, batch_size=2)
    loader = make_loader(dataset, workers=2)
    assert loader.num_workers == 2 and dataset.work_items == 4
    batches = list(loader)
    assert [b.last for b in batches] == [False, False, False, True]  # cut by records: 2 per batch
    assert [k.rsplit("/", 1)[1] for b in batches for k in b.keys] == [f"img{i}.png" for i in (0, 1, 2, 4, 5, 6)]
    assert [len(b.keys) for b in batches] == [2, 1, 2, 1] and batches[1].skips[0].reason == "not_an_image"
