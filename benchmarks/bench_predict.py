"""Tagging a collection: `vgclip predict --out` beside a plain open_clip loop over the same model, one run.

Both sides score the same JPEGs (VOC-like sizes, written once into --workdir) against the 20 VOC classes
("a photo of a {}.", softmax), one centre crop per image, with the same model: the --config towers (default
offline-small: packaged pretrained towers, random projections; the scores mean nothing, the cost is a real
model's) saved as a run and exported with `vgclip export --format open_clip`:
  vgclip:    `vgclip predict --checkpoint EXPORT --list IMAGES.txt --out OUT --crops centre --workers W --batch-size 32
             --quiet`, a subprocess as a user runs it (its images/s from OUT/summary.json: after the model is
             loaded; the whole command's wall time beside it);
  open_clip: one process, `open_clip.create_model_and_transforms("local-dir:EXPORT")`, PIL open + convert("RGB")
             + open_clip's preprocess, batches of 32, encode_image + softmax scores against the label texts'
             embeddings (timed after the model is loaded, text embeddings included).
Sides alternate for --rounds rounds; the best round of each counts (the machine is shared). Beside them:
  - vgclip's `--crops multi` (8 crops) rate on the first --multi-images images;
  - re-tag: `vgclip predict --embeddings OUT --labels <12 other labels>` vs encoding the images again (both
    whole-command wall seconds; encoding again is the vgclip side's command: the same images, model and
    crops, only its 20 labels instead of 12);
  - memory: peak RSS of `vgclip predict --out` over a --list of the --images files vs one of --rss-images
    paths (the same files listed again through symlinks in WORKDIR/links/, distinct paths), with the
    --rss-config towers (default --config: then the vgclip side's run is the smaller one); ru_maxrss of
    the command (its largest process), and the polled peak of the RSS summed over it and its decoding
    workers.
Note: `vgclip predict` hands whole parts (--part-size, default 5000 files) to its decoding workers, so a run
of up to 5000 files decodes in one worker whatever --workers says (2,000 files here; the 20,000-file list is
4 parts, 2 workers); on 2 CPUs the model, not decoding, sets the rate.
Prints one JSON line: images/s of each side and vgclip/open_clip (target >= 1.5 on a 2-core machine),
multi-crop images/s, re-tag and encode seconds and their ratio, RSS at both sizes and their ratio (target
<= 1.15), and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import run_measurement  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/voc2012-sample/VOCdevkit/VOC2012/JPEGImages"
TEMPLATE = "a photo of a {}."
OTHER_LABELS = ("a beach", "a city street", "food on a plate", "a mountain", "snow", "a crowd", "text",
                "a night sky", "a forest", "an indoor room", "a vehicle", "an animal")  # fmt: skip


def voc_labels() -> list[str]:
    from vgclip.data.voc import STANDARD_CLASSES
    from vgclip.eval.prompts import readable_name

    return [readable_name(c) for c in STANDARD_CLASSES]


# ---------------------------------------------------------------------------------------------- inputs
def write_images(folder: Path, count: int) -> str:
    """`count` JPEGs in `folder` (kept between runs): perturbed copies of the real VOC2012 sample photos
    (flip, crop of 85-100% of each side resized back to the photo's size, brightness / colour / contrast,
    JPEG quality 85-95), else synthetic scenes at VOC sizes. Returns the source's name."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    source = "voc2012-sample perturbed" if SAMPLE.is_dir() and any(SAMPLE.glob("*.jpg")) else "synthetic scenes"
    marker = folder / ".written.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["count"] >= count and done["source"] == source:
            return source
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(SAMPLE.glob("*.jpg")) if source.startswith("voc") else []
    for i in range(count):
        path = folder / f"img-{i:06d}.jpg"
        if path.is_file():
            continue
        rng = np.random.default_rng(i)
        if photos:
            with Image.open(photos[i % len(photos)]) as img:
                base = img.convert("RGB")
        else:
            from vgclip.synthetic.draw import render_scene

            scene = render_scene(rng, min_side=333, max_side=500)
            base = scene.image.convert("RGB")
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.85, 1.0)), int(h * rng.uniform(0.85, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = base.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        if i // max(len(photos), 1) % 2:
            img = ImageOps.mirror(img)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Color, ImageEnhance.Contrast):
            img = enhance(img).enhance(float(rng.uniform(0.8, 1.2)))
        img.save(path, quality=int(rng.integers(85, 96)))
    marker.write_text(json.dumps({"count": count, "source": source}))
    return source


def list_file(workdir: Path, images: list[Path], count: int) -> Path:
    """A --list of `count` distinct paths: the images, then symlinks to them in WORKDIR/links/copy-K/."""
    path = workdir / f"list-{count}.txt"
    lines = []
    for i in range(count):
        copy, src = divmod(i, len(images))
        if copy == 0:
            lines.append(str(images[src]))
            continue
        link = workdir / "links" / f"copy-{copy:02d}" / images[src].name
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(images[src])
        lines.append(str(link))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_model(workdir: Path, config: str) -> Path:
    """WORKDIR/open_clip-CONFIG: the preset's towers saved as a run and exported to open_clip (kept)."""
    export = workdir / f"open_clip-{config}"
    if (export / "open_clip_config.json").is_file():
        return export
    import vgclip
    from vgclip.model.checkpoint import save_model

    run = workdir / f"run-{config}"
    if not (run / "model.safetensors").is_file():
        torch_seed()
        cfg = vgclip.load_config(config)
        model, _, tokenizer = vgclip.create_model(cfg)
        save_model(run, model, tokenizer, cfg)
    from vgclip.export.open_clip import export_open_clip

    export_open_clip(run, export, overwrite=True)  # what `vgclip export --format open_clip` runs
    return export


def torch_seed() -> None:
    import torch

    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------- running
def vgclip_cli(argv: list[str], what: str) -> dict:
    """Run `python -m vgclip.cli ARGV`: wall seconds, ru_maxrss (its largest process) and the polled peak of
    the RSS summed over it and its children (decoding workers), last stdout line."""
    proc = subprocess.Popen([sys.executable, "-m", "vgclip.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    start = time.perf_counter()
    tree_peak = 0
    out: dict[str, str] = {}

    def drain(name: str, stream) -> None:
        out[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_rss(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{out.get('err', '')[-3000:]}")
    lines = out.get("out", "").strip().splitlines()
    return {"wall_s": wall, "maxrss_mb": usage.ru_maxrss / 1024, "tree_rss_mb": tree_peak / 2**20,
            "stdout": lines[-1] if lines else ""}  # fmt: skip


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (from /proc; 0 for processes gone meanwhile)."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def predict(export: Path, inputs: list[str], out: Path, labels: list[str], args: argparse.Namespace, crops: str,
            what: str) -> dict:  # fmt: skip
    """`vgclip predict ... --out OUT` from scratch; the measurement plus summary.json's images/s."""
    shutil.rmtree(out, ignore_errors=True)
    run = vgclip_cli(["predict", "--checkpoint", str(export), *inputs, "--labels", ",".join(labels),
                      "--score", "softmax", "--templates", "single", "--crops", crops, "--workers", str(args.workers),
                      "--batch-size", str(args.batch_size), "--device", "cpu", "--out", str(out), "--quiet"], what)
    summary = json.loads((out / "summary.json").read_text())
    run["summary"] = summary
    run["images_per_s"] = float(summary["this_run"]["images_per_s"])
    run["scored"] = int(summary["counts"]["scored"])
    return run


def open_clip_side(export: Path, paths: list[Path], labels: list[str], batch_size: int) -> dict:
    """The plain loop (run in a fresh child process): images/s after the model is loaded."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        text = model.encode_text(tokenizer([TEMPLATE.format(label) for label in labels]), normalize=True)
        scale = model.logit_scale.exp()
        rows = 0
        for first in range(0, len(paths), batch_size):
            batch = []
            for path in paths[first : first + batch_size]:
                with Image.open(path) as img:
                    batch.append(preprocess(img.convert("RGB")))
            features = model.encode_image(torch.stack(batch), normalize=True)
            scores = (scale * features @ text.T).softmax(dim=-1)
            rows += len(scores)
    seconds = time.perf_counter() - start
    assert rows == len(paths)
    return {"images_per_s": len(paths) / seconds, "seconds": seconds, "threads": torch.get_num_threads()}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    """The command line (`--quick`: a few dozen images, for tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vgclip-bench-predict"),
                        help="images, model, lists and outputs (kept and reused)")
    parser.add_argument("--config", default="offline-small", help="towers of the model (tiny: for tests)")
    parser.add_argument("--images", type=int, default=2000, help="images both sides score")
    parser.add_argument("--rss-images", type=int, default=20000, help="the larger --list of the memory pair")
    parser.add_argument("--multi-images", type=int, default=200, help="images of the --crops multi run")
    parser.add_argument("--rss-config", help="towers of the memory pair (default: --config)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few dozen images (tests): 48 / 96 / 8")
    parser.add_argument("--side", choices=("open_clip",), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.rss_images, args.multi_images = 48, 96, 8
    return args


def best_rates(args: argparse.Namespace, workdir: Path, export: Path, small_list: Path,
               labels: list[str]) -> tuple[dict, dict]:
    """Both sides on the same images, `--rounds` times, each side's fastest round: (vgclip, open_clip)."""
    best: dict[str, dict | None] = {"vgclip": None, "open_clip": None}
    for _ in range(args.rounds):
        oc = run_measurement([sys.executable, __file__, "--side", "open_clip", "--workdir", str(workdir),
                              "--export", str(export), "--images", str(args.images),
                              "--batch-size", str(args.batch_size)], "open_clip loop")  # fmt: skip
        vg = predict(export, ["--list", str(small_list)], workdir / "out-centre", labels, args, "centre",
                     "vgclip predict (centre)")  # fmt: skip
        if best["open_clip"] is None or oc["images_per_s"] > best["open_clip"]["images_per_s"]:
            best["open_clip"] = oc
        if best["vgclip"] is None or vg["images_per_s"] > best["vgclip"]["images_per_s"]:
            best["vgclip"] = vg
    return best["vgclip"], best["open_clip"]


def retag_run(workdir: Path, expected_rows: int) -> tuple[dict, int]:
    """Re-tag the centre run's stored embeddings for OTHER_LABELS: (the command's measurement, rows)."""
    retag_out = workdir / "out-retag"
    shutil.rmtree(retag_out, ignore_errors=True)
    retag = vgclip_cli(["predict", "--embeddings", str(workdir / "out-centre"), "--labels", ",".join(OTHER_LABELS),
                        "--out", str(retag_out)], "vgclip predict --embeddings")  # fmt: skip
    rows = pq_rows(retag_out / "predictions.parquet")
    assert rows == expected_rows, retag["stdout"]
    return retag, rows


def memory_pair(args: argparse.Namespace, workdir: Path, images: list[Path], small_list: Path, labels: list[str],
                vg: dict) -> tuple[dict, dict, str]:
    """Peak RSS of `--images` vs `--rss-images` listed images: (small run, large run, the towers used)."""
    rss_config = args.rss_config or args.config
    rss_export = make_model(workdir, rss_config)
    # The vgclip side's run is the smaller one when it used the same towers.
    small = vg if rss_config == args.config else predict(rss_export, ["--list", str(small_list)],
                                                         workdir / "out-rss-small", labels, args, "centre",
                                                         "vgclip predict (--list of --images)")  # fmt: skip
    large = predict(rss_export, ["--list", str(list_file(workdir, images, args.rss_images))], workdir / "out-rss-large",
                    labels, args, "centre", "vgclip predict (--list of --rss-images)")  # fmt: skip
    assert small["scored"] == len(images) and large["scored"] == args.rss_images, large["stdout"]
    shutil.rmtree(workdir / "out-rss-large", ignore_errors=True)  # the largest output: not kept
    return small, large, rss_config


def main() -> None:
    args = parse_args()
    if args.side == "open_clip":
        images = sorted((args.workdir / "images").glob("*.jpg"))[: args.images]
        print(json.dumps(open_clip_side(args.export, images, voc_labels(), args.batch_size)))
        return

    load_before = load()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / "images"
    source = write_images(folder, max(args.images, args.multi_images))
    images = sorted(folder.glob("*.jpg"))[: args.images]
    small_list = list_file(workdir, images, len(images))
    export = make_model(workdir, args.config)
    labels = voc_labels()
    vg, oc = best_rates(args, workdir, export, small_list, labels)
    assert vg["scored"] == len(images), vg["stdout"]
    multi_list = list_file(workdir, images[: args.multi_images], args.multi_images)
    multi = predict(export, ["--list", str(multi_list)], workdir / "out-multi", labels, args, "multi",
                    "vgclip predict (multi)")  # fmt: skip
    retag, retag_rows = retag_run(workdir, len(images))
    small, large, rss_config = memory_pair(args, workdir, images, small_list, labels, vg)

    print(json.dumps({
        "benchmark": "predict_collection", "device": "cpu", "images": len(images), "image_source": source,
        "model": f"{args.config} exported to open_clip", "labels": len(labels), "batch_size": args.batch_size,
        "workers": args.workers, "rounds": args.rounds,
        "vgclip_images_per_s": round(vg["images_per_s"], 2),
        "vgclip_wall_images_per_s": round(len(images) / vg["wall_s"], 2),
        "open_clip_images_per_s": round(oc["images_per_s"], 2), "open_clip_threads": oc["threads"],
        "ratio_vgclip_over_open_clip": round(vg["images_per_s"] / oc["images_per_s"], 3),
        "ratio_wall_vgclip_over_open_clip": round(len(images) / vg["wall_s"] / oc["images_per_s"], 3),
        "multi_crop_images": args.multi_images, "vgclip_multi_images_per_s": round(multi["images_per_s"], 2),
        "retag_labels": len(OTHER_LABELS), "retag_images": retag_rows, "retag_s": round(retag["wall_s"], 2),
        "encode_again_s": round(vg["wall_s"], 2), "ratio_encode_over_retag": round(vg["wall_s"] / retag["wall_s"], 1),
        "rss_model": rss_config, "rss_small_images": len(images), "rss_large_images": args.rss_images,
        "rss_large_inputs": "symlinks", "rss_small_mb": round(small["maxrss_mb"], 1),
        "rss_large_mb": round(large["maxrss_mb"], 1),
        "ratio_rss_large_over_small": round(large["maxrss_mb"] / small["maxrss_mb"], 3),
        "tree_rss_small_mb": round(small["tree_rss_mb"], 1), "tree_rss_large_mb": round(large["tree_rss_mb"], 1),
        "rss_small_images_per_s": round(small["images_per_s"], 2),
        "rss_large_images_per_s": round(large["images_per_s"], 2),
        "load_before": load_before, "load_after": load(),
    }))  # fmt: skip


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


if __name__ == "__main__":
    main()
