"""Synthetic Visual Genome and VOC2007 folders at the real datasets' sizes, written fast (bench_scale.py's data).

The real sizes: Visual Genome v1.2 has 108,077 JPEGs (longest side mostly 500-800 px, 30-120 KB) and 5.4 M
region descriptions (~50 per image); VOC2007 has 5,011 trainval and 4,952 test images (~500 x 375). Drawing
and encoding a scene per image (vgclip.synthetic.writers) would take longer than the stages the data feeds, so:

- a pool of scenes is drawn and JPEG-encoded once (`vgclip.synthetic.draw.render_scene`, sides 375-800 px for
  VG, 300-500 px for VOC: the sizes and byte counts of the real mix);
- image i is pool entry i % P with a JPEG comment segment naming it inserted after the SOI marker, so every file's
  bytes differ (and its decoded pixels are the pool entry's) at the cost of one write;
- region_descriptions.json and image_data.json are streamed out image by image (v1.2 key order and types), each
  image with 10-90 regions (mean 50): the pool scene's own phrases and boxes first, then word-salad phrases with
  boxes inside the image; VOC XML and ImageSets come from the pool scene's objects.

A folder holds `written.json` (counts, bytes, the fraction) once complete; `ensure_data` reuses it then.

    python benchmarks/scale_data.py --out DIR --fraction 0.1
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np

from vgclip.synthetic.draw import render_scene
from vgclip.synthetic.text import scene_regions
from vgclip.synthetic.writers import VG_FOLDERS, VG_URL, voc_annotation_xml, write_image_sets

VG_IMAGES, VG_REGIONS = 108_077, 5_400_000
VOC_TRAINVAL, VOC_TEST = 5_011, 4_952
POOL = 64
QUALITY = 85
MARKER = "written.json"
WORDS = ("man woman dog cat red blue green white black car tree sky cloud building window door street sign shirt "
         "hat wearing holding on the a of in near behind large small wooden metal glass table chair plate food grass "
         "water boat train bus light pole fence wall floor roof").split()


def sizes(fraction: float) -> dict[str, int]:
    """Image and region counts at `fraction` of the real sizes (at least a handful of each)."""
    return {"vg_images": max(20, round(VG_IMAGES * fraction)), "vg_regions": max(200, round(VG_REGIONS * fraction)),
            "voc_trainval": max(10, round(VOC_TRAINVAL * fraction)), "voc_test": max(10, round(VOC_TEST * fraction))}


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def _named(jpeg: bytes, name: str) -> bytes:
    """`jpeg` with a COM segment holding `name` right after SOI (distinct bytes, same pixels)."""
    payload = name.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def _region_pool(scene, rng: np.random.Generator, words: random.Random, count: int = 120) -> list[str]:
    """`count` region JSON templates (region_id / image_id left as {r} / {i}) for one pool scene."""
    width, height = scene.width, scene.height
    pool = [(phrase, box) for phrase, box in scene_regions(scene, rng)]
    while len(pool) < count:
        w, h = words.randint(8, width), words.randint(8, height)
        box = (words.randint(0, width - w), words.randint(0, height - h), w, h)
        pool.append((" ".join(words.choices(WORDS, k=words.randint(2, 7))), box))
    return [f'{{{{"region_id": {{r}}, "width": {w}, "height": {h}, "image_id": {{i}}, "phrase": '
            f'{json.dumps(phrase).replace("{", "{{").replace("}", "}}")}, "y": {y}, "x": {x}}}}}'
            for phrase, (x, y, w, h) in pool]


def write_vg(out: Path, n_images: int, n_regions: int, seed: int = 0) -> dict[str, int]:
    """A VG v1.2 folder of `n_images` JPEGs and about `n_regions` regions (see the module docstring)."""
    rng, words = np.random.default_rng([seed, 23, 0]), random.Random(seed)
    scenes = [render_scene(rng, 375, 800) for _ in range(min(POOL, n_images))]
    jpegs = [_jpeg(s.image) for s in scenes]
    regions = [_region_pool(s, rng, words) for s in scenes]
    mean = n_regions / n_images
    for folder in VG_FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    region_id, image_bytes = 0, 0
    with open(out / "image_data.json", "w", buffering=1 << 22) as meta, \
            open(out / "region_descriptions.json", "w", buffering=1 << 22) as desc:
        meta.write("[")
        desc.write("[")
        for index in range(n_images):
            image_id, k = index + 1, index % len(scenes)
            folder = VG_FOLDERS[1] if index % 5 < 2 else VG_FOLDERS[0]  # real VG: ~60/40
            data = _named(jpegs[k], f"vgclip-scale vg {image_id}")
            (out / folder / f"{image_id}.jpg").write_bytes(data)
            image_bytes += len(data)
            scene = scenes[k]
            meta.write(("," if index else "") + json.dumps({
                "width": scene.width, "url": VG_URL.format(folder=folder, image_id=image_id), "height": scene.height,
                "image_id": image_id, "coco_id": None, "flickr_id": None}))
            count = max(1, min(len(regions[k]), round(mean * words.uniform(0.2, 1.8))))
            start = words.randrange(len(regions[k]))
            picked = (regions[k][(start + j) % len(regions[k])] for j in range(count))
            parts = [t.format(r=region_id + j + 1, i=image_id) for j, t in enumerate(picked)]
            region_id += count
            desc.write(("," if index else "") + f'{{"regions": [{", ".join(parts)}], "id": {image_id}}}')
        meta.write("]")
        desc.write("]")
    return {"images": n_images, "regions": region_id, "image_bytes": image_bytes}


def write_voc(out: Path, n_trainval: int, n_test: int, seed: int = 0) -> dict[str, int]:
    """out/VOCdevkit/VOC2007 with `n_trainval` + `n_test` images, XML and ImageSets (classes: SYNTH_CLASSES)."""
    rng = np.random.default_rng([seed, 23, 1])
    scenes = [render_scene(rng, 300, 500) for _ in range(min(POOL, n_trainval + n_test))]
    jpegs = [_jpeg(s.image) for s in scenes]
    xmls = [voc_annotation_xml("@NAME@", s, [o.tiny for o in s.objects]) for s in scenes]
    voc = out / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    n = n_trainval + n_test
    ids = [f"{index + 1:06d}" for index in range(n)]
    order = np.random.default_rng([seed, 23, 2]).permutation(n)
    trainval = set(order[:n_trainval].tolist())
    labels: dict[str, dict[str, int]] = {}
    image_bytes = 0
    for index, image_id in enumerate(ids):
        k = index % len(scenes)
        data = _named(jpegs[k], f"vgclip-scale voc {image_id}")
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(data)
        image_bytes += len(data)
        (voc / "Annotations" / f"{image_id}.xml").write_text(xmls[k].replace("@NAME@", f"{image_id}.jpg"))
        labels[image_id] = {}
        for obj in scenes[k].objects:
            labels[image_id][obj.cls] = max(labels[image_id].get(obj.cls, 0), 0 if obj.tiny else 1)
    splits = {"trainval": [i for k, i in enumerate(ids) if k in trainval],
              "test": [i for k, i in enumerate(ids) if k not in trainval]}
    write_image_sets(voc / "ImageSets" / "Main", splits, labels)
    return {"trainval": n_trainval, "test": n_test, "image_bytes": image_bytes}


def write_all(out: Path, fraction: float, seed: int = 0) -> dict:
    """VG under out/vg and VOC under out/voc at `fraction` of the real sizes, then the marker; returns its facts."""
    n = sizes(fraction)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    facts = {"fraction": fraction, "seed": seed, **n,
             "vg": write_vg(out / "vg", n["vg_images"], n["vg_regions"], seed),
             "voc": write_voc(out / "voc", n["voc_trainval"], n["voc_test"], seed)}
    facts["seconds"] = round(time.perf_counter() - start, 1)
    (out / MARKER).write_text(json.dumps(facts))
    return facts


def written(out: Path, fraction: float) -> dict | None:
    """The facts of a complete folder written at `fraction`, else None."""
    try:
        facts = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return facts if facts.get("fraction") == fraction else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write_all(args.out, args.fraction, args.seed)))


if __name__ == "__main__":
    main()
