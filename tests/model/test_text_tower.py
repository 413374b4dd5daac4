"""The seed's text tower as its hub folder holds it: config.json, vocab.txt and pytorch_model.bin only.

`google/bert_uncased_L-4_H-512_A-8` ships no tokenizer.json and no safetensors. A folder of exactly
those three files (same architecture, random weights, written here) must load through the `seed`
preset with the pinned transformers: weights from the .bin, a fast tokenizer built from vocab.txt.
"""

from __future__ import annotations

import pytest
import torch

import vgclip

SPECIAL = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "red", "car", "photo", "of", "the", "dog"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert_uncased_L-4_H-512_A-8")
    config = BertConfig(vocab_size=30522, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                        intermediate_size=2048)
    torch.manual_seed(0)
    state = BertModel(config).state_dict()
    config.to_json_file(folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    vocab = SPECIAL + WORDS
    vocab += [f"##x{i}" for i in range(config.vocab_size - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return folder, state


@pytest.mark.slow
def test_seed_text_tower_loads_from_a_hub_style_folder(bert_folder):
    folder, state = bert_folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    config = vgclip.load_config("seed", ["model.image.weights=none", f"model.text.name={folder}"])
    model, _, tokenizer = vgclip.create_model(config)

    tokens = tokenizer(["A red car", "a photo of the dog"])
    ids = {w: len(SPECIAL) + i for i, w in enumerate(WORDS)}
    cls, sep = SPECIAL.index("[CLS]"), SPECIAL.index("[SEP]")
    # Uncased WordPiece from vocab.txt: "A" lower-cased, [CLS] ... [SEP], padded with [PAD] (0).
    assert tokens["input_ids"].tolist() == [
        [cls, ids["a"], ids["red"], ids["car"], sep, 0, 0],
        [cls, ids["a"], ids["photo"], ids["of"], ids["the"], ids["dog"], sep],
    ]
    loaded = model.text.transformer.state_dict()
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.3.output.dense.weight"):
        assert torch.equal(loaded[name], state[name]), f"{name} was not loaded from pytorch_model.bin"
    assert model.encode_text(tokens).shape == (2, config.model.embed_dim)
