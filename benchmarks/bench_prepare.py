"""Benchmark `vgclip prepare`: the streaming read + clean of a Visual-Genome-sized file, and the image side.

Text side: writes a synthetic region_descriptions.json (default 5.4M regions over 108k images, ~650 MB,
v1.2 keys, a few duplicates / bad boxes / control characters like the real file) to a temp folder and
streams it through `iter_clean_regions` (no images involved): regions/s and peak RSS for the C
(yajl2_c) ijson backend, and the pure-python backend's speed on a small slice of the same data.

Image side: a synthetic VG folder of 512 px JPEGs, prepared into shards (decode, re-encode, tar)
with 1 and with 2 worker processes in the same run: images/s of each, and what VG's 108,077
images would take on 16 cores at the 1-worker rate per core (linear scaling assumed, which the
2-worker figure lets you judge).

    python benchmarks/bench_prepare.py [--regions 5400000] [--images 108077] [--shard-images 300] [--keep DIR]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from vgclip.prepare import visual_genome
from vgclip.prepare.cleaning import CleaningSettings, Skips
from vgclip.prepare.visual_genome import iter_clean_regions, read_image_data

WORDS = ("man woman dog cat red blue green white black car tree sky cloud building window door street sign "
         "shirt hat wearing holding on the a of in near behind large small wooden metal glass table chair "
         "plate food grass water boat train bus light pole fence wall floor roof").split()


def write_vg(folder: Path, n_images: int, n_regions: int, seed: int = 0) -> None:
    """image_data.json + region_descriptions.json with `n_regions` spread over `n_images`."""
    rng = random.Random(seed)
    phrases = [" ".join(rng.choices(WORDS, k=rng.randint(2, 7))) for _ in range(20_000)]
    phrases += ["dup phrase", "Dup Phrase", "tab\there\x07", ""]  # duplicates, control chars, empty
    with open(folder / "image_data.json", "w") as fh:
        fh.write(",\n".join(
            f'{{"width": 800, "url": "https://x/VG_100K/{i}.jpg", "height": 600, "image_id": {i}}}'
            for i in range(1, n_images + 1)).join("[]"))
    per_image, extra = divmod(n_regions, n_images)
    region_id = 0
    with open(folder / "region_descriptions.json", "w", buffering=1 << 22) as fh:
        fh.write("[")
        for i in range(1, n_images + 1):
            parts = []
            for _ in range(per_image + (1 if i <= extra else 0)):
                region_id += 1
                x, y = rng.randrange(-20, 790), rng.randrange(-20, 590)
                w, h = rng.randrange(-2, 300), rng.randrange(-2, 300)
                parts.append(f'{{"region_id": {region_id}, "width": {w}, "height": {h}, "image_id": {i}, '
                             f'"phrase": {json.dumps(rng.choice(phrases))}, "y": {y}, "x": {x}}}')
            fh.write(("," if i > 1 else "") + f'{{"regions": [{", ".join(parts)}], "id": {i}}}')
        fh.write("]")


def stream(folder: Path, limit_images: int | None = None) -> tuple[int, int, float, float, Skips]:
    """Run read + clean; return (images kept, regions kept, wall seconds, CPU seconds, skips)."""
    skips = Skips()
    start, cpu_start = time.perf_counter(), time.process_time()
    meta = read_image_data(folder / "image_data.json", skips)
    images = regions = 0
    for _, kept in iter_clean_regions(folder / "region_descriptions.json", meta, CleaningSettings(), skips):
        images += 1
        regions += len(kept)
        if limit_images and images >= limit_images:
            break
    return images, regions, time.perf_counter() - start, time.process_time() - cpu_start, skips


def image_side(n_images: int, work: Path) -> dict:
    """Images/s of `vgclip prepare` (decode, re-encode, shard) with 1 and 2 workers on 512 px JPEGs."""
    import contextlib

    from vgclip.cli import main as cli
    from vgclip.synthetic.writers import write_synthetic_vg

    write_synthetic_vg(work / "vg", n_images, min_side=512, max_side=512, overwrite=True)
    out: dict = {"shard_images": n_images}
    for workers in (1, 2):
        target = work / f"shards-{workers}"
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            code = cli(["prepare", "--vg-root", str(work / "vg"), "--out", str(target), "--workers", str(workers),
                        "--shard-size", "50", "--val-images", "0", "--quiet"])
        if code:
            raise SystemExit(f"bench_prepare: vgclip prepare failed with exit code {code}")
        out[f"images_per_s_{workers}_worker{'s' if workers > 1 else ''}"] = round(n_images / (time.perf_counter()
                                                                                            - start), 1)
    out["two_worker_speedup"] = round(out["images_per_s_2_workers"] / out["images_per_s_1_worker"], 2)
    out["vg_108k_on_16_cores_minutes"] = round(108_077 / (16 * out["images_per_s_1_worker"]) / 60, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=5_400_000)
    parser.add_argument("--images", type=int, default=108_077)
    parser.add_argument("--python-slice", type=int, default=2_000, help="images streamed by the python backend")
    parser.add_argument("--shard-images", type=int, default=300, help="512 px images for the image side (0: skip)")
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (default: temp dir)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        write_vg(folder, args.images, args.regions)
        gen_s = time.perf_counter() - t0
        images, regions, secs, cpu_secs, skips = stream(folder)
        total = regions + sum(n for r, n in skips.counts.items() if r.startswith(("phrase", "box", "region")))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        c_rate = total / secs
        # Same data through the pure-python ijson backend, on a slice (it is far slower).
        with mock.patch.object(visual_genome, "_backend", lambda: visual_genome.ijson.get_backend("python")):
            _, py_regions, _, py_cpu, py_skips = stream(folder, limit_images=args.python_slice)
        py_total = py_regions + sum(n for r, n in py_skips.counts.items()
                                    if r.startswith(("phrase", "box", "region")))
        py_rate = py_total / py_cpu
        cpu_rate = total / cpu_secs
        images_side = image_side(args.shard_images, folder / "image_side") if args.shard_images else {}
        print(json.dumps({
            "benchmark": "prepare_read_clean", "regions_in_file": total, "images_kept": images,
            "regions_kept": regions, "file_mb": round((folder / "region_descriptions.json").stat().st_size / 2**20),
            "generate_s": round(gen_s, 1), "seconds": round(secs, 2), "cpu_seconds": round(cpu_secs, 2),
            "regions_per_s": round(c_rate), "regions_per_cpu_s": round(cpu_rate),
            "peak_rss_mb": round(peak_mb), "backend": getattr(visual_genome._backend(), "backend", "unknown"),
            "python_backend_regions_per_cpu_s": round(py_rate), "c_over_python_speedup": round(cpu_rate / py_rate, 1),
            # Wall-clock rate depends on other load on the machine; the CPU-time rate does not.
            "targets_met": {"regions_per_s>=100000": c_rate >= 100_000, "regions_per_cpu_s>=100000":
                            cpu_rate >= 100_000, "peak_rss<1GB": peak_mb < 1024},
            "skip_counts": dict(skips.counts),
            **images_side,
        }))
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
