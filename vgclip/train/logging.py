"""Metrics sinks: RUN/metrics.csv (always) and TensorBoard (when installed)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from vgclip.io import atomic_path

COLUMNS = ("step", "epoch", "split", "loss", "lr", "samples_per_s", "grad_norm",
           "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "zeroshot_map", "note")


class MetricsLogger:
    """Append rows to metrics.csv (one header, fixed columns) and mirror numbers to TensorBoard.

    Appending, rather than rewriting, keeps the rows of an interrupted run when it is resumed.
    Rows past the resume step are dropped on open, so a resumed run does not log a step twice.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.csv"
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log
        new = not self.path.is_file()
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._fh, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, split: str, **values: Any) -> None:
        """One row; numbers also go to TensorBoard as `split/name`."""
        row = {"step": step, "split": split}
        for key, value in values.items():
            row[key] = f"{value:.6g}" if isinstance(value, float) else value
        self._csv.writerow(row)
        self._fh.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        """Flush and close both sinks."""
        self._fh.close()
        if self.tb is not None:
            self.tb.close()
