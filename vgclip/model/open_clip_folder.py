"""open_clip's model folder, the format `vgclip export` writes, read back as a vgclip model (no open_clip needed).

The folder's names (OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE, POOLERS) and NAME_MAP, the one table of
vgclip weight names <-> open_clip weight names that export/open_clip.py writes with and this module reads with.

The folder's `open_clip_config.json` is read back into a vgclip ModelConfig (timm image tower, HF text
tower with mean / CLS-state pooling, bias-free linear projections), the towers are built with random
init and no network, and `open_clip_model.safetensors` is loaded under vgclip's names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from vgclip.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from vgclip.errors import ConfigError, VgclipError
from vgclip.model.clip import create_model
from vgclip.model.weights_file import load_state, read_safetensors

OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
# vgclip pooling -> open_clip HF pooler. Not "cls_pooler": with a model built from a config it would use
# BERT's pooler head (dense + tanh) instead of the CLS token state that vgclip pools.
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
# vgclip weight name <-> open_clip weight name, the one table export and loading both read. An entry
# ending in "." maps every name under that prefix; the others map one name.
NAME_MAP: tuple[tuple[str, str], ...] = (
    ("visual.trunk.", "visual.trunk."),
    ("text.transformer.", "text.transformer."),
    ("image_proj.weight", "visual.head.proj.weight"),
    ("text_proj.weight", "text.proj.weight"),
    ("logit_scale", "logit_scale"),
)


# --------------------------------------------------------------------------- weight names


def _renamed(key: str, to_open_clip: bool) -> str | None:
    """`key` under the other side's names (NAME_MAP), or None when the table has no entry for it."""
    for ours, theirs in NAME_MAP:
        source, target = (ours, theirs) if to_open_clip else (theirs, ours)
        if source.endswith(".") and key.startswith(source):
            return target + key[len(source) :]
        if key == source:
            return target
    return None


def open_clip_name(key: str) -> str | None:
    """open_clip's name for vgclip weight `key` (None: no counterpart)."""
    return _renamed(key, to_open_clip=True)


def vgclip_name(key: str) -> str | None:
    """vgclip's name for open_clip weight `key` (None: no counterpart)."""
    return _renamed(key, to_open_clip=False)


# --------------------------------------------------------------------------- reading a folder

# open_clip's defaults when a config has no preprocess_cfg mean/std (OPENAI_DATASET_MEAN / _STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_FILES = ("config.json", "tokenizer.json")


def is_open_clip_folder(folder: Path) -> bool:
    """Whether `folder` looks like an open_clip model folder (it has open_clip_config.json)."""
    return folder.is_dir() and (folder / OPEN_CLIP_CONFIG_FILE).is_file()


