"""Resuming a tagging job: the settings that decide its files are recorded in OUT/parts/settings.json when
it starts; a rerun with the same settings continues after the parts already complete, one with other
settings is refused in one line (or starts over with `--overwrite`)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from vgclip.errors import VgclipError
from vgclip.io import atomic_write_text
from vgclip.model.checkpoint import RUN_WEIGHTS_FILE
from vgclip.model.open_clip_folder import OPEN_CLIP_WEIGHTS_FILE

__all__ = ["SETTINGS_FILE", "JobSettings", "clear_outputs", "prepare_folder", "weights_file", "weights_sha256"]

SETTINGS_FILE = Path("parts") / "settings.json"
OUR_FILES = ("parts", "embeddings", "predictions.parquet", "predictions.csv", "skipped.csv", "summary.json")


@dataclass(frozen=True)
class JobSettings:
    """Everything that decides a job's rows, scores and embeddings (not the worker count nor the output format)."""

    checkpoint: str
    weights_sha256: str
    labels: tuple[str, ...]
    score: str
    templates: str
    crops: str
    thresholds: tuple[float, ...] | None
    class_texts: dict[str, str] | None
    image_size: int
    batch_size: int
    part_size: int
    inputs: str  # Inputs.fingerprint()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["thresholds"] = None if self.thresholds is None else list(self.thresholds)
        return data


def weights_file(checkpoint: str | Path) -> Path | None:
    """The weights file a checkpoint path loads: the file itself, or the run / open_clip folder's."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    for name in (RUN_WEIGHTS_FILE, OPEN_CLIP_WEIGHTS_FILE):
        if (path / name).is_file():
            return path / name
    return None


def weights_sha256(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's weights file ("" when it has none that we know of)."""
    path = weights_file(checkpoint)
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def clear_outputs(out: Path) -> None:
    """Remove every file a tagging job (and its re-tags) wrote in `out`; nothing else."""
    for name in OUR_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for retag in out.glob("retag-*"):
        if retag.is_dir():
            shutil.rmtree(retag)


def _differences(saved: dict, now: dict) -> list[str]:
    return [key for key in now if saved.get(key) != now[key]]


def prepare_folder(out: Path, settings: JobSettings, overwrite: bool) -> bool:
    """Make `out` ready for the job (called on rank 0 only); True when it resumes earlier parts.

    Refused with one line: a folder of another job's settings (unless `overwrite`: its outputs are
    removed), or a non-empty folder that is not a tagging job's."""
    path = out / SETTINGS_FILE
    now = json.loads(json.dumps(settings.to_dict()))  # as it reads back (tuples -> lists)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise VgclipError(f"{path}: cannot read ({exc}); rerun with --overwrite to start over") from None
        changed = _differences(saved, now)
        if not changed:
            return True
        if not overwrite:
            raise VgclipError(f"--out {out} holds a run with other settings ({', '.join(changed)} differ): "
                              "give another --out, or --overwrite to replace it")
        clear_outputs(out)
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise VgclipError(f"--out {out} is not empty and holds no `vgclip predict` run: give a new or empty "
                              "folder (or --overwrite to replace the predict outputs there)")
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(now, indent=2) + "\n")
    return False
