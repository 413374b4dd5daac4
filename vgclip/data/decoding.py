"""Decoding shard images: safe opening from bytes, and the cheapest decode the transform allows."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from vgclip.data.images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, BadImageError, to_rgb
from vgclip.data.pairing import Box

try:
    # libjpeg-turbo with its DCT scaling at any M/8 (PIL's draft only offers 1/2, 1/4, 1/8), output as
    # an HWC array that is already the channels-last layout the uint8 resize kernel wants.
    import simplejpeg
except ImportError:  # optional: without it, PIL draft / torchvision decode as before
    simplejpeg = None

# Colour models libjpeg-turbo converts to RGB exactly as PIL does. CMYK/YCCK go to PIL, which
# knows Adobe's inverted-CMYK convention; they are rare in photo datasets.
_TURBO_COLOURSPACES = ("YCbCr", "Gray", "RGB")

try:
    # Deprecated in torchvision 0.29 (moving to TorchCodec) but ~30 % faster than PIL + copy; when it
    # is gone, PIL decodes everything.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_jpeg = None


def decode_image(key: str, data: bytes, *, draft_size: int | None, tensor_ok: bool,
                 crop_for: Callable[[tuple[int, int]], Box | None] | None = None) -> Image.Image | torch.Tensor:
    """Decode image bytes from a shard or dataset as cheaply as the transform allows.

    `crop_for(size)` picks the box to keep once the (width, height) is known (None: the whole
    image). Plain JPEGs go straight to libjpeg-turbo (simplejpeg): its header gives the size, which
    is checked against the pixel limit before anything is decoded, so PIL's header parse is not
    paid. Everything else, and any JPEG simplejpeg refuses, is opened with PIL (`open_image_bytes`,
    which refuses non-image formats and bombs) and decoded by `decode_pixels`. Bad data raises
    `BadImageError`.
    """
    chosen: dict[tuple[int, int], Box | None] = {}

    def crop_of(size: tuple[int, int]) -> Box | None:
        if size not in chosen:  # at most one draw from the caller's RNG per size
            chosen[size] = crop_for(size) if crop_for is not None else None
        return chosen[size]

    size = turbo_jpeg_size(data)
    if size is not None:
        width, height = size
        if width <= 0 or height <= 0 or width * height > DEFAULT_MAX_PIXELS:
            raise BadImageError(key, "bad_size", f"{width}x{height}")
        crop = crop_of(size)
        array = _turbo_decode(data, size, _scale_factor(size, crop, draft_size))
        if array is not None:
            return _crop_array(array, size, crop, tensor_ok)
    with open_image_bytes(key, data) as img:  # not a plain JPEG, or simplejpeg refused it: PIL decides
        return decode_pixels(key, img, data, crop_of(img.size), draft_size=draft_size, tensor_ok=tensor_ok,
                             turbo=False)


def turbo_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG simplejpeg decodes to RGB as PIL would, else None (PIL's turn)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError, OSError):
        return None
    return (width, height) if colourspace in _TURBO_COLOURSPACES else None


def _scale_factor(size: tuple[int, int], crop: Box | None, draft_size: int | None) -> float:
    """How far the decoder may shrink: `draft_size` over the shorter side of the needed box."""
    short = min(crop[2] - crop[0], crop[3] - crop[1]) if crop else min(size)
    return draft_size / max(1, short) if draft_size else 1.0


def decode_pixels(key: str, img: Image.Image, data: bytes, crop: Box | None, *, draft_size: int | None,
                  tensor_ok: bool, turbo: bool = True) -> Image.Image | torch.Tensor:
    """Decoded pixels of `crop` (or the whole image), as cheaply as the transform allows.

    JPEGs much larger than the transform needs are decoded at 1/2, 1/4 or 1/8 scale (PIL draft,
    DCT scaling). With simplejpeg installed, JPEGs are instead decoded at the smallest M/8 scale
    (M = 1..5, else 8: see `jpeg_scale_eighths`) that keeps the needed box at least `draft_size`
    on its shorter side, into a channels-last array the resize reads without a copy (the entropy
    decoding costs the same at any scale). Otherwise, if the transform takes
    uint8 tensors, torchvision's libjpeg-turbo decoder writes straight into a tensor (no PIL ->
    tensor copy). Anything else, and anything these decoders refuse: PIL. `turbo=False` skips
    simplejpeg (`decode_image` has already tried it).
    """
    size = img.size
    factor = _scale_factor(size, crop, draft_size)
    if turbo and img.format == "JPEG" and simplejpeg is not None:
        array = decode_jpeg_scaled(data, size, factor)
        if array is not None:
            return _crop_array(array, size, crop, tensor_ok)
    if img.format == "JPEG" and factor < 0.5:  # DCT scaling only comes in halves
        img.draft("RGB", (math.ceil(size[0] * factor), math.ceil(size[1] * factor)))
    elif img.format == "JPEG" and tensor_ok and decode_jpeg is not None:
        pixels = decode_jpeg_tensor(data)
        if pixels is not None and tuple(pixels.shape[1:]) == (size[1], size[0]):
            return pixels if crop is None else pixels[:, crop[1] : crop[3], crop[0] : crop[2]]
        # torchvision refused it (CMYK, odd markers, damage): let PIL decide.
    load_pixels(key, img)
    if crop is not None:
        sx, sy = img.size[0] / size[0], img.size[1] / size[1]
        img = img.crop((crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy))
    # After load() the pixels are in memory: the caller may close the image's file. to_rgb, not a
    # plain convert: alpha goes over white and 16-bit grey is scaled, as for images in `prepare`.
    return img if img.mode == "RGB" else to_rgb(img)


def jpeg_scale_eighths(factor: float) -> int:
    """The DCT scale M/8 to decode at: the smallest M/8 >= `factor` (never upsamples the needed box).

    libjpeg-turbo has SIMD inverse DCTs only for the 1/8, 1/4, 1/2 and 1 scales; the others run in
    plain C. Measured (decode + resize, photo-like 512 px JPEGs): 3/8 still beats 4/8 and 5/8 breaks
    even with 8/8 through the smaller resize, but 6/8 and 7/8 cost 5-30 % more than a full-size
    decode, so those decode at 8/8.
    """
    eighths = min(8, max(1, math.ceil(factor * 8 - 1e-9)))
    return 8 if eighths >= 6 else eighths


def decode_jpeg_scaled(data: bytes, size: tuple[int, int], factor: float) -> np.ndarray | None:
    """uint8 (H', W', 3) RGB from JPEG bytes at the DCT scale `jpeg_scale_eighths(factor)`, or None.

    None (the caller falls back to PIL / torchvision) when simplejpeg refuses the data, the colour
    model is not one it converts like PIL, or its header disagrees with the `size` PIL read: the
    pixel limit was checked on PIL's header, so a file whose two parsers disagree is not trusted.
    """
    return _turbo_decode(data, size, factor) if turbo_jpeg_size(data) == size else None


def _turbo_decode(data: bytes, size: tuple[int, int], factor: float) -> np.ndarray | None:
    """simplejpeg's decode at `jpeg_scale_eighths(factor)` of a JPEG whose header said `size`; None if refused."""
    width, height = size
    eighths = jpeg_scale_eighths(factor)
    # libjpeg-turbo's scaled size is ceil(side * M / 8); simplejpeg picks the smallest scale whose
    # output is at least this large, i.e. M/8 (or a smaller M giving the same pixels).
    want_w, want_h = math.ceil(width * eighths / 8), math.ceil(height * eighths / 8)
    try:
        # strict: recoverable errors (truncated scans, corrupt markers) raise instead of grey rows.
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=want_h, min_width=want_w, strict=True)
    except (ValueError, RuntimeError, OSError):
        return None
    if array.shape != (want_h, want_w, 3):  # a scale we did not ask for: do not guess the geometry
        return None
    return array


