"""Safe image opening: format sniffing, size limits (decompression bombs) and conversion to RGB.

Every problem becomes a `BadImageError` carrying a short `reason` (used as a skip count key), so a
bad file in a dataset is a counted skip rather than a crash inside a worker process.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from vgclip.errors import VgclipError

# Real VG images are at most ~1280 px on a side; 64 Mpx leaves room for any photo dataset while
# refusing bombs long before they allocate gigabytes.
DEFAULT_MAX_PIXELS = 64_000_000
# An image may be re-saved at a somewhat higher resolution than its metadata says; "far larger"
# means more than this factor in pixel count.
DEFAULT_SIZE_FACTOR = 4.0
# Decoders we trust; anything else (PSD, EPS, ...) is refused before a decoder runs.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
_EXPECTED_FORMAT = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
    ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
}
# Never accept truncated data silently (Pillow's default, enforced in case a caller changed it).
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImageError(VgclipError):
    """An image file that cannot be used; `reason` is a short key such as "truncated"."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def pil_detail(exc: BaseException) -> str:
    """Pillow's message as one line without the object it read from (`<_io.BytesIO object at 0x...>` or the path,
    which the error names already); an unknown format reads as the formats that were allowed."""
    if isinstance(exc, UnidentifiedImageError):
        return f"not a {', '.join(ALLOWED_FORMATS[:-1])} or {ALLOWED_FORMATS[-1]} image"
    text = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(exc))
    return " ".join(text.split()) or type(exc).__name__


def check_pixel_count(name: str | Path, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse an image from its header's (width, height) alone, before anything is decoded."""
    width, height = size
    if width <= 0 or height <= 0:
        raise BadImageError(name, "zero_size", f"{width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(name, "too_many_pixels", f"{width}x{height} > {max_pixels} pixels")


def open_image(source: str | Path | bytes, name: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (not decode) a file or bytes as an image of an allowed format within the pixel limit.

    The format is sniffed from the bytes, never taken from a file name. Decode with `load_image`.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; make it an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(name, "too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # UnidentifiedImageError is an OSError
        raise BadImageError(name, "not_an_image", pil_detail(exc)) from None
    try:
        check_pixel_count(name, img.size, max_pixels)
    except BadImageError:
        img.close()
        raise
    return img


def load_image(img: Image.Image, name: str | Path) -> None:
    """Decode the pixels of an opened image; truncated or corrupt data becomes `BadImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(name, "too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncation as OSError("image file is truncated ...") or a broken data
        # stream; both mean the file is incomplete.
        message = str(exc).lower()
        reason = "truncated" if "truncat" in message or "broken" in message else "decode_error"
        raise BadImageError(name, reason, pil_detail(exc)) from None


def open_image_checked(
    path: str | Path,
    expected_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size_factor: float = DEFAULT_SIZE_FACTOR,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Open `path` as a fully decoded RGB image or raise `BadImageError`.

    The real format is sniffed from the bytes (a PNG named .jpg decodes fine; the mismatch is noted
    in ``image.info["vgclip_notes"]``). `expected_size` is the (width, height) the metadata claims:
    an image with more than `size_factor` times that many pixels is refused, as is any image over
    `max_pixels`. `draft_size` lets the JPEG decoder downscale while decoding (much faster when
    the caller will shrink the image anyway); the decoded size may then be smaller than the file's.
    """
    path = Path(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty_file")
    except FileNotFoundError:
        raise BadImageError(path, "missing_file") from None
    except OSError as exc:
        raise BadImageError(path, "unreadable", str(exc)) from None
    try:
        with open_image(path, path, max_pixels) as img:
            notes = _check_expected(img, path, expected_size, size_factor)
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            load_image(img, path)
            rgb = to_rgb(img)
    except OSError as exc:  # the file changed or vanished between the checks and the read
        raise BadImageError(path, "unreadable", str(exc)) from None
    rgb.info["vgclip_notes"] = notes
    return rgb


def _check_expected(img: Image.Image, path: Path, expected_size: tuple[int, int] | None,
                    size_factor: float) -> list[str]:
    """Refuse an image far larger than its metadata says (from the header); return format notes."""
    width, height = img.size
    if expected_size is not None:
        exp_w, exp_h = expected_size
        if exp_w > 0 and exp_h > 0 and width * height > size_factor * exp_w * exp_h:
            raise BadImageError(path, "larger_than_expected", f"{width}x{height}, metadata says {exp_w}x{exp_h}")
    notes = []
    claimed = _EXPECTED_FORMAT.get(path.suffix.lower())
    if claimed is not None and img.format != claimed:
        notes.append(f"format_mismatch:{img.format}_named_{path.suffix.lower().lstrip('.')}")
    return notes


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode (CMYK, L, P, I;16, RGBA, LA, PA ...) to RGB; transparency is composited over white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit grayscale: scale 0..65535 to 0..255 instead of letting convert() clip at 255.
        img = img.convert("I")
        if img.getextrema()[1] > 255:
            img = img.point(lambda v: v * (1 / 257))
        img = img.convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()
