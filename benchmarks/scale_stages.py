"""The stages of bench_scale.py, each run as a user runs it: `python -m vgclip.cli ...` in a subprocess.

Every stage function takes the `Scale` context and returns its figures (scale_measure.run_stage: wall_s, cpu_s,
peak_rss_mb, max_process_rss_mb, bytes_written, the load around it) plus `items` (what its size is counted in,
the base of the growth exponent) and figures of its own. Outputs go under `Scale.out`, inputs come from
`Scale.data` (benchmarks/scale_data.py) and from earlier stages (prepare -> train -> zeroshot -> predict, serve).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from scale_measure import log_tail, run_stage

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ONE_EPOCH = ["train.epochs=1", "train.checkpoint_every=0"]


@dataclass
class Scale:
    """Where one fraction's data and outputs live, and its sizes (scale_data.sizes)."""

    data: Path
    out: Path
    sizes: dict
    workers: int = 2
    lit_images: int | None = None  # cap on the LiT stage's training images (whole shards)
    timeout_s: float | None = None
    checkpoint: Path | None = None  # the run zeroshot / predict / serve / export use (default: this train-1's)

    def cli(self, *args: str) -> list[str]:
        """`python -m vgclip.cli ARGS` with this interpreter."""
        return [sys.executable, "-m", "vgclip.cli", *args]

    def run(self, name: str, command: list[str], outputs: list[Path], env: dict | None = None,
            stdout: Path | None = None) -> dict:
        """Run one stage command; a failure stops the benchmark with the stage's log."""
        log = self.out / "logs" / f"{name}.log"
        figures = run_stage(command, log, outputs, env or ENV, stdout, self.timeout_s)
        if figures["rc"] != 0:
            raise SystemExit(f"bench_scale: stage {name} failed (exit {figures['rc']}), log {log}:\n{log_tail(log)}")
        return figures

    def fresh(self, name: str) -> Path:
        """An empty output path for a stage (its previous output removed)."""
        path = self.out / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    @property
    def trained(self) -> Path:
        """The run the evaluation stages load: --checkpoint, else this fraction's train-1 run."""
        return self.checkpoint or self.out / "train-1"

    @property
    def voc(self) -> Path:
        return self.data / "voc"

    @property
    def shards(self) -> Path:
        return self.out / "shards"


