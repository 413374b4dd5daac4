"""Class names as readable text, prompt templates, and the zero-shot text classifier (one embedding per class)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import yaml

from vgclip.errors import VgclipError

# VOC's folder-style names -> words a caption would use.
READABLE_NAMES: dict[str, str] = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "motorbike": "motorbike",
}

SINGLE_TEMPLATE = "a photo of a {}."

# Our own ensemble: short, caption-like phrasings close to Visual Genome region descriptions.
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image containing a {}.",
    "a {} in the scene.",
    "there is a {} in this photo.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a {} seen from far away.",
    "a photo with a {} in it.",
    "the {}.",
)

TEMPLATE_SETS = ("single", "ensemble")


def readable_name(name: str, overrides: Mapping[str, str] | None = None) -> str:
    """The text used for class `name`: an override, the built-in readable form, or the name with _ as spaces."""
    if overrides and name in overrides:
        return overrides[name]
    return READABLE_NAMES.get(name, name.replace("_", " "))


def load_name_overrides(path: str | Path | None) -> dict[str, str]:
    """A YAML mapping `class: "readable text"` (empty when no path is given); keys may be multi-word
    ("traffic light: traffic signal")."""
    if not path:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise VgclipError(f"{path}: cannot read class-name overrides ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise VgclipError(f"{path}: class-name overrides must map each class to a non-empty string")
    # YAML reads some bare keys as other types (yes/no/on/off -> bool, 1 -> int); str() of those would
    # silently name a different class, so ask for quotes instead.
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise VgclipError(f"{path}: YAML reads key {odd[0]!r} as {type(odd[0]).__name__}, not a class name; "
                          "quote class names such as yes, no, on, off or numbers")  # fmt: skip
    return {k.strip(): v.strip() for k, v in data.items()}


def templates_for(kind: str) -> tuple[str, ...]:
    """The prompt templates of `eval.templates`: "single", "ensemble", or a file with one template per line."""
    if kind == "single":
        return (SINGLE_TEMPLATE,)
    if kind == "ensemble":
        return ENSEMBLE_TEMPLATES
    if Path(kind).suffix or "/" in kind or Path(kind).is_file():
        return read_template_file(kind)
    raise VgclipError(f"eval.templates must be one of {', '.join(TEMPLATE_SETS)} or a file, got {kind!r}")


def read_template_file(path: str | Path) -> tuple[str, ...]:
    """Templates from a file, one per line with `{}` (or CLIP_benchmark's `{c}`) where the class text goes."""
    from vgclip.names import read_name_file

    templates = tuple(t.replace("{c}", "{}") for t in read_name_file(path, "template list"))
    for template in templates:
        rest = template.replace("{}", "", 1)
        if "{" in rest or "}" in rest or rest == template:  # str.format would fail or drop the class
            raise VgclipError(f"{path}: template {template!r} must hold exactly one {{}} (or {{c}}) placeholder")
    return templates


@torch.inference_mode()
def build_text_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Mapping[str, torch.Tensor]],
    class_texts: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Unit-norm class embeddings [C, D]: each class's template embeddings averaged, then renormalised (as CLIP).

    Prompts of several classes share one text-tower call (at most `batch_size` prompts per call).
    """
    prompts = [template.format(text) for text in class_texts for template in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = {k: v.to(device) for k, v in tokenizer(prompts[start : start + batch_size]).items()}
        chunks.append(model.encode_text(tokens, normalize=True).float())
    mean = torch.cat(chunks).reshape(len(class_texts), len(templates), -1).mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
