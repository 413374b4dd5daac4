"""Safetensors files of model weights: the one place vgclip reads and writes them.

Used by run folders (model/checkpoint.py), open_clip folders (model/open_clip_folder.py and
export/open_clip.py) and a run's best weights (train/best_weights.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vgclip.errors import VgclipError
from vgclip.io import atomic_path


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write a flat dict of tensors to `path` atomically (tensors sharing memory are copied)."""
    seen: set[tuple[int, int]] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses aliased storage (e.g. tied embeddings); give duplicates their own copy.
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            tensor = tensor.clone()
        seen.add(ident)
        plain[key] = tensor
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU); VgclipError naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise VgclipError(f"weights file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise VgclipError(f"weights file {path} is not a valid safetensors file ({str(exc)[:200]})") from None


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load `state` into `model`; VgclipError naming `source` and the keys that do not fit."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise VgclipError(f"weights file {source} does not fit the model: {str(exc)[:300]}") from None
    if strict and (missing or unexpected):
        raise VgclipError(
            f"weights file {source} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
