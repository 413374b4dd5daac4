"""What a model card says about a run, read from the run folder.

A run folder holds config.yaml and metrics.csv; `run_info.json` (written here at the end of training)
adds what only the training process knew: how long it trained, on what hardware, on which shards, and
the zero-shot report `vgclip zeroshot` last wrote for the run. Everything is read defensively: a card
leaves out what a run does not have rather than failing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
import yaml
from safetensors import safe_open

from vgclip.config import config_to_dict, load_config
from vgclip.eval.records import ZeroshotReport
from vgclip.io import atomic_write_text
from vgclip.summary import TrainSummary

__all__ = ["RunFacts", "data_summary", "gather_run_facts", "hardware", "last_validation", "nearest_preset",
           "read_json", "record_training", "remember_report", "selection_summary", "shown_path", "zeroshot_summary"]

RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.csv"
REPORT_DIR = "zeroshot"  # where `vgclip train --voc-root` writes its zero-shot report
VAL_COLUMNS = ("loss", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
BEST_WEIGHTS = "best.safetensors"  # the best checkpoint's weights (train/best_weights.py)
PREPARED_SOURCES = ("vg", "coco", "csv")  # manifest.json inputs.source of `vgclip prepare`


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """The run's facts a card shows; None where the run has none."""

    run_dir: Path
    config: dict[str, Any]
    preset: str | None
    preset_diffs: tuple[str, ...]
    training: dict[str, Any] | None
    data: dict[str, Any] | None
    val: dict[str, Any] | None
    zeroshot: dict[str, Any] | None
    selection: dict[str, Any] | None = None  # train.select_by, the best checkpoint, tracked zero-shot mAP


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when missing or unreadable (a card leaves the part out)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def hardware(device: str) -> str:
    """A short description of the device a process trained on."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    if dev.type != "cpu":
        return dev.type
    name = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), name)
    except OSError:
        pass
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {name}, {threads} threads"


def record_training(run_dir: Path, summary: TrainSummary, *, world_size: int, device: str) -> dict[str, Any]:
    """Write RUN/run_info.json from train()'s summary; training time adds up over resumed sessions."""
    previous = read_json(run_dir / RUN_INFO_FILE) or {}
    resumed = summary.resumed
    seconds = float(summary.seconds) + (float(previous.get("train_seconds", 0.0)) if resumed else 0.0)
    info = {
        "train_seconds": seconds,
        "sessions": int(previous.get("sessions", 0)) + 1 if resumed else 1,
        "steps": summary.steps, "epochs": summary.epochs,
        "samples_seen": summary.samples_seen, "train_samples": summary.train_samples,
        "final_train_loss": summary.final_train_loss, "best_val_loss": summary.best_val_loss,
        "data": _absolute(summary.data), "val_data": _absolute(summary.val_data),
        "val_voc_root": _absolute(summary.val_voc_root), "best": summary.best,
        "hardware": hardware(device), "processes": world_size,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__},
    }
    if previous.get("zeroshot_report"):
        info["zeroshot_report"] = previous["zeroshot_report"]
    atomic_write_text(run_dir / RUN_INFO_FILE, json.dumps(info, indent=1, default=str) + "\n")
    return info


def _absolute(location: str | None) -> str | None:
    """A local path made absolute (a card names it relative to its own folder); URLs and pipe: as given."""
    if not location or "://" in location or location.startswith("pipe:"):
        return location
    return os.path.abspath(location)


def shown_path(location: str, base: Path) -> str:
    """`location` as a card in folder `base` names it: relative to `base` when local, else as given."""
    if "://" in location or location.startswith("pipe:"):
        return location
    try:
        return Path(os.path.relpath(os.path.abspath(location), os.path.abspath(base))).as_posix()
    except ValueError:  # another drive: no relative path, the name alone
        return Path(location).name


def remember_report(run_dir: Path, report_dir: Path) -> None:
    """Note in RUN/run_info.json the zero-shot report folder `vgclip zeroshot` wrote for the run."""
    info = read_json(run_dir / RUN_INFO_FILE) or {}
    info["zeroshot_report"] = str(Path(report_dir).resolve())
    atomic_write_text(run_dir / RUN_INFO_FILE, json.dumps(info, indent=1, default=str) + "\n")


