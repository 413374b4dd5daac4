"""Shard image decoding: scaled JPEG decodes match full decodes, odd images still decode, fallbacks."""

from __future__ import annotations

import importlib
import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from vgclip.data import decoding, jpeg_turbo
from vgclip.data.decoding import decode_image
from vgclip.data.images import BadImageError
from vgclip.data.jpeg_turbo import jpeg_scale_eighths
from vgclip.data.transforms import build_image_transform

HAVE_SIMPLEJPEG = jpeg_turbo.simplejpeg is not None


@pytest.fixture(params=["simplejpeg", "no-simplejpeg"])
def turbo(request, monkeypatch) -> bool:
    """Runs a test with simplejpeg (when installed) and as if it were not installed."""
    if request.param == "simplejpeg":
        if not HAVE_SIMPLEJPEG:
            pytest.skip("simplejpeg is not installed")
        return True
    monkeypatch.setattr(jpeg_turbo, "simplejpeg", None)
    return False


def photo(size=(200, 150), seed=0) -> Image.Image:
    """Smooth gradients and blurred shapes: compresses and scales like a photo."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x * f1 + y * f2 + p) for f1, f2, p in rng.uniform(0.01, 0.05, (3, 3))], -1)
    img = Image.fromarray(((base + 1) * 100 + 25).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        draw.ellipse((x0, y0, x0 + 40, y0 + 30), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img.filter(ImageFilter.GaussianBlur(2))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=92, **kw) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def decode(data: bytes, crop=None, draft_size=None, tensor_ok=True, fast=True):
    """What the shard loader does: `decode_image`, with `crop` chosen once the size is known."""
    return decode_image("k", data, draft_size=draft_size, tensor_ok=tensor_ok, crop_for=lambda size: crop, fast=fast)


def reference(data: bytes, crop=None) -> Image.Image:
    """Full-size PIL decode (+ crop): what the loader would see without any decode-time scaling."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return img.crop(crop) if crop else img


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_scale_is_the_smallest_eighth_that_does_not_upsample():
    assert [jpeg_scale_eighths(f) for f in (0.01, 0.125, 0.126, 0.3, 0.5, 0.6, 0.625, 0.7, 0.99, 1.0, 3.0)] == \
        [1, 1, 2, 3, 4, 5, 5, 8, 8, 8, 8]  # 6/8 and 7/8 decode slower than 8/8: skipped
    for short in range(60, 700, 7):
        for need in (32, 96, 224):
            assert short * jpeg_scale_eighths(need / short) / 8 >= min(need, short)


@pytest.mark.parametrize("progressive", [False, True])
def test_scaled_decode_then_resize_matches_full_decode(turbo, progressive):
    data = encode(photo(), progressive=progressive)
    transform = build_image_transform(88, train=False)
    pixels = decode(data, draft_size=transform.image_size)
    # 88 of the 150 px shorter side: 5/8 scale with simplejpeg; full size otherwise (draft needs 2x).
    assert tuple(pixels.shape) == ((3, 94, 125) if turbo else (3, 150, 200))
    assert mean_abs(transform.pixels(pixels), transform.pixels(reference(data))) < 3


def test_eval_transforms_take_the_full_size_decode(turbo):
    """Evaluation pixels must be torchvision's on the file (open_clip, CLIP_benchmark): no DCT-scaled decode."""
    from vgclip.data.views import MultiCropTransform

    eval_tf = build_image_transform(88, train=False)
    assert eval_tf.draft_size is None and MultiCropTransform(eval_tf).draft_size is None
    assert tuple(decode(encode(photo()), draft_size=eval_tf.draft_size).shape) == (3, 150, 200)
    assert build_image_transform(88, train=True).draft_size == 125  # training may decode smaller


def test_large_downscale_and_pil_only_transforms(turbo):
    data = encode(photo((320, 240)))
    transform = build_image_transform(40, train=False)
    image = decode(data, draft_size=transform.image_size, tensor_ok=False)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    # 40/240: 2/8 scale with simplejpeg, PIL draft's 1/4 otherwise; never below the needed size.
    assert image.size == (80, 60)
    assert mean_abs(transform.pixels(image), transform.pixels(reference(data))) < 3


BOXES = [(30, 20, 130, 100), (101, 37, 199, 149), (0, 0, 61, 45)]
# A box's edges land on whole pixels of the (scaled) decode: up to half a scaled pixel off, i.e.
# about one original pixel at 3/8 scale, which on this sharp-edged picture costs ~5 grey levels.
# A box misplaced by 3 px costs 15-18 (see the next test).
CROP_TOLERANCE = 7


@pytest.mark.parametrize("box", BOXES)
def test_region_crops_land_on_the_same_content(turbo, box):
    data = encode(photo(seed=1))
    transform = build_image_transform(32, train=False)
    pixels = decode(data, crop=box, draft_size=transform.image_size)
    height, width = pixels.shape[1:] if isinstance(pixels, torch.Tensor) else pixels.size[::-1]
    short = min(box[2] - box[0], box[3] - box[1])
    assert min(height, width) >= min(32, short) - 1  # the box, decoded at no less than the need
    assert mean_abs(transform.pixels(pixels), transform.pixels(reference(data, box))) < CROP_TOLERANCE


