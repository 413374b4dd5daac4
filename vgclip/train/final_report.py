"""`vgclip train --voc-root`: the zero-shot VOC test report of the final model, into RUN/zeroshot/."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vgclip.config import Config
from vgclip.errors import VgclipError
from vgclip.eval.job import run_zeroshot
from vgclip.eval.voc_evaluation import ZeroshotSettings

__all__ = ["final_zeroshot"]


def final_zeroshot(model: nn.Module, eval_tf, tokenizer, config: Config, run_dir: Path, voc_root: Path,
                   device: torch.device) -> dict:
    """Zero-shot VOC test report of the final model into RUN/zeroshot/ (`--voc-root`); its headline numbers.

    The trained model is saved by then: an evaluation problem is reported, not raised.
    """
    out = run_dir / "zeroshot"
    options = ZeroshotSettings(num_workers=config.data.num_workers, checkpoint=str(run_dir))
    try:
        report = run_zeroshot(model, eval_tf, tokenizer, voc_root, "test", config.eval, out, options, device=device)
    except VgclipError as exc:
        return {"error": str(exc)}
    finally:
        model.train()
    return {"mAP": report.mAP, "chance_mean": report.chance_mean, "report": str(out)}