def nearest_preset(config: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """The built-in preset `config` differs least from, and the settings (`key: preset -> run`) that differ."""
    flat = _flatten(config)
    best: tuple[str | None, tuple[str, ...]] = (None, ())
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        try:
            preset = _flatten(config_to_dict(load_config(path.stem)))
        except Exception:  # a preset this vgclip cannot load says nothing about the run
            continue
        diffs = tuple(f"{k}: {preset.get(k)!r} -> {flat.get(k)!r}" for k in sorted(set(flat) | set(preset))
                      if preset.get(k) != flat.get(k))  # fmt: skip
        if best[0] is None or len(diffs) < len(best[1]):
            best = (path.stem, diffs)
    return best


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_summary(location: str | None) -> dict[str, Any] | None:
    """Source kind, format, per-split counts and skips from the shards' manifest.json, when the shards are local.

    kind: the manifest's inputs.source (vg, coco, csv); "img2dataset" for tar shards vgclip did not write (a
    tar file or brace pattern: img2dataset / open_clip layout); None when unknown.
    """
    if not location:
        return None
    manifest = read_json(Path(location) / "manifest.json") if Path(location).is_dir() else None
    if manifest is None:
        tars = location.endswith(".tar") or ("{" in location and ".tar" in location)
        return {"location": location, "manifest": None, "kind": "img2dataset" if tars else None}
    splits = manifest.get("splits") or {}
    skipped = (manifest.get("skipped") or {}).get("counts") or {}
    inputs = manifest.get("inputs") or {}
    source = inputs.get("source")
    named = inputs.get("captions_csv") or inputs.get("coco_captions")
    return {
        "location": location, "manifest": str(Path(location) / "manifest.json"), "source": source,
        "kind": source if source in PREPARED_SOURCES else None, "format": manifest.get("format"),
        "input_file": Path(str(named)).name if named else None,
        "splits": {name: {k: (len(v) if k == "shards" else v) for k, v in entry.items()}
                   for name, entry in splits.items() if isinstance(entry, dict)},  # fmt: skip
        "skipped": sum(v for v in skipped.values() if isinstance(v, int)),
    }


def last_validation(run_dir: Path) -> dict[str, Any] | None:
    """The last validation row of metrics.csv (epoch, step, loss, recall@1/5/10 both ways), numbers as floats."""
    try:
        with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("split") == "val"]
    except OSError:
        return None
    if not rows:
        return None
    row = rows[-1]
    values: dict[str, Any] = {"step": row.get("step"), "epoch": row.get("epoch")}
    for key in VAL_COLUMNS:
        try:
            values[key] = float(row[key])
        except (KeyError, TypeError, ValueError):
            continue
    return values


def _zeroshot_history(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, counted from 0 as the console, metrics.csv and `best` count, zero-shot mAP) of metrics.csv's validation
    rows that have one."""
    try:
        with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("split") == "val" and r.get("zeroshot_map")]
    except OSError:
        return []
    history = {}
    for row in rows:
        try:
            history[int(row["epoch"])] = float(row["zeroshot_map"])  # a resumed epoch: its last row
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(history.items())


def _best_metadata(run_dir: Path) -> dict[str, Any] | None:
    """Why RUN/best.safetensors is best (select_by, value, checkpoint, step, epoch), from its metadata."""
    try:
        with safe_open(str(run_dir / BEST_WEIGHTS), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        return {**meta, "value": float(meta["value"])} if "select_by" in meta else None
    except Exception:  # no file, one safetensors cannot read, or metadata vgclip did not write: left out
        return None


def selection_summary(run_dir: Path, config: dict[str, Any], info: dict[str, Any] | None) -> dict[str, Any] | None:
    """How the run chose its best checkpoint (train.select_by, the checkpoint, its value) and the zero-shot
    mAP tracked every epoch on --val-voc-root; None when the run has neither."""
    best = (info or {}).get("best") or _best_metadata(run_dir)
    best = best if (run_dir / BEST_WEIGHTS).is_file() else None  # a best file removed since: nothing to name
    history = _zeroshot_history(run_dir)
    if best is None and not history:
        return None
    select_by = (best or {}).get("select_by") or (config.get("train") or {}).get("select_by") or "val_loss"
    return {"select_by": select_by, "best": best, "history": history,
            "val_voc_root": (info or {}).get("val_voc_root")}


def zeroshot_summary(run_dir: Path, report_dir: Path | None = None) -> dict[str, Any] | None:
    """Headline numbers of the run's zero-shot report: `report_dir` if given, else the newest of
    RUN/zeroshot and the report run_info.json names. A report older than the weights is of an earlier
    model (training went on since) and is not shown."""
    if report_dir is not None:
        candidates = [Path(report_dir)]
    else:
        named = (read_json(run_dir / RUN_INFO_FILE) or {}).get("zeroshot_report")
        candidates = [run_dir / REPORT_DIR] + ([Path(named)] if named else [])
    weights = run_dir / "model.safetensors"
    made = weights.stat().st_mtime if weights.is_file() else 0.0
    fresh = [p / "report.json" for p in candidates if (p / "report.json").is_file()
             and (p / "report.json").stat().st_mtime >= made]  # fmt: skip
    if not fresh:
        return None
    path = max(fresh, key=lambda p: p.stat().st_mtime)
    raw = read_json(path)
    if raw is None or not isinstance(raw.get("mAP"), (int, float)):
        return None
    try:
        report = ZeroshotReport.from_dict(raw)
    except (TypeError, ValueError):  # a section that is no JSON object: not a report this card can quote
        return None
    s = report.settings
    return {
        "report": str(path.parent), "mAP": float(raw["mAP"]), "chance": report.chance_mean,
        "mAP_voc07_11pt": report.mAP_voc07_11pt, "voc_root": s.voc_root,
        "split": s.split, "images": report.data.evaluated_images,
        "classes": len(s.classes or []), "score": s.score,
        "templates": s.templates, "difficult": s.difficult,
    }


def gather_run_facts(run_dir: str | Path, report_dir: Path | None = None) -> RunFacts:
    """Everything a card says about the run at `run_dir` (a complete run folder)."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    preset, diffs = nearest_preset(config)
    training = read_json(run_dir / RUN_INFO_FILE)
    training = training if training and "train_seconds" in training else None
    return RunFacts(
        run_dir=run_dir.resolve(), config=config, preset=preset, preset_diffs=diffs, training=training,
        data=data_summary(training.get("data") if training else None), val=last_validation(run_dir),
        zeroshot=zeroshot_summary(run_dir, report_dir),
        selection=selection_summary(run_dir, config, training),
    )