def _crop_array(array: np.ndarray, size: tuple[int, int], crop: Box | None,
                tensor_ok: bool) -> Image.Image | torch.Tensor:
    """The `crop` box (in original pixels) of a possibly downscaled decode, as the transform takes it."""
    if crop is not None:
        # The box scales with the decode; round like PIL's Image.crop and keep at least one pixel.
        sx, sy = array.shape[1] / size[0], array.shape[0] / size[1]
        left = min(round(crop[0] * sx), array.shape[1] - 1)
        top = min(round(crop[1] * sy), array.shape[0] - 1)
        right = max(left + 1, min(round(crop[2] * sx), array.shape[1]))
        bottom = max(top + 1, min(round(crop[3] * sy), array.shape[0]))
        array = array[top:bottom, left:right]
    if tensor_ok:
        # A (3, H, W) view of the HWC array: channels-last, which the antialiased resize prefers.
        return torch.from_numpy(array).permute(2, 0, 1)
    return Image.fromarray(np.ascontiguousarray(array))


def decode_jpeg_tensor(data: bytes) -> torch.Tensor | None:
    """uint8 (3, H, W) from JPEG bytes via torchvision, or None if its decoder refuses them."""
    with warnings.catch_warnings():
        # The bytes are read-only; the decoder only reads them.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return None


def open_image_bytes(key: str, data: bytes) -> Image.Image:
    """Open (not decode) image bytes, refusing non-image formats and decompression bombs."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(key, "not_an_image", str(exc)) from None
    width, height = img.size
    if width <= 0 or height <= 0 or width * height > DEFAULT_MAX_PIXELS:
        img.close()
        raise BadImageError(key, "bad_size", f"{width}x{height}")
    return img


def load_pixels(key: str, img: Image.Image) -> None:
    """Decode the pixels; truncated or corrupt data becomes BadImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(key, "decode_error", str(exc)) from None
