"""Image transforms of a tower: train-time augmentation and eval-time resize + centre crop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_image_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, image_size, image_size).

    Train: random resized crop (scale 0.5-1, mild so the described objects usually stay in view)
    and horizontal flip. Eval: resize the shorter side, centre crop.
    """
    to_rgb = T.Lambda(_to_rgb)
    normalize = T.Normalize(mean=list(mean), std=list(std))
    if train:
        steps = [
            to_rgb,
            T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ]
    else:
        steps = [
            to_rgb,
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
        ]
    return T.Compose([*steps, T.ToTensor(), normalize])


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
