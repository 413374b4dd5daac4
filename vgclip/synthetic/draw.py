"""Procedural scenes for the built-in synthetic data: coloured shapes on textured backgrounds.

A scene is 1-4 shapes from `SYNTH_CLASSES`, each with a named colour, a size word and a position word.
Shapes are drawn anti-aliased (4x supersampled masks) and kept large enough (about 20-45% of the
shorter image side) to stay recognisable after resizing to 96-128 px for a quick CPU demo.
Everything is drawn from one `numpy.random.Generator`, so a scene is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SYNTH_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "hexagon", "crescent",
)

# Named colours far enough apart that a human would name them the same way.
SYNTH_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 35),
    "green": (35, 165, 60),
    "blue": (30, 80, 220),
    "purple": (125, 45, 175),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")

_SUPERSAMPLE = 4
_SIZE_RANGES = {"large": (0.33, 0.45), "small": (0.20, 0.28), "tiny": (0.12, 0.16)}
_TINY_PROBABILITY = 0.06  # a few hard objects, marked difficult in VOC (like real VOC's difficult flag)
_COUNT_WEIGHTS = (0.3, 0.3, 0.25, 0.15)  # P(1..4 objects)
_MAX_OVERLAP = 0.15  # intersection / smaller box area
_MIN_BG_DISTANCE = 110.0  # RGB distance between background and every object colour


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: class, colour name, size word, position word and its tight pixel box (x, y, w, h)."""

    cls: str
    colour: str
    size: str  # "small" or "large" (tiny objects are called small)
    position: str  # one of POSITIONS
    box: tuple[int, int, int, int]
    tiny: bool = False


@dataclass(frozen=True)
class Scene:
    """A rendered image with the objects drawn on it, in drawing order."""

    image: Image.Image
    objects: tuple[SceneObject, ...]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, radius: float, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _outline(cls: str) -> np.ndarray:
    """Polygon of a shape in unit coordinates (centre 0, fits in [-1, 1]; y points down)."""
    if cls == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if cls == "triangle":
        return _regular(3, 1.15) + np.array([0.0, 0.25])  # centre the bounding box, not the centroid
    if cls == "hexagon":
        return _regular(6, 0.97, phase=0.0)
    if cls == "star":
        outer, inner = _regular(5, 1.0), _regular(5, 0.42, phase=-math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2) + np.array([0.0, 0.1])
    if cls == "cross":
        a, b = 0.3, 0.92
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                         [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])
    if cls == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], axis=1) / 16.5
    raise ValueError(f"no polygon for shape class {cls!r}")


def shape_mask(cls: str, side: int, rng: np.random.Generator) -> Image.Image:
    """An anti-aliased 'L' mask (side x side) of one shape, randomly rotated a little."""
    big = side * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    half = big / 2
    if cls in ("circle", "crescent"):
        r = 0.95 * half
        draw.ellipse([half - r, half - r, half + r, half + r], fill=255)
        if cls == "crescent":  # bite a smaller disc out, towards a random side
            angle = rng.uniform(0, 2 * math.pi)
            cx, cy = half + 0.45 * half * math.cos(angle), half + 0.45 * half * math.sin(angle)
            r2 = 0.8 * half
            draw.ellipse([cx - r2, cy - r2, cx + r2, cy + r2], fill=0)
    else:
        # Small rotations keep each class recognisable (a square turned 45 degrees reads as a diamond).
        points = _rotate(_outline(cls), rng.uniform(-0.35, 0.35)) * (0.98 * half) + half
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    return canvas.reduce(_SUPERSAMPLE)


