"""Config presets, YAML loading and key=value overrides."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from vgclip.config import Config, config_keys, config_to_dict, load_config, preset_names, save_config
from vgclip.errors import ConfigError


def test_presets_load_and_carry_the_seed_settings():
    assert {"seed", "offline-small", "tiny"} <= set(preset_names())
    seed = load_config("seed")
    assert seed.model.image.name == "tf_efficientnet_b5.aa_in1k" and seed.model.image.weights == "hub"
    assert seed.model.image.image_size == 456 and seed.data.num_workers == -1 and seed.train.precision == "auto"
    assert seed.model.text.name == "google/bert_uncased_L-4_H-512_A-8"
    assert (seed.data.batch_size, seed.train.lr, seed.train.weight_decay) == (128, 1e-4, 1e-4)
    small = load_config("offline-small")
    assert small.model.image.weights == "package" and small.model.text.name.startswith("package:")
    assert small.model.image.mean == (0.5, 0.5, 0.5)


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["train.lr=2e-4", "data.batch_size=3", "model.image.image_size=96",
                               "eval.thresholds=[0.1, 0.9]", "train.channels_last=true", "model.text.name=my/model"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 3
    assert cfg.model.image.image_size == 96
    assert cfg.eval.thresholds == (0.1, 0.9)
    assert cfg.train.channels_last is True
    assert cfg.model.text.name == "my/model"
    # Keys not overridden keep the preset's value.
    assert cfg.model.embed_dim == load_config("tiny").model.embed_dim


def test_int_is_accepted_for_a_float_field():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1e-3", "unknown config key 'train.lrr'"),
        ("model.image.sise=3", "unknown config key 'model.image.sise'"),
        ("data.batch_size=big", "config key 'data.batch_size' expects int"),
        ("data.batch_size=1.5", "config key 'data.batch_size' expects int"),
        ("train.channels_last=3", "config key 'train.channels_last' expects bool"),
        ("train.lr", "not of the form key=value"),
        ("train=3", "config section 'train' must be a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_unknown_key_suggests_a_close_one_and_lists_the_known():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.epoch=3"])
    message = str(info.value)
    assert "unknown config key 'train.epoch' (did you mean 'train.epochs'?" in message
    assert "known keys here: " in message and "max_steps" in message
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config("tiny", ["trian.epochs=3"])
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.zzzz=3"])
    assert "did you mean" not in str(info.value)


def test_config_keys_are_the_dotted_override_keys():
    def flat(tree: dict, prefix: str = "") -> set[str]:
        return set().union(*(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
                             for k, v in tree.items()))  # fmt: skip

    keys = config_keys()
    assert set(keys) == flat(config_to_dict(load_config("tiny"))) and "train.epochs" in keys


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'"):
        load_config(str(typo))


def test_config_is_frozen_and_round_trips_through_yaml(tmp_path):
    cfg = load_config("offline-small", ["train.epochs=7"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(cfg)
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.image.image_size=0", "model.image.image_size must be >= 1, got 0"),
        ("model.image.std=[0.5, 0, 0.5]", "model.image.std must be > 0"),
        ("model.image.mean=[0.5, 0.5]", "model.image.mean must be empty"),
        ("model.image.unlocked_blocks=2", "model.image.unlocked_blocks only applies with model.image.lock=true"),
        ("model.text.pooling=max", "model.text.pooling='max': expected one of mean, cls"),
        ("model.text.max_length=1", "model.text.max_length must be >= 2, got 1"),
        ("model.text.num_heads=3", r"model.text.hidden_size \(64\) must be a multiple of model.text.num_heads \(3\)"),
        ("model.embed_dim=0", "model.embed_dim must be >= 1, got 0"),
        ("model.init_temperature=0", "model.init_temperature must be > 0"),
        ("model.max_logit_scale=0.5", "model.max_logit_scale must be >= 1.0"),
        ("data.pairing=combine:0", "data.pairing='combine:0'"),
        ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("data.num_workers=-2", "data.num_workers must be >= -1, got -2"),
        ("data.tar_reader=tarfile", "data.tar_reader='tarfile': expected one of direct, webdataset"),
        ("train.accum_steps=0", "train.accum_steps must be >= 1, got 0"),
        ("train.precision=fp8", "train.precision='fp8': expected one of auto, fp32, bf16, fp16"),
        ("train.lr=0", "train.lr must be > 0, got 0.0"),
        ("train.epochs=-1", "train.epochs must be >= 0, got -1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1, got 0"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0.0, got -1.0"),
        ("eval.score=logits", "eval.score='logits': expected one of softmax, sigmoid, cosine"),
        ("eval.difficult=drop", "eval.difficult='drop'"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
        ("eval.thresholds=[]", "eval.thresholds must hold at least one threshold"),
    ],
)
def test_each_section_rejects_bad_values_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_combinations_are_checked():
    with pytest.raises(ConfigError, match="train.max_steps=5 needs train.epochs >= 1"):
        load_config("tiny", ["train.epochs=0", "train.max_steps=5"])
    assert load_config("tiny", ["model.text.lock=true", "model.text.unlocked_blocks=1"]).model.text.unlocked_blocks == 1


def test_sections_validate_when_built_directly():
    from vgclip.config import DataConfig, TrainConfig

    with pytest.raises(ConfigError, match="train.accum_steps must be >= 1, got 0"):
        TrainConfig(accum_steps=0)
    with pytest.raises(ConfigError, match="data.batch_size"):
        dataclasses.replace(DataConfig(), batch_size=-3)


def test_every_preset_is_valid():
    for name in preset_names():
        load_config(name)
