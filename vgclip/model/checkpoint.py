"""Model checkpoints: weights as safetensors + the resolved config + the text tower's files.

A run folder holds everything needed to rebuild the model with no network and no weight
packages: `config.yaml`, `text_tower/` (HF config.json + tokenizer files) and `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vgclip.config import Config, EvalConfig, load_config, save_config
from vgclip.errors import ConfigError, VgclipError
from vgclip.io import atomic_path, replace_folder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TEXT_TOWER_DIR = "text_tower"


# --------------------------------------------------------------------------- primitives


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write a flat dict of tensors to `path` atomically (tensors sharing memory are copied)."""
    from safetensors.torch import save_file

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
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VgclipError(f"weights file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise VgclipError(f"weights file {path} is not a valid safetensors file ({str(exc)[:200]})") from None


def save_weights(model: nn.Module, path: str | Path) -> None:
    """model.state_dict() -> safetensors file (atomic)."""
    write_safetensors(path, model.state_dict(), metadata={"format": "pt", "producer": "vgclip"})


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Read a safetensors file into `model`; VgclipError listing the keys that do not fit."""
    load_state(model, read_safetensors(path), str(path), strict=strict)


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


# --------------------------------------------------------------------------- run folders


def save_text_tower_files(folder: str | Path, model: nn.Module, tokenizer) -> None:
    """Write the text tower's HF config.json and tokenizer files to `folder`, replacing it atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.text.transformer.config.save_pretrained(str(tmp))
        tokenizer.save(tmp)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(run_dir: str | Path, model: nn.Module, tokenizer, config: Config) -> Path:
    """Write RUN/config.yaml, RUN/text_tower/ and RUN/model.safetensors; return the weights path.

    The weights are written last, so their presence means the folder is complete.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    save_text_tower_files(run_dir / TEXT_TOWER_DIR, model, tokenizer)
    weights = run_dir / WEIGHTS_FILE
    save_weights(model, weights)
    return weights


def _locate(path: Path) -> tuple[Path, Path]:
    """(folder holding config.yaml + text_tower/, weights file) for a run folder or a file inside it."""
    if not path.exists():
        raise VgclipError(f"checkpoint {path} does not exist (expected a run folder, its {WEIGHTS_FILE}, "
                          f"or an open_clip export folder)")  # fmt: skip
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if weights.suffix != ".safetensors":
        weights = path.parent / WEIGHTS_FILE
    folder = run_folder_of(weights.parent) or weights.parent
    missing = [
        name
        for name, ok in (
            (WEIGHTS_FILE if weights.parent == folder else str(weights), weights.is_file()),
            (CONFIG_FILE, (folder / CONFIG_FILE).is_file()),
            (f"{TEXT_TOWER_DIR}/config.json", (folder / TEXT_TOWER_DIR / "config.json").is_file()),
        )
        if not ok
    ]
    if missing:
        raise VgclipError(f"checkpoint {path} is incomplete: missing {', '.join(missing)} in {folder}")
    return folder, weights


def checkpoint_config(run_dir: str | Path) -> Config:
    """The model config for rebuilding a saved model offline: random init, text tower from RUN/text_tower."""
    from vgclip.model.text_tower import text_tower_overrides_cleared

    run_dir = Path(run_dir)
    config = load_config(str(run_dir / CONFIG_FILE))
    model_cfg = dataclasses.replace(
        config.model,
        image=dataclasses.replace(config.model.image, weights="none"),
        text=text_tower_overrides_cleared(config.model.text, run_dir / TEXT_TOWER_DIR),
    )
    return dataclasses.replace(config, model=model_cfg)


def open_clip_folder_of(path: Path) -> Path | None:
    """The open_clip export folder `path` is, or holds the file `path` (None for anything else)."""
    from vgclip.export.open_clip_load import is_open_clip_folder

    folder = path if path.is_dir() else path.parent
    return folder if is_open_clip_folder(folder) and not (folder / CONFIG_FILE).is_file() else None


def load_checkpoint(path: str | Path):
    """Rebuild (model, eval image transform, tokenizer) from a run folder, its model.safetensors, or an
    open_clip export folder (`vgclip export`, or any open_clip folder with towers vgclip builds).

    Needs no hub access and no weight packages: both towers are built with random init from the
    saved config, then the saved weights are loaded strictly. The model is returned in eval mode.
    """
    from vgclip.model.clip import create_model

    export = open_clip_folder_of(Path(path))
    if export is not None:
        from vgclip.export.open_clip_load import load_open_clip_export

        return load_open_clip_export(export)
    run_dir, weights = _locate(Path(path))
    model, transform, tokenizer = create_model(checkpoint_config(run_dir))
    load_weights(model, weights, strict=True)
    model.eval()
    return model, transform, tokenizer


def run_folder_of(folder: Path) -> Path | None:
    """The run folder (config.yaml + text_tower/) that `folder` is or lies in, or None.

    A step checkpoint (RUN/checkpoints/step-N/) relies on the run folder's config and tower files.
    """
    for candidate in [folder, *list(folder.parents)[:2]]:
        if (candidate / CONFIG_FILE).is_file() and (candidate / TEXT_TOWER_DIR / "config.json").is_file():
            return candidate
    return None


def checkpoint_eval_config(checkpoint: str | Path, overrides: list[str]) -> EvalConfig:
    """The eval settings of a run (its config.yaml `eval` section, defaults when not found), with
    `eval.*` overrides applied; `key=value` without a section means `eval.key=value`."""
    fixed = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if "." in key and not key.startswith("eval."):
            raise ConfigError(f"override {item!r}: only eval.* settings can be changed here")
        fixed.append(item if key.startswith("eval.") else f"eval.{item}")
    path = Path(checkpoint)
    run_dir = run_folder_of(path if path.is_dir() else path.parent)
    return load_config(str(run_dir / CONFIG_FILE) if run_dir else None, fixed).eval