@pytest.mark.parametrize("box", BOXES)
def test_misplaced_crop_would_be_detected(box):
    """The region test's tolerance is tight enough to see a box shifted by 3 pixels."""
    data = encode(photo(seed=1))
    transform = build_image_transform(32, train=False)
    shifted = (box[0] + 3, box[1] + 3, box[2] + 3, box[3] + 3)
    ref = transform.pixels(reference(data, box))
    assert mean_abs(transform.pixels(reference(data, shifted)), ref) > 2 * CROP_TOLERANCE


@pytest.mark.parametrize("mode", ["L", "CMYK", "PNG"])
def test_grayscale_cmyk_and_misnamed_png_decode_to_rgb(turbo, mode, tmp_path):
    img = photo((64, 48))
    data = encode(img, "PNG") if mode == "PNG" else encode(img.convert(mode))
    transform = build_image_transform(16, train=False)
    for tensor_ok in (True, False):
        pixels = decode(data, draft_size=transform.image_size, tensor_ok=tensor_ok)
        if isinstance(pixels, Image.Image):
            assert pixels.mode == "RGB"
        else:
            assert tensor_ok and pixels.shape[0] == 3 and pixels.dtype == torch.uint8
        assert mean_abs(transform.pixels(pixels), transform.pixels(reference(data))) < 3


def test_corrupt_jpeg_is_a_bad_image(turbo):
    data = encode(photo())
    with pytest.raises(BadImageError, match="truncated"):  # images.load_image's name, as in `prepare`
        decode(data[: len(data) // 2], draft_size=96)


@pytest.mark.skipif(not HAVE_SIMPLEJPEG, reason="simplejpeg is not installed")
def test_header_disagreeing_with_the_decode_is_not_trusted():
    data = encode(photo())
    assert jpeg_turbo.decode_scaled(data, (200, 150), 0.5).shape == (75, 100, 3)
    # The pixel limit was checked on the header's size; a decode of another size means "don't know".
    assert jpeg_turbo.decode_scaled(data, (20, 15), 0.5) is None
    assert jpeg_turbo.jpeg_size(encode(photo().convert("CMYK"))) is None  # CMYK: PIL's turn


@pytest.mark.skipif(not HAVE_SIMPLEJPEG, reason="simplejpeg is not installed")
def test_jpeg_fast_path_checks_the_pixel_limit_and_picks_the_crop_once(monkeypatch):
    data = encode(photo())
    sizes = []

    def crop_for(size):
        sizes.append(size)
        return (10, 10, 110, 90)

    # Plain JPEGs never reach PIL: simplejpeg's header gives the size the crop is chosen from.
    monkeypatch.setattr(decoding, "open_image", lambda *a: pytest.fail("PIL opened a plain JPEG"))
    pixels = decode_image("k", data, draft_size=40, tensor_ok=True, crop_for=crop_for)
    assert sizes == [(200, 150)] and tuple(pixels.shape) == (3, 40, 50)  # 100x80 box at 4/8
    monkeypatch.undo()
    # A header claiming a decompression bomb is refused before any decoding.
    sof = data.index(b"\xff\xc0")
    bomb = data[: sof + 5] + (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big") + data[sof + 9 :]
    with pytest.raises(BadImageError, match="too_many_pixels"):  # images.check_pixel_count's name
        decode_image("bomb.jpg", bomb, draft_size=None, tensor_ok=True)


def test_module_imports_and_decodes_without_simplejpeg(monkeypatch):
    data = encode(photo())
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # makes `import simplejpeg` fail
    try:
        module = importlib.reload(jpeg_turbo)
        assert module.simplejpeg is None
        pixels = decode_image("k", data, draft_size=96, tensor_ok=True)
        assert tuple(pixels.shape) == (3, 150, 200)
    finally:
        monkeypatch.undo()
        importlib.reload(jpeg_turbo)
    assert jpeg_turbo.simplejpeg is not None or not HAVE_SIMPLEJPEG


def test_transparent_png_is_composited_over_white():
    """Zero-shot and predict read user files through this path: alpha must not turn into black."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(buf, format="PNG")
    out = decode_image("clear.png", buf.getvalue(), draft_size=None, tensor_ok=False)
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("box", [None, *BOXES])
def test_fast_decode_off_gives_the_same_pictures(box):
    """`data.fast_decode=false` (full-size PIL) sees what the speed paths give, within the same tolerance."""
    data = encode(photo(seed=2))
    transform = build_image_transform(32, train=False)
    fast = decode(data, crop=box, draft_size=transform.image_size)
    plain = decode(data, crop=box, draft_size=transform.image_size, fast=False)
    assert tuple(plain.shape[1:]) == ((150, 200) if box is None else (box[3] - box[1], box[2] - box[0]))
    assert mean_abs(transform.pixels(fast), transform.pixels(plain)) < (3 if box is None else CROP_TOLERANCE)
    assert torch.equal(transform.pixels(plain), transform.pixels(reference(data, box)))
