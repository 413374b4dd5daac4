"""The run's best checkpoint by `train.select_by`, copied to RUN/best.safetensors at the end of training.

`train.select_by` says which checkpoint is best: the lowest validation loss or the highest zero-shot mAP
(zeroshot_tracking.py); its weights are loadable with vgclip.load_checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vgclip.model.weights_file import read_safetensors, write_safetensors
from vgclip.train import state as S

__all__ = ["BEST_WEIGHTS", "keep_best_weights"]

BEST_WEIGHTS = "best.safetensors"


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
