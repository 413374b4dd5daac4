"""Image transforms of a tower: train-time augmentation and eval-time resize + centre crop.

Both resample only the needed source box (instead of resize-everything-then-crop), on uint8
pixels with torchvision's antialiased bicubic kernel (PIL's filter), then convert to normalised
float: the same picture as RandomResizedCrop / Resize + CenterCrop + ToTensor + Normalize on PIL
images (the centre crop may sit a fraction of a pixel apart: a few grey levels), at a fraction of
the cost, which matters because decoding and transforms are the loader's bottleneck.

`PixelTransform` is the contract between a transform and the loaders (the shard loader, the LiT
feature cache, the zero-shot image list): how small an image it can take without upsampling
(`draft_size`, so the JPEG decoder may downscale while decoding), the per-image uint8 part
(`pixels`, which also takes uint8 (3, H, W) tensors and lets the caller decide the flip) and the
per-batch float part (`normalize`). `ImageTransform` implements it.
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
    draft_size: int

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
        # only TRAIN_SCALE[0] of the area, i.e. sqrt(0.5) of the side.
        self.draft_size = math.ceil(image_size / math.sqrt(TRAIN_SCALE[0])) if train else self.image_size
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
        height, width = chw.shape[-2:]
        if self.train:
            top, left, h, w = T.RandomResizedCrop.get_params(chw, TRAIN_SCALE, TRAIN_RATIO)
            flip = bool(torch.rand(()) < 0.5) if flip is None else flip
        else:
            left_f, top_f, right_f, bottom_f = centre_square((width, height))
            left, top, w, h = round(left_f), round(top_f), round(right_f - left_f), round(bottom_f - top_f)
            flip = False
        out = resize_box(chw, (left, top, w, h), self.image_size)
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


def resize_box(chw: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The (left, top, width, height) box of a uint8 (3, H, W) image resized to uint8 (3, size, size),
    channels-last in memory."""
    left, top, w, h = box
    # torch's uint8 antialiased bicubic kernel matches PIL's bicubic resize (within a few grey
    # levels) at about a third of the cost. Its fast path wants a channels-last contiguous
    # input: a cropped view is not, and copying the crop first is cheaper than the slow path
    # (numpy copies the HWC rows with memcpy, twice as fast as torch's strided copy).
    hwc = chw.permute(1, 2, 0)[top : top + h, left : left + w]
    if not hwc.is_contiguous():
        hwc = torch.from_numpy(np.ascontiguousarray(hwc.numpy()))
    # unsqueeze gives the batch dimension a full image's stride, so torch sees channels-last
    # (a size-1 batch with stride 3 is ambiguous, and it then writes NCHW output one byte at a
    # time: a third of the resize). The output stays channels-last; `stack_images` keeps it so.
    crop = hwc.unsqueeze(0).permute(0, 3, 1, 2)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


def pil_to_chw(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W), a channels-last view of the one copy out of PIL."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    with warnings.catch_warnings():
        # PIL's array is read-only; nothing writes to it (the resize makes a new tensor).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


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
    """PIL image -> normalised float tensor (3, image_size, image_size), channels-last in memory.

    Train: random resized crop (area 0.5-1, aspect 3/4-4/3, bicubic) and horizontal flip, drawn
    from torch's RNG. Eval: resize the shorter side to image_size, centre crop.
    """
    return ImageTransform(image_size, mean, std, train)
