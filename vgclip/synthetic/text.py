"""Region descriptions for synthetic scenes, phrased like Visual Genome regions.

Every phrase about an object names that object's class word, so an image-level contrastive model can
learn the words the zero-shot prompts ("a photo of a {class}.") will use.
"""

from __future__ import annotations

import numpy as np

from vgclip.synthetic.draw import Scene, SceneObject

_WHERE = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}

_SINGLE = (
    "a {colour} {cls}",
    "the {cls} is {colour}",
    "{size} {colour} {cls} {where}",
    "a {size} {cls}",
    "the {colour} {cls} {where}",
    "{a_colour} {cls} shape",
    "there is {a_colour} {cls} {where}",
    "{colour} {cls}",
    "a {cls} {where}",
)
_PAIR = (
    "{colour} {cls} next to {a_other}",
    "the {cls} is {relation} the {other}",
    "{a_colour} {cls} and {a_other}",
)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
_WHOLE_IMAGE_PROBABILITY = 0.3
_CAPITALISE_PROBABILITY = 0.2  # real VG phrases are a mix of "A man ..." and "man ..."


def article(word: str) -> str:
    """'a' or 'an' for `word`."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _relation(obj: SceneObject, other: SceneObject) -> str:
    """Where `obj` is relative to `other`, from box centres."""
    dx = (obj.box[0] + obj.box[2] / 2) - (other.box[0] + other.box[2] / 2)
    dy = (obj.box[1] + obj.box[3] / 2) - (other.box[1] + other.box[3] / 2)
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _finish(text: str, rng: np.random.Generator) -> str:
    return text[:1].upper() + text[1:] if rng.random() < _CAPITALISE_PROBABILITY else text


def object_phrases(obj: SceneObject, others: list[SceneObject], rng: np.random.Generator) -> list[str]:
    """1-3 distinct phrases describing `obj`, each naming its class."""
    templates = list(_SINGLE) + (list(_PAIR) if others else [])
    count = int(rng.integers(1, 4))
    picks = rng.choice(len(templates), size=count, replace=False)
    phrases = []
    for index in picks:
        other = others[int(rng.integers(len(others)))] if others else None
        other_text = f"{other.colour} {other.cls}" if other else ""
        where = _WHERE[obj.position]
        text = templates[int(index)].format(
            cls=obj.cls,
            colour=obj.colour,
            a_colour=f"{article(obj.colour)} {obj.colour}",
            size=obj.size,
            where=where[int(rng.integers(len(where)))],
            other=other_text,
            a_other=f"{article(other_text)} {other_text}" if other else "",
            relation=_relation(obj, other) if other else "",
        )
        phrases.append(_finish(text, rng))
    return list(dict.fromkeys(phrases))  # drop exact repeats, keep order


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def whole_image_phrase(scene: Scene, rng: np.random.Generator) -> str | None:
    """Sometimes a phrase about the whole image (naming every class in it), otherwise None."""
    if rng.random() >= _WHOLE_IMAGE_PROBABILITY:
        return None
    n = len(scene.objects)
    if rng.random() < 0.5:
        names = [f"{article(o.cls)} {o.cls}" for o in scene.objects]
        noun = "shape" if n == 1 else "shapes"
        text = f"a scene with {_NUMBERS[n]} {noun}: {_listing(names)}"
    else:
        text = _listing([f"{article(o.colour)} {o.colour} {o.cls}" for o in scene.objects])
    return _finish(text, rng)


def scene_regions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(phrase, (x, y, w, h)) pairs for a scene: object phrases, then maybe a whole-image phrase."""
    regions = []
    for i, obj in enumerate(scene.objects):
        others = [o for j, o in enumerate(scene.objects) if j != i]
        regions.extend((phrase, obj.box) for phrase in object_phrases(obj, others, rng))
    whole = whole_image_phrase(scene, rng)
    if whole is not None:
        regions.append((whole, (0, 0, scene.width, scene.height)))
    return regions
