"""The two towers in one place (they live in image_tower.py, text_tower.py and lock.py)."""

from vgclip.model.image_tower import (
    ImageTower,
    build_image_tower,
    lite0_package_state_dict,
    map_state_dict_by_position,
    read_state_dict_file,
)
from vgclip.model.lock import lock_tower, set_frozen_eval
from vgclip.model.text_tower import TextTower, Tokenizer, build_text_tower, resolve_text_source

__all__ = [
    "ImageTower",
    "TextTower",
    "Tokenizer",
    "build_image_tower",
    "build_text_tower",
    "lite0_package_state_dict",
    "lock_tower",
    "map_state_dict_by_position",
    "read_state_dict_file",
    "resolve_text_source",
    "set_frozen_eval",
]
