"""The dual encoder: building from presets, embeddings, tokenizer, locking, weight sources."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import vgclip
from vgclip.errors import VgclipError, WeightsUnavailableError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    config = vgclip.load_config("tiny")
    model, transform, tokenizer = vgclip.create_model(config)
    return config, model, transform, tokenizer


def test_tiny_forward_gives_normalised_embeddings(tiny):
    config, model, transform, tokenizer = tiny
    from PIL import Image

    images = torch.stack([transform(Image.new("RGB", (90, 70), c)) for c in ("red", "blue", "white")])
    assert images.shape == (3, 3, 64, 64)
    tokens = tokenizer(["a red car", "a blue sky", "snow on a very long mountain road " * 5])
    out = model(images, tokens)
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale"}
    for key in ("image_embeds", "text_embeds"):
        assert out[key].shape == (3, config.model.embed_dim)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / config.model.init_temperature, rel=1e-5)
    raw = model.encode_text(tokens, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), out["text_embeds"])


def test_logit_scale_is_clamped(tiny):
    _, model, _, _ = tiny
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) >> 100
        try:
            assert model.get_logit_scale().item() == pytest.approx(model.max_logit_scale)
        finally:
            model.logit_scale.fill_(torch.log(torch.tensor(1 / 0.07)).item())


def test_tokenizer_pads_truncates_and_pickles(tiny):
    config, _, _, tokenizer = tiny
    length = config.model.text.max_length
    out = tokenizer(["a", "word " * 100])
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, length)
    assert out["attention_mask"][0].sum() < length and out["attention_mask"][1].sum() == length
    # Padded to the longest text of the call, not to max_length: a lone short text stays short.
    single = tokenizer("a")
    assert single["input_ids"].shape == (1, 3)  # [CLS] a [SEP]
    assert torch.equal(single["input_ids"], out["input_ids"][:1, :3])
    assert torch.equal(tokenizer(["a", "a red car"])["attention_mask"].sum(1), torch.tensor([3, 5]))
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(clone(["a cat"])["input_ids"], tokenizer(["a cat"])["input_ids"])


def test_mean_pooling_ignores_padding(tiny):
    _, model, _, tokenizer = tiny
    short = tokenizer(["a dog"])
    # The same text in a longer padded row must pool to the same vector.
    longer = {k: torch.cat([v, torch.zeros_like(v)], dim=1) for k, v in short.items()}
    torch.testing.assert_close(model.encode_text(short), model.encode_text(longer), atol=1e-5, rtol=1e-5)


def test_train_transform_and_image_size(tiny):
    _, model, _, _ = tiny
    from PIL import Image

    train_tf = model.image_transform(train=True)
    assert model.image_size == 64
    assert train_tf(Image.new("RGB", (100, 50))).shape == (3, 64, 64)


def test_lock_freezes_all_but_last_blocks():
    config = vgclip.load_config(
        "tiny",
        ["model.image.lock=true", "model.image.unlocked_blocks=1", "model.text.lock=true"],
    )
    model, _, _ = vgclip.create_model(config)
    trunk = model.visual.trunk
    assert not any(p.requires_grad for p in trunk.conv_stem.parameters())
    assert not any(p.requires_grad for p in trunk.blocks[0].parameters())
    assert all(p.requires_grad for p in trunk.blocks[-1].parameters())
    assert all(p.requires_grad for p in trunk.conv_head.parameters())  # after the blocks
    assert not any(p.requires_grad for p in model.text.parameters())
    assert model.text_proj.weight.requires_grad and model.logit_scale.requires_grad
    model.train()
    assert model.training and model.text_proj.training
    assert not model.text.training and not trunk.bn1.training and not trunk.blocks[0].training
    assert trunk.blocks[-1].training
    # Frozen BatchNorm statistics must not move during a training forward pass.
    before = trunk.bn1.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, trunk.bn1.running_mean)


def test_lock_text_tower_last_layer():
    config = vgclip.load_config("tiny", ["model.text.lock=true", "model.text.unlocked_blocks=1"])
    model, _, _ = vgclip.create_model(config)
    layers = model.text.transformer.encoder.layer
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in model.text.transformer.embeddings.parameters())


def test_too_many_unlocked_blocks_is_an_error():
    config = vgclip.load_config("tiny", ["model.text.lock=true", "model.text.unlocked_blocks=9"])
    with pytest.raises(VgclipError, match="unlocked_blocks=9"):
        vgclip.create_model(config)


def test_seed_preset_offline_fails_fast_with_guidance(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    # An empty cache: the weights cannot be there, and no network call may be attempted.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path))
    import timm

    def no_network(*args, **kwargs):
        raise AssertionError("tried to fetch weights while offline")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        vgclip.create_model(vgclip.load_config("seed"))
    message = str(info.value)
    assert "efficientnet_b5" in message and "offline-small" in message
    assert "model.image.weights=" in message and "\n" not in message


def test_no_network_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    import timm

    import vgclip.model.hub as hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "host_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(WeightsUnavailableError, match="unreachable"):
        vgclip.create_model(vgclip.load_config("seed"))


def test_unknown_image_model_is_a_user_error():
    config = vgclip.load_config("tiny", ["model.image.name=no_such_net"])
    with pytest.raises(VgclipError, match="no_such_net"):
        vgclip.create_model(config)


def test_image_weights_from_a_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_efficientnet", num_classes=10)  # classifier must be ignored
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        config = vgclip.load_config("tiny", [f"model.image.weights={tmp_path / name}"])
        model, _, _ = vgclip.create_model(config)
        torch.testing.assert_close(model.visual.trunk.conv_stem.weight, source.conv_stem.weight)


def test_missing_or_unfit_image_weights_file(tmp_path):
    config = vgclip.load_config("tiny", [f"model.image.weights={tmp_path / 'nope.safetensors'}"])
    with pytest.raises(VgclipError, match="nope.safetensors"):
        vgclip.create_model(config)
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    config = vgclip.load_config("tiny", [f"model.image.weights={tmp_path / 'bad.safetensors'}"])
    with pytest.raises(VgclipError, match="does not fit"):
        vgclip.create_model(config)


def test_text_tower_architecture_overrides(tiny):
    config, model, _, _ = tiny
    hf_config = model.text.transformer.config
    assert hf_config.num_hidden_layers == 2 and hf_config.hidden_size == 64
    assert hf_config.num_attention_heads == 2 and hf_config.intermediate_size == 256
    assert getattr(model.text.transformer, "pooler", None) is None  # unused params would break DDP


def test_cls_pooling_and_missing_text_package(monkeypatch):
    config = vgclip.load_config("tiny", ["model.text.pooling=cls"])
    model, _, tokenizer = vgclip.create_model(config)
    tokens = tokenizer(["a cat"])
    states = model.text.transformer(**tokens).last_hidden_state
    torch.testing.assert_close(model.text(tokens["input_ids"], tokens["attention_mask"]), states[:, 0])
    bad = dataclasses.replace(config.model.text, name="package:no-such-package-xyz")
    from vgclip.model.text_tower import build_text_tower

    with pytest.raises(WeightsUnavailableError, match="vgclip\\[offline\\]"):
        build_text_tower(bad)


def test_text_hub_model_offline_is_weights_unavailable(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    from vgclip.config import TextTowerConfig
    from vgclip.model.text_tower import build_text_tower

    with pytest.raises(WeightsUnavailableError, match="offline-small"):
        build_text_tower(TextTowerConfig(name="someone/not-cached-bert-xyz"))


def test_architecture_overrides_need_random_init():
    config = vgclip.load_config("tiny", ["model.text.weights=pretrained"])
    with pytest.raises(VgclipError, match="weights=none"):
        vgclip.create_model(config)


def test_missing_text_folder_is_named(tmp_path):
    from vgclip.config import TextTowerConfig
    from vgclip.model.text_tower import build_text_tower

    with pytest.raises(VgclipError, match="no-such-folder"):
        build_text_tower(TextTowerConfig(name=str(tmp_path / "no-such-folder")))
