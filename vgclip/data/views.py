"""Several crops of one image for evaluation (`eval.crops=multi`), their embeddings averaged.

A centre crop drops whatever lies near the ends of the long side, and a small object takes few
pixels of it; in multi-label classification both cost recall. The views are the centre square,
the two end squares along the long side, and five zoomed squares (ZOOM of the shorter side: the
four corners and the centre). Averaging the unit embeddings of all views and renormalising gives
one embedding per image, so scoring, thresholds and reports work unchanged. Together the views cover
every pixel of images up to 3:1 (wider ones keep a gap between the centre and end squares).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from vgclip.data.transforms import ImageTransform, PixelTransform, centre_square, pil_to_chw, resize_box, stack_images
from vgclip.errors import VgclipError

ZOOM = 0.6  # side of the zoomed squares, as a fraction of the image's shorter side
VIEWS = 8


def crop_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The (left, top, width, height) boxes of the views of a width x height image, centre crop first."""
    left_f, top_f, right_f, bottom_f = centre_square((width, height))
    boxes = [(round(left_f), round(top_f), round(right_f - left_f), round(bottom_f - top_f))]
    side = min(width, height)
    boxes += [(0, 0, side, side), (width - side, height - side, side, side)]
    zoomed = max(1, round(ZOOM * side))
    for fx, fy in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)):
        boxes.append((round((width - zoomed) * fx), round((height - zoomed) * fy), zoomed, zoomed))
    return boxes


class MultiCropTransform:
    """PIL image or uint8 (3, H, W) -> normalised float (VIEWS, 3, S, S), channels-last in memory.

    Implements `PixelTransform` over an eval `ImageTransform` (same size, mean and std); picklable.
    """

    def __init__(self, base: ImageTransform) -> None:
        if base.train:
            raise ValueError("multi-crop views are for evaluation; got a train transform")
        self.base = base
        self.image_size = base.image_size
        # The zoomed squares are ZOOM of the shorter side: decode large enough not to upsample them.
        self.draft_size = math.ceil(base.image_size / ZOOM)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image | torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """uint8 (VIEWS, 3, S, S), one view per `crop_boxes` box (evaluation never flips)."""
        chw = image if isinstance(image, torch.Tensor) else pil_to_chw(image)
        height, width = chw.shape[-2:]
        return stack_images([resize_box(chw, box, self.image_size) for box in crop_boxes(width, height)])

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
