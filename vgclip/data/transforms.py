"""Image transforms of a tower: train-time augmentation and eval-time resize + centre crop.

Both are one PIL resample of just the needed source box (instead of resize-everything-then-crop)
followed by a fused uint8 -> normalised float conversion: the same result as torchvision's
RandomResizedCrop / Resize + CenterCrop + ToTensor + Normalize, at a fraction of the cost, which
matters because image decoding and transforms are the loader's bottleneck.

The transform objects also say how small an image they can take without upsampling
(`draft_size`), so the loader can let the JPEG decoder downscale while decoding (PIL `draft`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random resized crop area range: mild, so the described objects usually stay in view.
TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


class ImageTransform:
    """PIL image -> normalised float tensor (3, image_size, image_size). Picklable (used in workers)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], train: bool) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Smallest shorter side the transform can take without upsampling: a train crop may cover
        # only TRAIN_SCALE[0] of the area, i.e. sqrt(0.5) of the side.
        self.draft_size = math.ceil(image_size / math.sqrt(TRAIN_SCALE[0])) if train else self.image_size
        # x/255 normalised in one multiply-add: (x - 255*mean) / (255*std).
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        if self.train:
            top, left, height, width = T.RandomResizedCrop.get_params(image, TRAIN_SCALE, TRAIN_RATIO)
            out = image.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
            if torch.rand(()) < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            out = image.resize(size, Image.Resampling.BICUBIC, box=centre_square(image.size))
        return self.to_tensor(out)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """(H, W, 3) uint8 PIL image -> normalised float (3, H, W)."""
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return torch.addcmul(self._shift, pixels.float(), self._scale).contiguous()

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return f"ImageTransform({kind}, size={self.image_size}, mean={self.mean}, std={self.std})"


def centre_square(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred square box (left, top, right, bottom) with the shorter side of `size`.

    Resizing this box to S x S equals resizing the shorter side to S and centre-cropping S x S.
    """
    width, height = size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def build_image_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train: bool = False,
) -> ImageTransform:
    """PIL image -> normalised float tensor (3, image_size, image_size).

    Train: random resized crop (area 0.5-1, aspect 3/4-4/3, bicubic) and horizontal flip, drawn
    from torch's RNG. Eval: resize the shorter side to image_size, centre crop.
    """
    return ImageTransform(image_size, mean, std, train)
