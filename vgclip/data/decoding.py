"""Decoding shard and dataset images as cheaply as the transform allows, safely.

`decode_image` is the one entry point (the loader, the LiT feature cache and the zero-shot image
list call it). Two paths:

- `vgclip.data.jpeg_turbo` (speed path, `data.fast_decode=true`, the default): plain JPEGs are
  decoded by libjpeg-turbo at the smallest DCT scale that keeps the needed box (whole image or
  region crop) at least `draft_size` on its shorter side.
- PIL (this module): everything else, any JPEG the fast path refuses, and every image when
  `data.fast_decode=false`. JPEGs at least twice the needed size use PIL's own `draft` (1/2, 1/4,
  1/8 DCT scaling) unless `fast=False`, which decodes at full size: the reference the fast paths
  are tested against (mean difference after the transform: a few grey levels).

Both refuse non-image formats and decompression bombs before decoding (`vgclip.data.images`);
bad data raises `BadImageError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from vgclip.data import jpeg_turbo
from vgclip.data.images import BadImageError, check_pixel_count, load_image, open_image, to_rgb
from vgclip.data.pairing import Box

__all__ = ["BadImageError", "decode_image"]


def decode_image(key: str, data: bytes, *, draft_size: int | None, tensor_ok: bool,
                 crop_for: Callable[[tuple[int, int]], Box | None] | None = None,
                 fast: bool = True) -> Image.Image | torch.Tensor:
    """Pixels of the image in `data` (the box `crop_for(size)` picks, or all of it), RGB.

    `crop_for` is called once, with the (width, height) read from the header. `draft_size` is the
    shorter side the caller needs (the decode may be smaller than the file but never than that).
    `tensor_ok`: return a uint8 (3, H, W) channels-last tensor rather than a PIL image. `fast=False`
    turns off both speed paths (libjpeg-turbo scaling and PIL draft): a full-size PIL decode.
    """
    chosen: dict[tuple[int, int], Box | None] = {}

    def crop_of(size: tuple[int, int]) -> Box | None:
        if size not in chosen:  # at most one draw from the caller's RNG per size
            chosen[size] = crop_for(size) if crop_for is not None else None
        return chosen[size]

    size = jpeg_turbo.jpeg_size(data) if fast else None
    if size is not None:
        check_pixel_count(key, size)  # from the header, before anything is decoded
        crop = crop_of(size)
        array = jpeg_turbo.decode_scaled(data, size, _scale_factor(size, crop, draft_size))
        if array is not None:
            return _from_array(jpeg_turbo.crop_scaled(array, size, crop), tensor_ok)
    with open_image(data, key) as img:  # not a plain JPEG, or libjpeg-turbo refused it: PIL decides
        return _decode_pil(key, img, crop_of(img.size), draft_size=draft_size if fast else None,
                           tensor_ok=tensor_ok)


def _scale_factor(size: tuple[int, int], crop: Box | None, draft_size: int | None) -> float:
    """How far the decoder may shrink: `draft_size` over the shorter side of the needed box."""
    short = min(crop[2] - crop[0], crop[3] - crop[1]) if crop else min(size)
    return draft_size / max(1, short) if draft_size else 1.0


def _decode_pil(key: str, img: Image.Image, crop: Box | None, *, draft_size: int | None,
                tensor_ok: bool) -> Image.Image | torch.Tensor:
    """PIL's decode of `crop` (or the whole image); JPEGs at >= 2x the need decode at 1/2, 1/4 or 1/8."""
    size = img.size
    factor = _scale_factor(size, crop, draft_size)
    if img.format == "JPEG" and factor < 0.5:  # PIL's DCT scaling only comes in halves
        img.draft("RGB", (math.ceil(size[0] * factor), math.ceil(size[1] * factor)))
    load_image(img, key)
    if crop is not None:
        sx, sy = img.size[0] / size[0], img.size[1] / size[1]
        img = img.crop((crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy))
    # After load() the pixels are in memory: the caller may close the image's file. to_rgb, not a
    # plain convert: alpha goes over white and 16-bit grey is scaled, as for images in `prepare`.
    rgb = img if img.mode == "RGB" else to_rgb(img)
    if not tensor_ok:
        return rgb
    with warnings.catch_warnings():
        # PIL's array is read-only; nothing writes to it (the resize makes a new tensor).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _from_array(np.asarray(rgb), tensor_ok=True)


def _from_array(array: np.ndarray, tensor_ok: bool) -> Image.Image | torch.Tensor:
    """An HWC uint8 array as the transform takes it: a (3, H, W) channels-last view, or a PIL image."""
    if tensor_ok:
        return torch.from_numpy(array).permute(2, 0, 1)
    return Image.fromarray(np.ascontiguousarray(array))
