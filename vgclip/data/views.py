"""Several crops of one image for evaluation (`eval.crops=multi`), their embeddings averaged.

A centre crop drops whatever lies near the ends of the long side, and a small object takes few
pixels of it; in multi-label classification both cost recall. The views are torchvision operations,
with torchvision's sizes and rounding: the centre square and the two end squares of `Resize(S)`
(`CenterCrop(S)` and the corners of the long side), and `FiveCrop(S)` of `Resize(round(S / ZOOM))`
(the four corners and the centre, zoomed in). Averaging the unit embeddings of all views and
renormalising gives one embedding per image, so scoring, thresholds and reports work unchanged.
Together the views cover every pixel of images up to 3:1 (wider ones keep a gap between the centre
and end squares).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from vgclip.data.transforms import (
    ImageTransform,
    PixelTransform,
    centre_crop_offset,
    crop_square,
    pil_to_chw,
    resize_box,
    resized_size,
    stack_images,
)
from vgclip.errors import VgclipError

ZOOM = 0.6  # side of the zoomed squares, as a fraction of the image's shorter side
VIEWS = 8


@dataclass(frozen=True)
class View:
    """One view: torchvision's `Resize(short_side)` of the image, then the S x S square at (left, top)."""

    short_side: int
    left: int
    top: int


def crop_views(width: int, height: int, size: int) -> list[View]:
    """The VIEWS views of a width x height image at model input side `size`, centre crop first."""
    near_w, near_h = resized_size(width, height, size)
    views = [View(size, *centre_crop_offset(near_w, near_h, size)), View(size, 0, 0),
             View(size, near_w - size, near_h - size)]
    far = round(size / ZOOM)
    far_w, far_h = resized_size(width, height, far)
    corners = ((0, 0), (far_w - size, 0), (0, far_h - size), (far_w - size, far_h - size))  # FiveCrop's order
    views += [View(far, left, top) for left, top in corners]
    return views + [View(far, *centre_crop_offset(far_w, far_h, size))]


class MultiCropTransform:
    """PIL image or uint8 (3, H, W) -> normalised float (VIEWS, 3, S, S), channels-last in memory.

    Implements `PixelTransform` over an eval `ImageTransform` (same size, mean and std); picklable.
    """

    def __init__(self, base: ImageTransform) -> None:
        if base.train:
            raise ValueError("multi-crop views are for evaluation; got a train transform")
        self.base = base
        self.image_size = base.image_size
        self.draft_size = None  # full-size decode, as the centre transform (torchvision's pixels)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image | torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """uint8 (VIEWS, 3, S, S), one view per `crop_views` view (evaluation never flips)."""
        chw = image if isinstance(image, torch.Tensor) else pil_to_chw(image)
        height, width = chw.shape[-2:]
        resized: dict[int, torch.Tensor] = {}  # two resizes serve the eight views
        out = []
        for view in crop_views(width, height, self.image_size):
            if view.short_side not in resized:
                resized[view.short_side] = resize_box(chw, None, resized_size(width, height, view.short_side))
            out.append(crop_square(resized[view.short_side], view.left, view.top, self.image_size))
        return stack_images(out)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """As `ImageTransform.normalize`, for any leading dimensions."""
        return self.base.normalize(pixels)

    def __repr__(self) -> str:
        return f"MultiCropTransform({VIEWS} views, {self.base!r})"


def eval_transform(transform: PixelTransform | Callable, crops: str) -> PixelTransform | Callable:
    """The eval transform for `eval.crops`: `transform` itself for "centre", its multi-crop form for "multi"."""
    if crops == "centre" or isinstance(transform, MultiCropTransform):
        return transform
    if crops != "multi":
        raise VgclipError(f"eval.crops={crops!r}: expected centre or multi")
    if not isinstance(transform, ImageTransform):
        raise VgclipError(f"eval.crops=multi needs vgclip's eval image transform, got {type(transform).__name__}")
    return MultiCropTransform(transform)


def unit_image_encoder(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.encode_image` on channels-last input (the fast layout for oneDNN and tensor cores), asking for
    unit embeddings explicitly: open_clip models default to unnormalised features."""
    return lambda images: model.encode_image(images.contiguous(memory_format=torch.channels_last), normalize=True)


def encode_views(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Unit embeddings [B, D] of a batch [B, 3, S, S], or of a multi-crop batch [B, V, 3, S, S] (the mean
    of each image's view embeddings, renormalised). `encode` maps [N, 3, S, S] to unit embeddings [N, D]
    (`unit_image_encoder`)."""
    if images.dim() == 4:
        return encode(images)
    batch, views = images.shape[:2]
    flat = images.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # a view for `stack_images` batches
    return F.normalize(encode(flat).view(batch, views, -1).float().mean(1), dim=-1)
