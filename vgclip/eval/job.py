"""The zero-shot job: evaluate (zeroshot.py), then write the report folder (report.py).

What `vgclip zeroshot`, the demo and `vgclip train --voc-root` run; the evaluation itself writes nothing,
so scoring -> evaluation -> report files is one direction with no way back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from vgclip.config import EvalConfig
from vgclip.eval.records import ZeroshotReport
from vgclip.eval.report_files import write_outputs
from vgclip.eval.voc_evaluation import ZeroshotSettings, evaluate_zeroshot

__all__ = ["run_zeroshot"]


def run_zeroshot(
    model: torch.nn.Module,
    image_transform: Callable,
    tokenizer: Callable,
    voc_root: str | Path,
    split: str = "test",
    eval_cfg: EvalConfig | None = None,
    out_dir: str | Path | None = None,
    options: ZeroshotSettings | None = None,
    device: torch.device | str | None = None,
) -> ZeroshotReport:
    """Evaluate `model` zero-shot on a VOC split; with `out_dir`, write report.json, report.md, scores.csv,
    thresholds.json and plots there. Returns the report (with its `files` when written)."""
    opts = options or ZeroshotSettings()
    result = evaluate_zeroshot(model, image_transform, tokenizer, voc_root, split, eval_cfg, opts, device)
    if out_dir is None:
        return result.report
    return write_outputs(result.report, result.evaluated, Path(out_dir), plots=opts.plots)
