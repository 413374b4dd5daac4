"""A vgclip run as an open_clip model folder, loadable with `open_clip.create_model_and_transforms("local-dir:DIR")`.

The folder holds what open_clip's local-dir / hf-hub loaders read:
  open_clip_config.json        `model_cfg` (timm image tower, HF text tower, linear projections) + `preprocess_cfg`
  open_clip_model.safetensors  the weights under open_clip's module names
  config.json + tokenizer files  the text tower's HF architecture and tokenizer (open_clip's HFTokenizer)

vgclip's towers map onto open_clip's adapters one to one: the timm trunk (created with `num_classes=0`, the
model's own pooling) is TimmModel with `timm_pool=""` (keep the network's pooling) and a bias-free linear
`head.proj`; the transformers encoder with mean / CLS pooling is HFTextEncoder with `mean_pooler` /
`cls_last_hidden_state_pooler` and a bias-free linear `proj`. Everything else is refused with a one-line error.
Before the folder appears, open_clip rebuilds the model from it and its embeddings are compared with vgclip's.
The folder's file names and the weight-name table (NAME_MAP) live in model/open_clip_folder.py, which reads
such a folder back into a vgclip model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vgclip.errors import VgclipError
from vgclip.export.model_card import final_model_run, write_export_card
from vgclip.io import atomic_write_text, replace_folder
from vgclip.load import load_checkpoint
from vgclip.model.clip import ClipModel
from vgclip.model.open_clip_folder import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE, POOLERS, open_clip_name
from vgclip.model.text_tower import Tokenizer
from vgclip.model.weights_file import write_safetensors

# Largest embedding difference the export accepts from open_clip's rebuild (same modules, same weights:
# only summation order differs, e.g. text padded to the context length instead of the longest prompt).
EXPORT_TOLERANCE = 1e-4
PROBE_TEXTS = ("a photo of a dog.", "a red car parked beside a tall tree", "sky")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where the export went and how closely open_clip's rebuild matched vgclip on probe inputs."""

    out_dir: Path
    files: tuple[str, ...]
    image_max_diff: float
    text_max_diff: float


def require_open_clip():
    """The open_clip module, or a VgclipError saying how to install it."""
    try:  # open_clip_torch is the optional `export` extra
        import open_clip
    except ImportError:
        raise VgclipError('exporting to open_clip needs open_clip_torch: pip install "vgclip[export]"') from None
    return open_clip


def check_expressible(model: ClipModel) -> None:
    """Raise VgclipError when a tower or head of `model` has no open_clip counterpart."""
    require_open_clip()
    from open_clip.hf_configs import arch_dict  # the optional `export` extra, checked just above

    text_cfg = model.config.text
    if text_cfg.pooling not in POOLERS:
        raise VgclipError(f"text pooling '{text_cfg.pooling}' has no open_clip pooler (supported: mean, cls)")
    model_type = model.text.transformer.config.model_type
    if model_type not in arch_dict:
        raise VgclipError(
            f"text tower type '{model_type}' is not supported by open_clip's HFTextEncoder "
            f"(supported: {', '.join(sorted(arch_dict))})"
        )
    if model.image_proj.bias is not None or model.text_proj.bias is not None:
        raise VgclipError("projection heads with a bias cannot be expressed in open_clip's linear projections")


