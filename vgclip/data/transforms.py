"""Image transforms of a tower: train-time augmentation and eval-time resize + centre crop.

Both run on uint8 pixels with torch's antialiased bicubic kernel (PIL's filter, within a rounding
step), then convert to normalised float. Train: RandomResizedCrop + flip, resampling only the
drawn source box (the loader's bottleneck). Eval: exactly torchvision's `Resize(S, bicubic,
antialias) + CenterCrop(S)`, the preprocessing of open_clip and CLIP_benchmark, with sizes and
offsets computed as torchvision computes them (`resized_size`, `centre_crop_offset`), on the
full-size decode, so an exported model sees a photo as vgclip does.

`PixelTransform` is the contract between a transform and the loaders (the shard loader, the LiT
feature cache, the zero-shot image list): how small an image it can take without upsampling
(`draft_size`, so the JPEG decoder may downscale while decoding; None: decode at full size), the
per-image uint8 part (`pixels`, which also takes uint8 (3, H, W) tensors and lets the caller decide
the flip) and the per-batch float part (`normalize`). `ImageTransform` implements it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random resized crop area range: mild, so the described objects usually stay in view.
TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


@runtime_checkable
class PixelTransform(Protocol):
    """What the loaders need of an image transform; `transform(image) == normalize(pixels(image))`."""

    # Smallest shorter side (px) the transform takes without upsampling: the decoder may shrink to it.
    # None: decode at full size (evaluation, whose pixels must equal torchvision's on the file).
    draft_size: int | None

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor: ...

    def pixels(self, image: Image.Image | torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """PIL image or uint8 (3, H, W) tensor -> uint8 (3, S, S); `flip=None`: the transform decides."""
        ...

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) -> the float model input, on the pixels' device."""
        ...


