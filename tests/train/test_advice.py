"""Presets from the quality measurements (issue 14) and the small-data hint of `vgclip train`."""

from __future__ import annotations

import re

from vgclip.config import load_config
from vgclip.train.advice import SMALL_DATA_IMAGES, small_data_hint, warn_small_data

FULL_FINETUNE = ["model.image.lock=false", "model.text.lock=false", "data.augment=true"]


def test_offline_small_is_the_recommended_small_data_recipe():
    cfg = load_config("offline-small")
    assert cfg.model.image.lock and cfg.model.text.lock and not cfg.data.augment
    assert (cfg.model.image.unlocked_blocks, cfg.model.text.unlocked_blocks) == (0, 0)  # projections only
    assert cfg.train.cache_locked_image  # so the image tower runs once per image, not once per epoch
    assert small_data_hint(cfg, 145) is None


def test_seed_preset_stays_faithful_to_the_write_up():
    cfg = load_config("seed")
    assert not cfg.model.image.lock and not cfg.model.text.lock  # full fine-tuning
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.data.batch_size) == (1e-4, 1e-4, 128)


def test_hint_for_a_whole_image_tower_on_few_images_names_a_usable_alternative(capsys):
    cfg = load_config("offline-small", FULL_FINETUNE)
    hint = small_data_hint(cfg, 145)
    assert hint is not None and "145 training images" in hint and "\n" not in hint
    # The overrides it suggests load, and give the locked recipe.
    suggested = load_config("offline-small", FULL_FINETUNE + re.findall(r"\b[a-z_.]+=[^\s,)]+", hint))
    assert suggested.model.image.lock and suggested.model.text.lock and small_data_hint(suggested, 145) is None
    warn_small_data(cfg, 145)
    assert capsys.readouterr().err.strip() == hint


def test_no_hint_with_enough_images_or_a_locked_image_tower(capsys):
    assert small_data_hint(load_config("offline-small", FULL_FINETUNE), SMALL_DATA_IMAGES) is None
    assert small_data_hint(load_config("offline-small", ["model.text.lock=false"]), 145) is None
    warn_small_data(load_config("offline-small"), 145)
    assert capsys.readouterr().err == ""
