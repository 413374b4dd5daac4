"""`vgclip.load_checkpoint`: what kind of folder a path is, and the loader for that kind.

Above model/checkpoint.py (run folders: the folder, its model.safetensors / best.safetensors, a step
checkpoint RUN/checkpoints/step-N) and model/open_clip_folder.py (open_clip folders: `vgclip export`'s, or
any whose towers vgclip builds), so neither needs to know about the other.
"""

from __future__ import annotations

from pathlib import Path

from vgclip.errors import VgclipError
from vgclip.model.checkpoint import RUN_CONFIG_FILE, RUN_WEIGHTS_FILE, load_run_checkpoint
from vgclip.model.open_clip_folder import is_open_clip_folder, load_open_clip_export


def open_clip_folder_of(path: Path) -> Path | None:
    """The open_clip export folder `path` is, or holds the file `path` (None for anything else)."""
    folder = path if path.is_dir() else path.parent
    return folder if is_open_clip_folder(folder) and not (folder / RUN_CONFIG_FILE).is_file() else None


def load_checkpoint(path: str | Path):
    """Rebuild (model, eval image transform, tokenizer) from a run folder, its model.safetensors, or an
    open_clip export folder (`vgclip export`, or any open_clip folder with towers vgclip builds).

    Needs no hub access and no weight packages: both towers are built with random init from the
    saved config, then the saved weights are loaded strictly. The model is returned in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise VgclipError(f"checkpoint {path} does not exist (expected a run folder, its {RUN_WEIGHTS_FILE}, "
                          f"or an open_clip export folder)")  # fmt: skip
    export = open_clip_folder_of(path)
    if export is not None:
        return load_open_clip_export(export)
    return load_run_checkpoint(path)
