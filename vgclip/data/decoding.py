"""Decoding shard images: safe opening from bytes, and the cheapest decode the transform allows."""

from __future__ import annotations

import io
import math
import warnings

import torch
from PIL import Image

from vgclip.data.images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, BadImageError
from vgclip.data.pairing import Box

try:
    # Deprecated in torchvision 0.29 (moving to TorchCodec) but ~30 % faster than PIL + copy; when it
    # is gone, PIL decodes everything.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_jpeg = None


def decode_pixels(key: str, img: Image.Image, data: bytes, crop: Box | None, *, draft_size: int | None,
                  tensor_ok: bool) -> Image.Image | torch.Tensor:
    """Decoded pixels of `crop` (or the whole image), as cheaply as the transform allows.

    JPEGs much larger than the transform needs are decoded at 1/2, 1/4 or 1/8 scale (PIL draft,
    DCT scaling). Otherwise, if the transform takes uint8 tensors, torchvision's libjpeg-turbo
    decoder writes straight into a tensor (no PIL -> tensor copy). Anything else: PIL.
    """
    size = img.size
    short = min(crop[2] - crop[0], crop[3] - crop[1]) if crop else min(size)
    factor = draft_size / max(1, short) if draft_size else 1.0
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
        return img.crop((crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy))
    # After load() the pixels are in memory: the caller may close the image's file.
    return img if img.mode == "RGB" else img.convert("RGB")


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
