"""Zero-shot quality while training (`vgclip train --val-voc-root`): the held-out folder scored every epoch.

After each epoch's validation, rank 0 scores a held-out VOC-layout folder zero-shot (the run's `eval`
settings; no threshold tuning, no files written) and the mAP goes to metrics.csv and the checkpoint, where
`train.select_by=zeroshot_map` can choose the best one (best_weights.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vgclip.config import Config
from vgclip.data.voc import find_voc_root, load_voc
from vgclip.errors import VgclipError
from vgclip.eval.voc_evaluation import ZeroshotSettings, evaluate_zeroshot
from vgclip.train import state as S

__all__ = ["ValVoc", "check_val_voc", "zeroshot_map", "progress_line"]

VAL_SPLIT = "val"  # scored when the folder's ImageSets/Main lists it
FALLBACK_SPLIT = "test"  # else the split `vgclip zeroshot` and load_voc default to
# Loggers whose per-load warnings (untuned thresholds, skipped images) were already shown once at the start.
QUIET_LOGGERS = ("vgclip.eval.voc_evaluation", "vgclip.data.voc")


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
    options = ZeroshotSettings(tune_split=None, plots=False, num_workers=max(0, min(2, config.data.num_workers)))
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
