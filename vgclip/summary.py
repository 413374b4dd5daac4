"""`TrainSummary`: what `train()` reports about a run, handed to the run's model card (export/run_facts.py)
and printed as JSON by `vgclip train` (`to_dict()`, the edge). Lives below train/ and export/ so both read it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainSummary"]


@dataclass(frozen=True)
class TrainSummary:
    """One training session's outcome (positions and counts over the whole run, timing of this session)."""

    run_dir: str = ""
    steps: int = 0
    epochs: int = 0
    train_samples: int = 0
    samples_seen: int = 0
    final_train_loss: float = float("nan")
    val: dict[str, float] = field(default_factory=dict)  # the last validation's loss and recall@K
    best_val_loss: float | None = None
    best_zeroshot_map: float | None = None
    best: dict[str, Any] | None = None  # RUN/best.safetensors: select_by, value, checkpoint, step, epoch, weights
    bad_steps: int = 0
    seconds: float = 0.0
    steps_this_session: int = 0
    data: str | None = None
    val_data: str | None = None
    val_voc_root: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # samples skipped by reason, every rank
    failed_shards: list[str] = field(default_factory=list)  # shards that broke off (their URLs)
    zeroshot: dict[str, Any] | None = None  # `--voc-root`: mAP, chance_mean, report folder (or error)

    @property
    def resumed(self) -> bool:
        """Whether this session continued an earlier one (it ran fewer steps than the run has)."""
        return self.steps_this_session < self.steps

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `vgclip train` prints (`zeroshot` only when the final model was evaluated)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.zeroshot is None:
            del out["zeroshot"]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainSummary:
        """A summary from its JSON object (keys it does not know are left out, missing ones get defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})
