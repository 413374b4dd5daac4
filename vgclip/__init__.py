"""vgclip: CLIP re-created on Visual Genome, used as a zero-shot multi-label classifier.

Public API::

    model, image_transform, tokenizer = vgclip.create_model(vgclip.load_config("offline-small"))
    model, image_transform, tokenizer = vgclip.load_checkpoint("runs/demo")
    loss = vgclip.ClipLoss()(out["image_embeds"], out["text_embeds"], out["logit_scale"])

Heavy modules (torch, timm, transformers) are imported on first use, so `import vgclip` is cheap.
"""

from __future__ import annotations

from typing import Any

from vgclip.config import Config, load_config
from vgclip.errors import VgclipError

__version__ = "0.1.0"
__all__ = ["Config", "ClipLoss", "VgclipError", "create_model", "load_checkpoint", "load_config"]

_LAZY = {
    "create_model": "vgclip.model.clip",
    "ClipLoss": "vgclip.model.loss",
    "load_checkpoint": "vgclip.load",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vgclip' has no attribute {name!r}")