def read_open_clip_config(folder: Path) -> dict[str, Any]:
    """open_clip_config.json of `folder` as a dict; VgclipError naming the file when unreadable."""
    path = folder / OPEN_CLIP_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VgclipError(f"{path} is not a readable JSON file ({str(exc)[:200]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise VgclipError(f"{path} has no 'model_cfg' object; not an open_clip model config")
    return config


def _refuse(folder: Path, what: str) -> VgclipError:
    return VgclipError(f"open_clip folder {folder}: {what}; vgclip cannot build this model")


def image_config(folder: Path, model_cfg: dict, preprocess: dict) -> ImageTowerConfig:
    """The timm image tower of open_clip's TimmModel: network's own pooling and a bias-free linear head."""
    vision = model_cfg.get("vision_cfg") or {}
    name = vision.get("timm_model_name")
    if not name:
        raise _refuse(folder, "the image tower is not a timm model (open_clip's own ViT / ResNet towers)")
    for key, wanted, default in (("timm_pool", "", "avg"), ("timm_proj", "linear", "linear"),
                                 ("timm_proj_bias", False, False)):  # fmt: skip
        if vision.get(key, default) != wanted:
            raise _refuse(folder, f"vision_cfg.{key}={vision.get(key, default)!r} (vgclip: {wanted!r})")
    size = vision.get("image_size", 224)
    if isinstance(size, list) and len(set(size)) == 1:
        size = size[0]
    if not isinstance(size, int):
        raise _refuse(folder, f"image_size {size!r} is not square")
    if preprocess.get("size", size) not in (size, [size, size]):
        raise _refuse(folder, f"preprocess size {preprocess['size']} differs from the tower's image_size {size}")
    for key, ours in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
        if preprocess.get(key, ours) != ours:
            # vgclip's eval transform is fixed: shorter side to the size (bicubic), centre crop.
            raise VgclipError(f"open_clip folder {folder}: preprocess {key}={preprocess[key]!r} differs from "
                              f"vgclip's eval transform ({key}={ours!r})")  # fmt: skip
    mean = tuple(float(v) for v in preprocess.get("mean", OPENAI_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", OPENAI_STD))
    return ImageTowerConfig(name=name, weights="none", image_size=size, mean=mean, std=std)


def text_source(folder: Path, text_cfg: dict) -> str:
    """Where the text tower's HF config and tokenizer are: the folder itself when it holds them (a moved
    export, or one downloaded from the Hub), else `hf_model_name` when that is an existing folder."""
    if all((folder / name).is_file() for name in TEXT_FILES):
        return str(folder)
    named = str(text_cfg.get("hf_model_name", ""))
    if named and all((Path(named) / name).is_file() for name in TEXT_FILES):
        return named
    raise VgclipError(
        f"open_clip folder {folder}: the text tower's {' and '.join(TEXT_FILES)} are neither in the folder nor in "
        f"hf_model_name {named!r} (a folder that does not exist here, or a Hub id: loading needs no network, so "
        f"copy those files into the folder)"
    )


def text_config(folder: Path, model_cfg: dict) -> TextTowerConfig:
    """The HF text tower of open_clip's HFTextEncoder: mean or CLS-state pooling, bias-free linear proj."""
    text = model_cfg.get("text_cfg") or {}
    if "hf_model_name" not in text:
        raise _refuse(folder, "the text tower is open_clip's own transformer, not a Hugging Face model")
    pooler = text.get("hf_pooler_type", "mean_pooler")  # the defaults are open_clip's CLIPTextCfg's
    pooling = {theirs: ours for ours, theirs in POOLERS.items()}.get(pooler)
    if pooling is None:
        raise _refuse(folder, f"text pooler {pooler!r} (vgclip: {', '.join(POOLERS.values())})")
    if text.get("hf_proj_type", "mlp") != "linear":
        raise _refuse(folder, f"text projection {text.get('hf_proj_type', 'mlp')!r} (vgclip: bias-free 'linear')")
    return TextTowerConfig(name=text_source(folder, text), weights="none",
                           max_length=int(text.get("context_length", 77)), pooling=pooling)  # fmt: skip


def vgclip_state_dict(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip weights under vgclip's names; VgclipError for a weight vgclip has no place for."""
    renamed = {}
    for key, tensor in state.items():
        name = vgclip_name(key)
        if name is None:
            raise _refuse(folder, f"weight '{key}' has no counterpart in vgclip's model")
        renamed[name] = tensor
    return renamed


def load_open_clip_export(folder: str | Path):
    """(model in eval mode, eval image transform, tokenizer) from an open_clip model folder, offline."""
    folder = Path(folder)
    config = read_open_clip_config(folder)
    model_cfg, preprocess = config["model_cfg"], config.get("preprocess_cfg") or {}
    weights = folder / OPEN_CLIP_WEIGHTS_FILE
    if not weights.is_file():
        raise VgclipError(f"open_clip folder {folder} has no {OPEN_CLIP_WEIGHTS_FILE} "
                          "(vgclip reads safetensors weights only)")  # fmt: skip
    state = vgclip_state_dict(folder, read_safetensors(weights))
    # open_clip scales logits by exp(logit_scale) as stored: let vgclip's cap sit at or above that value.
    scale = state.get("logit_scale")
    max_scale = max(100.0, math.exp(float(scale))) if scale is not None and scale.numel() == 1 else 100.0
    try:
        image = image_config(folder, model_cfg, preprocess)
        text = text_config(folder, model_cfg)
        model_config = ModelConfig(image=image, text=text, embed_dim=int(model_cfg.get("embed_dim", 0)),
                                   max_logit_scale=max_scale)  # fmt: skip
    except (ConfigError, TypeError, ValueError) as exc:
        raise VgclipError(f"open_clip folder {folder}: {OPEN_CLIP_CONFIG_FILE} does not describe a vgclip model "
                          f"({exc})") from None  # fmt: skip
    model, transform, tokenizer = create_model(model_config)
    load_state(model, state, str(weights))
    model.eval()
    return model, transform, tokenizer