def train_shards(shards: Path, max_images: int | None = None) -> tuple[str, int]:
    """(a --data location for the first training shards, their image count): a brace pattern of the shards
    (a pattern has no val split, so training does not validate), whole shards up to `max_images`."""
    manifest = json.loads((shards / "manifest.json").read_text())
    files = sorted((shards / "train").glob("shard-*.tar"))
    if not files:
        raise SystemExit(f"bench_scale: no training shards in {shards} (run the prepare stage)")
    size = manifest["settings"]["shard_size"]
    keep = len(files) if max_images is None else max(1, min(len(files), max_images // size))
    images = manifest["splits"]["train"]["images"] if keep == len(files) else sum(_samples(f) for f in files[:keep])
    if keep == 1:
        return str(files[0]), images
    return f"{shards}/train/shard-{{000000..{keep - 1:06d}}}.tar", images


def _samples(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return sum(1 for m in tar if m.name.endswith((".json", ".json.gz")))


def shard_payload(shards: Path) -> dict:
    """Bytes of the shard files beside the JPEG bytes they hold (tar headers only are read)."""
    files, jpeg, meta, images = 0, 0, 0, 0
    for shard in sorted(shards.glob("*/shard-*.tar")):
        files += shard.stat().st_size
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    jpeg, images = jpeg + member.size, images + 1
                elif member.name.endswith((".json", ".json.gz")):
                    meta += member.size
    return {"shard_bytes": files, "jpeg_bytes": jpeg, "json_bytes": meta, "images": images}


def stage_data(s: Scale) -> dict:
    """Write the synthetic VG + VOC folders (reused when written at this fraction before)."""
    from scale_data import written

    measured = s.data / "measured.json"
    if written(s.data, s.sizes["fraction"]) and measured.is_file():
        return {**json.loads(measured.read_text()), "reused": True}
    cmd = [sys.executable, str(HERE / "scale_data.py"), "--out", str(s.data), "--fraction", str(s.sizes["fraction"])]
    s.data.parent.mkdir(parents=True, exist_ok=True)
    figures = s.run("data", cmd, [s.data])
    facts = json.loads((s.data / "written.json").read_text())
    figures |= {"items": facts["vg"]["images"] + facts["voc"]["trainval"] + facts["voc"]["test"],
                "vg_regions": facts["vg"]["regions"], "image_bytes": facts["vg"]["image_bytes"] + facts["voc"]["image_bytes"]}
    measured.write_text(json.dumps(figures))
    return figures


def stage_prepare(s: Scale) -> dict:
    """`vgclip prepare` of the VG folder into shards (80k train / 8k val at full size), `workers` processes."""
    shards = s.fresh("shards")
    n_train, n_val = round(80_000 * s.sizes["fraction"]), max(1, round(8_000 * s.sizes["fraction"]))
    cmd = s.cli("prepare", "--vg-root", str(s.data / "vg"), "--out", str(shards), "--workers", str(s.workers),
                "--train-images", str(n_train), "--val-images", str(n_val), "--quiet")
    figures = s.run("prepare", cmd, [shards])
    payload = shard_payload(shards)
    facts = json.loads((s.data / "written.json").read_text())
    source = facts["vg"]["image_bytes"] * payload["images"] / facts["vg"]["images"]  # the pool mix is uniform
    return figures | payload | {"items": payload["images"], "regions_read": facts["vg"]["regions"],
                                "shard_over_jpeg": round(payload["shard_bytes"] / payload["jpeg_bytes"], 3),
                                "shard_over_members": round(payload["shard_bytes"] / (payload["jpeg_bytes"]
                                                                                     + payload["json_bytes"]), 3),
                                "shard_over_source_images": round(payload["shard_bytes"] / source, 3)}


def _summary(path: Path) -> dict:
    """The JSON `vgclip train` printed last on stdout."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def stage_train(s: Scale, procs: int) -> dict:
    """One epoch of the `tiny` preset (64 px) over every training shard, in 1 process or `procs` gloo ranks."""
    name = f"train-{procs}"
    run = s.fresh(name)
    data, images = train_shards(s.shards)
    args = ["train", "--data", data, "--out", str(run), "--config", "tiny", *ONE_EPOCH]
    env = ENV
    if procs == 1:
        cmd = s.cli(*args)
    else:
        env = ENV  # torchrun sets OMP_NUM_THREADS=1 per rank when it is not set
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "vgclip.cli", *args]
    figures = s.run(name, cmd, [run], env, stdout=s.out / "logs" / f"{name}.json")
    summary = _summary(s.out / "logs" / f"{name}.json")
    return figures | {"items": images, "steps": summary.get("steps"), "samples_seen": summary.get("samples_seen")}


def stage_validation(s: Scale) -> dict:
    """Validation on every val image (train.val_max_samples raised to them), after one epoch of the first
    training shard (`tiny`): what a user's epoch-end validation costs, plus one shard of training."""
    run = s.fresh("validation")
    first, shard_images = train_shards(s.shards, max_images=1)
    n_val = json.loads((s.shards / "manifest.json").read_text())["splits"]["val"]["images"]
    cmd = s.cli("train", "--data", first, "--val-data", str(s.shards), "--out", str(run), "--config", "tiny",
                *ONE_EPOCH, f"train.val_max_samples={n_val}")
    figures = s.run("validation", cmd, [run], stdout=s.out / "logs" / "validation.json")
    summary = _summary(s.out / "logs" / "validation.json")
    return figures | {"items": n_val, "train_images": shard_images, "val": summary.get("val")}


def stage_lit(s: Scale) -> dict:
    """`offline-small` (both towers locked): the LiT feature cache of the training images, then one epoch on it."""
    run = s.fresh("lit")
    data, images = train_shards(s.shards, s.lit_images)
    cmd = s.cli("train", "--data", data, "--out", str(run), "--config", "offline-small", *ONE_EPOCH)
    figures = s.run("lit", cmd, [run], stdout=s.out / "logs" / "lit.json")
    cache = sum(p.stat().st_size for p in run.glob("image_features*") if p.is_file())
    cache += sum(q.stat().st_size for p in run.glob("image_features*") if p.is_dir() for q in p.rglob("*") if q.is_file())
    return figures | {"items": images, "feature_cache_bytes": cache}


def stage_zeroshot(s: Scale) -> dict:
    """`vgclip zeroshot` of the train-1 run on the VOC test split, thresholds tuned on trainval, plots."""
    report = s.fresh("report")
    cmd = s.cli("zeroshot", "--checkpoint", str(s.trained), "--voc-root", str(s.voc), "--out", str(report),
                "--workers", str(s.workers))
    figures = s.run("zeroshot", cmd, [report])
    files = {p.name: p.stat().st_size for p in sorted(report.iterdir()) if p.is_file()}
    return figures | {"items": s.sizes["voc_test"] + s.sizes["voc_trainval"], "files": files}


def _test_images(s: Scale) -> Path:
    """A folder of hard links to the VOC test images (what a user points predict at)."""
    folder = s.data / "voc-test-images"
    if not folder.is_dir():
        voc = s.voc / "VOCdevkit" / "VOC2007"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for image_id in (voc / "ImageSets" / "Main" / "test.txt").read_text().split():
            os.link(voc / "JPEGImages" / f"{image_id}.jpg", tmp / f"{image_id}.jpg")
        tmp.rename(folder)
    return folder


def stage_predict(s: Scale) -> dict:
    """`vgclip predict` of the VOC test images with the report's thresholds: `--out DIR` when the command has it
    (the streaming collection tagger, given the folder), else the image paths and `--json` on stdout."""
    import subprocess

    folder = _test_images(s)
    report = s.out / "report"
    classes = s.out / "classes.txt"
    classes.write_text("\n".join(_report_classes(report)) + "\n")
    base = ["predict", "--checkpoint", str(s.trained), "--labels-file", str(classes),
            "--thresholds", str(report / "thresholds.json")]
    helptext = subprocess.run(s.cli("predict", "--help"), capture_output=True, text=True, env=ENV).stdout
    target = s.fresh("predict")
    if "--out" in helptext:
        figures = s.run("predict", s.cli(*base, "--out", str(target), str(folder)), [target])
        form = "--out DIR (folder)"
    else:
        target.mkdir(parents=True)
        paths = sorted(str(p) for p in folder.glob("*.jpg"))
        figures = s.run("predict", s.cli(*base, "--json", *paths), [target], stdout=target / "predict.json")
        form = "paths + --json on stdout"
    return figures | {"items": s.sizes["voc_test"], "form": form}


def _report_classes(report: Path) -> list[str]:
    """The class names of a zeroshot report (its scores.csv header, read as one line)."""
    with open(report / "scores.csv") as fh:
        header = fh.readline().rstrip("\n").split(",")
    return [c[len("score_"):] for c in header if c.startswith("score_")]


def stage_export(s: Scale) -> dict:
    """`vgclip export` of the train-1 run as an open_clip folder."""
    target = s.fresh("export")
    figures = s.run("export", s.cli("export", "--checkpoint", str(s.trained), "--out", str(target)), [target])
    return figures | {"items": 1}