def open_clip_config(model: ClipModel, text_source: str) -> dict[str, Any]:
    """open_clip_config.json for `model`; `text_source` is where open_clip finds the HF config and tokenizer."""
    cfg = model.config
    return {
        "model_cfg": {
            "embed_dim": int(cfg.embed_dim),
            "vision_cfg": {
                "timm_model_name": cfg.image.name,
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "timm_proj_bias": False,
                "timm_drop": 0.0,
                "image_size": int(model.image_size),
            },
            "text_cfg": {
                "hf_model_name": text_source,
                "hf_tokenizer_name": text_source,
                "hf_model_pretrained": False,
                "hf_proj_type": "linear",
                "hf_pooler_type": POOLERS[cfg.text.pooling],
                "context_length": int(cfg.text.max_length),
            },
        },
        # vgclip's eval transform: shorter side to `size` (bicubic, antialiased), centre crop, mean/std.
        "preprocess_cfg": {
            "size": int(model.image_size),
            "mode": "RGB",
            "mean": list(model.visual.mean),
            "std": list(model.visual.std),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def open_clip_state_dict(model: ClipModel) -> dict[str, torch.Tensor]:
    """vgclip's weights under open_clip's names (CustomTextCLIP with TimmModel + HFTextEncoder)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        name = open_clip_name(key)
        if name is None:
            raise VgclipError(f"weight '{key}' has no place in an open_clip model; this run cannot be exported")
        if key == "logit_scale":
            # vgclip clamps exp(logit_scale) at max_logit_scale when it scores; open_clip uses the value as
            # stored, so store the clamped value and both sides scale logits alike.
            tensor = tensor.detach().clamp(max=math.log(model.max_logit_scale))
        renamed[name] = tensor
    return renamed


def write_open_clip_folder(model: ClipModel, tokenizer: Tokenizer, folder: Path, text_source: str) -> list[str]:
    """Write the open_clip files for `model` into the existing `folder`; returns the file names."""
    check_expressible(model)
    model.text.transformer.config.save_pretrained(str(folder))
    tokenizer.save(folder)
    config_text = json.dumps(open_clip_config(model, text_source), indent=2) + "\n"
    atomic_write_text(folder / OPEN_CLIP_CONFIG_FILE, config_text)
    write_safetensors(folder / OPEN_CLIP_WEIGHTS_FILE, open_clip_state_dict(model),
                      metadata={"format": "pt", "producer": "vgclip export"})  # fmt: skip
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def load_open_clip_folder(folder: str | Path, text_source: str | None = None):
    """(model, preprocess, tokenizer) from an open_clip folder via open_clip's own local-dir loader.

    `text_source` overrides where the HF text config is read (used to check a folder before it is moved
    to the place its config names).
    """
    open_clip = require_open_clip()
    folder = Path(folder).resolve()
    kwargs: dict[str, Any] = {}
    if text_source is not None:
        text_cfg = json.loads((folder / OPEN_CLIP_CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
        kwargs["text_cfg"] = dict(text_cfg, hf_model_name=text_source, hf_model_pretrained=False)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", **kwargs)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise VgclipError(f"open_clip could not load {folder}: {first}") from None
    model.eval()
    return model, preprocess, tokenizer


@torch.inference_mode()
def embedding_differences(model: ClipModel, tokenizer: Tokenizer, oc_model: torch.nn.Module, oc_tokenizer,
                          images: torch.Tensor, texts: Sequence[str]) -> tuple[float, float]:  # fmt: skip
    """Largest absolute difference of the normalised image and text embeddings, vgclip vs open_clip."""
    image_diff = model.encode_image(images) - oc_model.encode_image(images, normalize=True)
    texts = list(texts)
    text_diff = model.encode_text(tokenizer(texts)) - oc_model.encode_text(oc_tokenizer(texts), normalize=True)
    return float(image_diff.abs().max()), float(text_diff.abs().max())


def probe_images(image_size: int, count: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed batch of normalised-range random images for comparing two implementations."""
    return torch.randn(count, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def export_open_clip(checkpoint: str | Path, out_dir: str | Path, hub_id: str | None = None,
                     overwrite: bool = False) -> ExportResult:  # fmt: skip
    """Export a run (folder or weights file) to `out_dir` in open_clip's layout, checked against open_clip.

    open_clip reads the text tower's HF config from `hf_model_name`: the export folder's absolute path by
    default, or `hub_id` (the Hub repo the folder will be uploaded to, which then serves config.json).
    """
    require_open_clip()
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not (out_dir.is_dir() and (overwrite or not any(out_dir.iterdir()))):
        raise VgclipError(f"{out_dir} exists and is not an empty folder (pass --overwrite to replace it)")
    model, _, tokenizer = load_checkpoint(checkpoint)
    check_expressible(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    try:
        files = write_open_clip_folder(model, tokenizer, staging, hub_id or str(out_dir))
        oc_model, _, oc_tokenizer = load_open_clip_folder(staging, text_source=str(staging))
        image_diff, text_diff = embedding_differences(
            model, tokenizer, oc_model, oc_tokenizer, probe_images(model.image_size), PROBE_TEXTS
        )
        if not (image_diff <= EXPORT_TOLERANCE and text_diff <= EXPORT_TOLERANCE):  # NaN fails too
            raise VgclipError(
                f"open_clip's rebuild of {checkpoint} differs from vgclip (largest embedding difference: image "
                f"{image_diff:.2e}, text {text_diff:.2e}; allowed {EXPORT_TOLERANCE:g}); not exported"
            )
        write_export_card(staging, out_dir, final_model_run(checkpoint), hub_id)
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir, tuple(files), image_diff, text_diff)