class ImageTransform:
    """PIL image -> normalised float tensor (3, image_size, image_size), channels-last in memory
    (batch with `stack_images`; `.contiguous()` for a planar copy). Picklable (used in workers).
    Implements `PixelTransform`."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], train: bool) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Smallest shorter side the transform can take without upsampling: a train crop may cover
        # only TRAIN_SCALE[0] of the area, i.e. sqrt(0.5) of the side. Evaluation decodes at full
        # size: a DCT-scaled decode moves photo embeddings as far as a misplaced crop does.
        self.draft_size = math.ceil(image_size / math.sqrt(TRAIN_SCALE[0])) if train else None
        # x/255 normalised in one multiply-add: (x - 255*mean) / (255*std).
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image | torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """The crop/resize/flip part, PIL image or uint8 (3, H, W) tensor -> uint8 (3, S, S) channels-last.

        The loader stacks these and calls `normalize` once per batch (a quarter of the memory
        traffic of stacking float images). At train time `flip=None` flips at random; the loader
        passes its own decision so it can mirror "left"/"right" in the paired phrase.
        """
        chw = image if isinstance(image, torch.Tensor) else pil_to_chw(image)
        if not self.train:  # Resize(S) + CenterCrop(S), as torchvision computes them
            resized = resize_box(chw, None, resized_size(chw.shape[-1], chw.shape[-2], self.image_size))
            left, top = centre_crop_offset(resized.shape[-1], resized.shape[-2], self.image_size)
            return crop_square(resized, left, top, self.image_size)
        top, left, h, w = T.RandomResizedCrop.get_params(chw, TRAIN_SCALE, TRAIN_RATIO)
        flip = bool(torch.rand(()) < 0.5) if flip is None else flip
        out = resize_box(chw, (left, top, w, h), (self.image_size, self.image_size))
        return out.flip(-1) if flip else out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> normalised float (x/255 - mean) / std, on the pixels' device.

        The training loop calls this after moving a batch of uint8 pixels to its device (a quarter
        of the bytes to copy; on a GPU the arithmetic is free), as timm's prefetching loader does.
        """
        # Copied to the device per call (a few bytes), not cached on self: the transform is pickled
        # into loader workers, which must not receive CUDA tensors.
        scale, shift = self._scale.to(pixels.device), self._shift.to(pixels.device)
        out = pixels.float()  # keeps the layout: channels-last pixels give channels-last floats
        if out.dim() >= 3 and not out.is_contiguous() and out.movedim(-3, -1).is_contiguous():
            # Channels-last: a (3, 1, 1) operand would broadcast over runs of 3 values (4x slower);
            # per-row patterns of length 3W vectorise like the planar case.
            rows = out.movedim(-3, -1).flatten(-2)  # (..., H, W * 3) view of the same memory
            width = out.shape[-1]
            rows.mul_(scale.view(-1).repeat(width)).add_(shift.view(-1).repeat(width))
            return out
        return out.mul_(scale).add_(shift)

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return f"ImageTransform({kind}, size={self.image_size}, mean={self.mean}, std={self.std})"


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (..., 3, H, W) images (or multi-crop views) into a batch; channels-last ones (`pixels`
    output) stay channels-last.

    A plain `torch.stack` of channels-last images gathers them byte by byte into NCHW, about six
    times slower than stacking their (..., H, W, 3) views, which is one copy per image.
    """
    same_shape = len({tuple(image.shape) for image in images}) == 1  # else torch.stack's own error
    if same_shape and all(image.dim() >= 3 and image.movedim(-3, -1).is_contiguous() for image in images):
        return torch.stack([image.movedim(-3, -1) for image in images]).movedim(-1, -3)
    return torch.stack(list(images))


def resize_box(chw: torch.Tensor, box: tuple[int, int, int, int] | None, size: tuple[int, int]) -> torch.Tensor:
    """The (left, top, width, height) box of a uint8 (3, H, W) image (None: all of it) resized to
    `size` = (width, height), uint8 (3, height, width) channels-last in memory."""
    left, top, w, h = box if box is not None else (0, 0, chw.shape[-1], chw.shape[-2])
    # torch's uint8 antialiased bicubic kernel matches PIL's bicubic resize (within a rounding
    # step) at about a third of the cost. Its fast path wants a channels-last contiguous
    # input: a cropped view is not, and copying the crop first is cheaper than the slow path
    # (numpy copies the HWC rows with memcpy, twice as fast as torch's strided copy).
    hwc = chw.permute(1, 2, 0)[top : top + h, left : left + w]
    if not hwc.is_contiguous():
        hwc = torch.from_numpy(np.ascontiguousarray(hwc.numpy()))
    # unsqueeze gives the batch dimension a full image's stride, so torch sees channels-last
    # (a size-1 batch with stride 3 is ambiguous, and it then writes NCHW output one byte at a
    # time: a third of the resize). The output stays channels-last; `stack_images` keeps it so.
    crop = hwc.unsqueeze(0).permute(0, 3, 1, 2)
    return F.interpolate(crop, size=(size[1], size[0]), mode="bicubic", antialias=True)[0]


def crop_square(chw: torch.Tensor, left: int, top: int, side: int) -> torch.Tensor:
    """The side x side square at (left, top) of a (3, H, W) image, as a channels-last copy."""
    return chw.movedim(-3, -1)[top : top + side, left : left + side].contiguous().movedim(-1, -3)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size)`: the shorter side becomes `size`, the
    longer one scales with it and is truncated to an integer (torchvision's own rule)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def centre_crop_offset(width: int, height: int, side: int) -> tuple[int, int]:
    """(left, top) of torchvision's `CenterCrop(side)` in a width x height image (Python's round)."""
    return int(round((width - side) / 2.0)), int(round((height - side) / 2.0))


def pil_to_chw(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W), a channels-last view of the one copy out of PIL."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    with warnings.catch_warnings():
        # PIL's array is read-only; nothing writes to it (the resize makes a new tensor).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def build_image_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train: bool = False,
) -> ImageTransform:
    """PIL image -> normalised float tensor (3, image_size, image_size), channels-last in memory.

    Train: random resized crop (area 0.5-1, aspect 3/4-4/3, bicubic) and horizontal flip, drawn
    from torch's RNG. Eval: torchvision's Resize(image_size) + CenterCrop(image_size).
    """
    return ImageTransform(image_size, mean, std, train)
