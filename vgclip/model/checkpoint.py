"""Model checkpoints: weights as safetensors + the resolved config + the text tower's files.

A run folder holds everything needed to rebuild the model with no network and no weight
packages: `config.yaml`, `text_tower/` (HF config.json + tokenizer files) and `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from torch import nn

from vgclip.config import Config, EvalConfig, load_config, save_config
from vgclip.errors import ConfigError, VgclipError
from vgclip.io import replace_folder
from vgclip.model.clip import create_model
from vgclip.model.text_tower import text_tower_overrides_cleared
from vgclip.model.weights_file import load_state, read_safetensors, write_safetensors

# A run folder's files (an open_clip folder's are OPEN_CLIP_* in model/open_clip_folder.py).
RUN_WEIGHTS_FILE = "model.safetensors"
RUN_CONFIG_FILE = "config.yaml"
TEXT_TOWER_DIR = "text_tower"


# --------------------------------------------------------------------------- weights


def save_weights(model: nn.Module, path: str | Path) -> None:
    """model.state_dict() -> safetensors file (atomic)."""
    write_safetensors(path, model.state_dict(), metadata={"format": "pt", "producer": "vgclip"})


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Read a safetensors file into `model`; VgclipError listing the keys that do not fit."""
    load_state(model, read_safetensors(path), str(path), strict=strict)


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
    save_config(config, run_dir / RUN_CONFIG_FILE)
    save_text_tower_files(run_dir / TEXT_TOWER_DIR, model, tokenizer)
    weights = run_dir / RUN_WEIGHTS_FILE
    save_weights(model, weights)
    return weights


def _locate(path: Path) -> tuple[Path, Path]:
    """(folder holding config.yaml + text_tower/, weights file) for a run folder or a file inside it."""
    if not path.exists():
        raise VgclipError(f"checkpoint {path} does not exist (expected a run folder or its {RUN_WEIGHTS_FILE})")
    weights = path / RUN_WEIGHTS_FILE if path.is_dir() else path
    if weights.suffix != ".safetensors":
        weights = path.parent / RUN_WEIGHTS_FILE
    folder = run_folder_of(weights.parent) or weights.parent
    missing = [
        name
        for name, ok in (
            (RUN_WEIGHTS_FILE if weights.parent == folder else str(weights), weights.is_file()),
            (RUN_CONFIG_FILE, (folder / RUN_CONFIG_FILE).is_file()),
            (f"{TEXT_TOWER_DIR}/config.json", (folder / TEXT_TOWER_DIR / "config.json").is_file()),
        )
        if not ok
    ]
    if missing:
        raise VgclipError(f"checkpoint {path} is incomplete: missing {', '.join(missing)} in {folder}")
    return folder, weights


def checkpoint_config(run_dir: str | Path) -> Config:
    """The model config for rebuilding a saved model offline: random init, text tower from RUN/text_tower."""
    run_dir = Path(run_dir)
    config = load_config(str(run_dir / RUN_CONFIG_FILE))
    model_cfg = dataclasses.replace(
        config.model,
        image=dataclasses.replace(config.model.image, weights="none"),
        text=text_tower_overrides_cleared(config.model.text, run_dir / TEXT_TOWER_DIR),
    )
    return dataclasses.replace(config, model=model_cfg)


def load_run_checkpoint(path: str | Path):
    """Rebuild (model, eval image transform, tokenizer) from a run folder, a weights file in it
    (model.safetensors, best.safetensors) or a step checkpoint (RUN/checkpoints/step-N[/model.safetensors]).

    Needs no hub access and no weight packages: both towers are built with random init from the
    saved config, then the saved weights are loaded strictly. The model is returned in eval mode.
    """
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
        if (candidate / RUN_CONFIG_FILE).is_file() and (candidate / TEXT_TOWER_DIR / "config.json").is_file():
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
    return load_config(str(run_dir / RUN_CONFIG_FILE) if run_dir else None, fixed).eval
