"""Zero-shot quality while training (`vgclip train --val-voc-root`), the run's best checkpoint, the final report.

After each epoch's validation, rank 0 scores a held-out VOC-layout folder zero-shot (the run's `eval`
settings; no threshold tuning, no files written) and the mAP goes to metrics.csv and the checkpoint.
`train.select_by` says which checkpoint is best: the lowest validation loss or the highest such mAP;
at the end its weights are copied to RUN/best.safetensors (loadable with vgclip.load_checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgclip.config import Config
from vgclip.data.voc import find_voc_root, load_voc
from vgclip.errors import VgclipError
from vgclip.eval.job import run_zeroshot
from vgclip.eval.zeroshot import ZeroshotOptions, evaluate_zeroshot
from vgclip.model.weights_file import read_safetensors, write_safetensors
from vgclip.train import state as S

BEST_WEIGHTS = "best.safetensors"
VAL_SPLIT = "val"  # scored when the folder's ImageSets/Main lists it
FALLBACK_SPLIT = "test"  # else the split `vgclip zeroshot` and load_voc default to
# Loggers whose per-load warnings (untuned thresholds, skipped images) were already shown once at the start.
QUIET_LOGGERS = ("vgclip.eval.zeroshot", "vgclip.data.voc")


@dataclass(frozen=True)
class ValVoc:
    """The held-out folder scored every epoch and the split read from it."""

    root: Path
    split: str


def check_val_voc(root: str | Path | None, config: Config) -> ValVoc | None:
    """The --val-voc-root folder, read once now so that a bad one fails before training; None if not given.

    train.select_by=zeroshot_map without the folder is an error too. Every rank checks (symmetric failure).
    """
    if root is None:
        if config.train.select_by == "zeroshot_map":
            raise VgclipError("train.select_by=zeroshot_map needs --val-voc-root DIR (a held-out VOC-layout folder "
                              "scored zero-shot each epoch)")
        return None
    try:
        found = find_voc_root(root)
        split = VAL_SPLIT if (found / "ImageSets" / "Main" / f"{VAL_SPLIT}.txt").is_file() else FALLBACK_SPLIT
        load_voc(found, split, difficult=config.eval.difficult)
    except VgclipError as exc:
        raise VgclipError(f"--val-voc-root: {exc}") from None
    return ValVoc(Path(root), split)


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def zeroshot_map(model: nn.Module, eval_tf, tokenizer, voc: ValVoc, config: Config,
                 device: torch.device) -> tuple[float | None, str]:
    """(mAP of `model` on the held-out split, "") or (None, why it could not be scored).

    A scoring problem mid-run is reported, not raised: under DDP the other ranks are waiting at the
    epoch's barrier, and the run's other checkpoints are still worth keeping.
    """
    options = ZeroshotOptions(tune_split=None, plots=False, num_workers=max(0, min(2, config.data.num_workers)))
    rng = S.rng_state()  # scoring (its loader's worker seeds) must not shift the training random stream
    was_training = model.training
    try:
        with _quiet(QUIET_LOGGERS):
            result = evaluate_zeroshot(model, eval_tf, tokenizer, voc.root, voc.split, config.eval, options,
                                       device=device)
        value = float(result.report.mAP) if result.report.mAP is not None else math.nan
        return (value, "") if math.isfinite(value) else (None, "zero-shot mAP is not a number (no positives?)")
    except VgclipError as exc:
        return None, f"zero-shot scoring of --val-voc-root failed: {exc}"
    finally:
        model.train(was_training)
        S.set_rng_state(*rng)


def progress_line(epoch: int, val: dict[str, float], pos: S.Position, select_by: str) -> None:
    """One stderr line per epoch with the validation loss and zero-shot mAP, marking a new best."""
    parts = []
    if "loss" in val:
        parts.append(f"val loss {val['loss']:.4f}")
    if "zeroshot_map" in val:
        parts.append(f"zero-shot mAP {val['zeroshot_map']:.4f}")
    if not parts:
        return
    previous = pos.best_zeroshot_map if select_by == "zeroshot_map" else pos.best_val_loss
    value = val.get("zeroshot_map" if select_by == "zeroshot_map" else "loss")
    best = " (best so far)" if S.is_better(select_by, value, previous) else ""
    print(f"vgclip train: epoch {epoch}: {', '.join(parts)}{best}", file=sys.stderr)


def keep_best_weights(run_dir: Path, select_by: str) -> dict[str, Any] | None:
    """Copy the best checkpoint's weights to RUN/best.safetensors (why it is best in the file's metadata).

    Returns the summary's `best` entry, or None (and no best.safetensors) when no checkpoint has the value.
    """
    target = run_dir / BEST_WEIGHTS
    found = S.best_checkpoint(run_dir / "checkpoints", select_by)
    if found is None:
        target.unlink(missing_ok=True)  # an earlier run's best would be mistaken for this one's
        return None
    ckpt, value = found
    position = json.loads((ckpt / S.STATE_FILE).read_text(encoding="utf-8"))["position"]
    # The epoch that produced it, counted from 0 as the console and metrics.csv count: an epoch-end
    # checkpoint's position is already the start of the next epoch.
    epoch = position["epoch"] - 1 if position["batch_in_epoch"] == 0 else position["epoch"]
    best = {"select_by": select_by, "value": value, "checkpoint": str(ckpt), "step": position["step"],
            "epoch": epoch, "weights": str(target)}
    metadata = {"format": "pt", "producer": "vgclip", **{k: str(v) for k, v in best.items() if k != "weights"}}
    write_safetensors(target, read_safetensors(ckpt / "model.safetensors"), metadata=metadata)
    return best


def final_zeroshot(model: nn.Module, eval_tf, tokenizer, config: Config, run_dir: Path, voc_root: Path,
                   device: torch.device) -> dict:
    """Zero-shot VOC test report of the final model into RUN/zeroshot/ (`--voc-root`); its headline numbers.

    The trained model is saved by then: an evaluation problem is reported, not raised.
    """
    out = run_dir / "zeroshot"
    options = ZeroshotOptions(num_workers=config.data.num_workers, checkpoint=str(run_dir))
    try:
        report = run_zeroshot(model, eval_tf, tokenizer, voc_root, "test", config.eval, out, options, device=device)
    except VgclipError as exc:
        return {"error": str(exc)}
    finally:
        model.train()
    return {"mAP": report.mAP, "chance_mean": report.chance_mean, "report": str(out)}
