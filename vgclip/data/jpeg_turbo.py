"""Speed path: JPEG decoding with libjpeg-turbo (simplejpeg) at the DCT scale the transform needs.

What it buys: a JPEG much larger than the model input is decoded at M/8 of its size (libjpeg-turbo's
DCT scaling at any M, where PIL's `draft` offers only 1/2, 1/4, 1/8), straight from the header
simplejpeg reads (PIL's header parse is not paid), into an HWC array that is already the
channels-last layout the uint8 resize wants. A region crop is cut from the scaled array, so a
crop costs nothing extra. The loader's throughput with and without it is what
`benchmarks/bench_loader.py` reports (README, "What it does, measured").

Turn it off with `data.fast_decode=false` (every image then goes through PIL at full size, see
`vgclip.data.decoding`); it is also skipped when simplejpeg is not installed, and for any JPEG
simplejpeg refuses or would convert to RGB differently from PIL (CMYK / YCCK).
"""

from __future__ import annotations

import math

import numpy as np

from vgclip.data.pairing import Box

try:
    import simplejpeg
except ImportError:  # optional at run time: without it, PIL decodes everything
    simplejpeg = None

# Colour models libjpeg-turbo converts to RGB exactly as PIL does. CMYK/YCCK go to PIL, which
# knows Adobe's inverted-CMYK convention; they are rare in photo datasets.
_TURBO_COLOURSPACES = ("YCbCr", "Gray", "RGB")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG simplejpeg decodes to RGB as PIL would, else None (PIL's turn)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError, OSError):
        return None
    return (width, height) if colourspace in _TURBO_COLOURSPACES else None


def jpeg_scale_eighths(factor: float) -> int:
    """The DCT scale M/8 to decode at: the smallest M/8 >= `factor` (never upsamples the needed box).

    libjpeg-turbo has SIMD inverse DCTs only for the 1/8, 1/4, 1/2 and 1 scales; the others run in
    plain C. Decode + resize timings of photo-like JPEGs showed 3/8 to 5/8 still paying off through
    the smaller resize, while 6/8 and 7/8 cost more than a full-size decode, so those decode at 8/8.
    """
    eighths = min(8, max(1, math.ceil(factor * 8 - 1e-9)))
    return 8 if eighths >= 6 else eighths


def decode_scaled(data: bytes, size: tuple[int, int], factor: float) -> np.ndarray | None:
    """uint8 (H', W', 3) RGB of a JPEG whose header said `size`, at `jpeg_scale_eighths(factor)`.

    None when simplejpeg refuses the data (it runs strict: a truncated scan or corrupt marker
    raises instead of giving grey rows) or gives a size other than the one asked for.
    """
    width, height = size
    eighths = jpeg_scale_eighths(factor)
    # libjpeg-turbo's scaled size is ceil(side * M / 8); simplejpeg picks the smallest scale whose
    # output is at least this large, i.e. M/8 (or a smaller M giving the same pixels).
    want_w, want_h = math.ceil(width * eighths / 8), math.ceil(height * eighths / 8)
    try:
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=want_h, min_width=want_w, strict=True)
    except (ValueError, RuntimeError, OSError):
        return None
    if array.shape != (want_h, want_w, 3):  # a scale we did not ask for: do not guess the geometry
        return None
    return array


def crop_scaled(array: np.ndarray, size: tuple[int, int], crop: Box | None) -> np.ndarray:
    """The `crop` box (in the original `size`'s pixels) of a possibly downscaled decode."""
    if crop is None:
        return array
    # The box scales with the decode; round like PIL's Image.crop and keep at least one pixel.
    sx, sy = array.shape[1] / size[0], array.shape[0] / size[1]
    left = min(round(crop[0] * sx), array.shape[1] - 1)
    top = min(round(crop[1] * sy), array.shape[0] - 1)
    right = max(left + 1, min(round(crop[2] * sx), array.shape[1]))
    bottom = max(top + 1, min(round(crop[3] * sy), array.shape[0]))
    return array[top:bottom, left:right]