def _background(width: int, height: int, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float32 HxWx3 background: a two-colour linear gradient plus smooth low-frequency blotches."""
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32) * math.cos(angle)
    ys = np.arange(height, dtype=np.float32) * math.sin(angle)
    proj = ys[:, None] + xs[None, :]
    lo, hi = float(proj.min()), float(proj.max())
    t = (proj - lo) * (1.0 / max(hi - lo, 1.0))
    grid = rng.uniform(-1, 1, size=(4, 4)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC))
    blotch = blotch * np.float32(rng.uniform(10, 30))
    start, delta = colours[0].astype(np.float32), (colours[1] - colours[0]).astype(np.float32)
    return (t[..., None] * delta + start) + blotch[..., None]


def _pick_background(object_rgbs: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Two background colours, each far from every object colour (best of a few tries)."""
    chosen = []
    for _ in range(2):
        best, best_d = None, -1.0
        for _ in range(12):
            cand = rng.uniform(0, 255, size=3).astype(np.float32)
            d = min(float(np.linalg.norm(cand - rgb)) for rgb in object_rgbs)
            if d > best_d:
                best, best_d = cand, d
            if d >= _MIN_BG_DISTANCE:
                break
        chosen.append(best)
    return np.stack(chosen)


def _position_word(cx: float, cy: float, width: int, height: int) -> str:
    dx, dy = cx / width - 0.5, cy / height - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = box
    for ox, oy, ow, oh in others:
        iw = min(x + w, ox + ow) - max(x, ox)
        ih = min(y + h, oy + oh) - max(y, oy)
        if iw > 0 and ih > 0 and iw * ih > _MAX_OVERLAP * min(w * h, ow * oh):
            return True
    return False


def _size_word(rng: np.random.Generator) -> tuple[str, bool]:
    if rng.random() < _TINY_PROBABILITY:
        return "tiny", True
    return ("large", False) if rng.random() < 0.5 else ("small", False)


def _place(cls: str, side: int, width: int, height: int, boxes: list, rng: np.random.Generator):
    """Draw a mask and find a spot with limited overlap; None when 20 tries fail."""
    mask = shape_mask(cls, side, rng)
    bx0, by0, bx1, by1 = mask.getbbox() or (0, 0, side, side)
    for _ in range(20):
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        box = (x0 + bx0, y0 + by0, bx1 - bx0, by1 - by0)
        if not _overlaps(box, boxes):
            return mask, (x0, y0), box
    return None


def render_scene(rng: np.random.Generator, min_side: int = 160, max_side: int = 320) -> Scene:
    """Draw one random scene; image sides are drawn uniformly from [min_side, max_side]."""
    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    short = min(width, height)
    n_objects = int(rng.choice(len(_COUNT_WEIGHTS), p=_COUNT_WEIGHTS)) + 1
    placed, boxes = [], []
    for _ in range(n_objects):
        cls = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
        colour = list(SYNTH_COLOURS)[int(rng.integers(len(SYNTH_COLOURS)))]
        size, tiny = _size_word(rng)
        side = max(8, int(short * rng.uniform(*_SIZE_RANGES[size])))
        spot = _place(cls, side, width, height, boxes, rng)
        if spot is None:  # crowded image: keep fewer objects rather than heavy occlusion
            continue
        mask, offset, box = spot
        rgb = np.clip(np.array(SYNTH_COLOURS[colour]) + rng.integers(-18, 19, size=3), 0, 255)
        position = _position_word(box[0] + box[2] / 2, box[1] + box[3] / 2, width, height)
        obj = SceneObject(cls, colour, "small" if tiny else size, position, box, tiny)
        placed.append((obj, mask, offset, rgb))
        boxes.append(box)
    background = _background(width, height, _pick_background([p[3] for p in placed], rng), rng)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), mode="RGB")
    for _, mask, offset, rgb in placed:
        image.paste(tuple(int(v) for v in rgb), (*offset, offset[0] + mask.width, offset[1] + mask.height), mask)
    # Mild sensor-like noise over everything, so neither shapes nor background are perfectly flat.
    noise = rng.standard_normal((height, width, 3), dtype=np.float32)
    noise *= np.float32(rng.uniform(3, 10))
    noise += np.asarray(image, dtype=np.float32)
    image = Image.fromarray(np.clip(noise, 0, 255, out=noise).astype(np.uint8), mode="RGB")
    return Scene(image=image, objects=tuple(p[0] for p in placed))
