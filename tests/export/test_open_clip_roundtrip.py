"""An open_clip export folder is a vgclip checkpoint: zeroshot, predict and load_checkpoint read it, with the
same scores as the run it came from; folders vgclip cannot build are refused in one line."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml

import vgclip
from vgclip.cli import main
from vgclip.errors import VgclipError
from vgclip.model.checkpoint import save_model
from vgclip.model.open_clip_folder import NAME_MAP, open_clip_name, vgclip_name
from vgclip.model.open_clip_folder import OPEN_CLIP_CONFIG_FILE as CONFIG_FILE
from vgclip.model.open_clip_folder import OPEN_CLIP_WEIGHTS_FILE as WEIGHTS_FILE
from vgclip.synthetic.writers import write_synthetic_voc

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run folder (weights moved off their init, so a mis-mapped tensor shows), its export, a small VOC."""
    from vgclip.export.open_clip import export_open_clip

    root = tmp_path_factory.mktemp("roundtrip")
    config = vgclip.load_config("tiny")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, _, tokenizer = vgclip.create_model(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and key != "logit_scale":
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
    save_model(root / "run", model, tokenizer, config)
    export_open_clip(root / "run", root / "export")
    write_synthetic_voc(root / "voc", 10, seed=4, min_side=64, max_side=120)
    return root


def _zeroshot(root, checkpoint, out):
    args = ["zeroshot", "--checkpoint", str(checkpoint), "--voc-root", str(root / "voc"), "--out", str(out),
            "--workers", "0", "--no-plots"]  # fmt: skip
    assert main(args) == 0
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return json.loads((out / "report.json").read_text()), rows


def test_name_map_goes_both_ways():
    for ours, theirs in NAME_MAP:
        key = ours + "weight" if ours.endswith(".") else ours
        assert vgclip_name(open_clip_name(key)) == key
    assert open_clip_name("something.else") is None and vgclip_name("logit_bias") is None


def test_zeroshot_on_the_export_gives_the_run_scores(exported, tmp_path):
    run_report, run_rows = _zeroshot(exported, exported / "run", tmp_path / "run_report")
    export_report, export_rows = _zeroshot(exported, exported / "export", tmp_path / "export_report")
    assert export_report["mAP"] == pytest.approx(run_report["mAP"], abs=1e-9)
    assert export_report["AP"].keys() == run_report["AP"].keys()
    assert [r["image_id"] for r in export_rows] == [r["image_id"] for r in run_rows] and run_rows
    for ours, theirs in zip(run_rows, export_rows):
        for key, value in ours.items():
            if key.startswith("score_"):
                assert float(theirs[key]) == pytest.approx(float(value), abs=1e-6), key
            else:
                assert theirs[key] == value
    # The export's card is not rewritten by an evaluation; the run's card quotes its own report.
    assert "zero-shot mAP" not in (exported / "export" / "README.md").read_text()


def test_predict_reads_the_export(exported, capsys):
    image = sorted((exported / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    outputs = []
    for checkpoint in ("run", "export"):
        args = ["predict", "--checkpoint", str(exported / checkpoint), "--labels", "dog,car,person", "--json"]
        assert main([*args, str(image)]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["results"][0]["scores"])
    assert outputs[0].keys() == outputs[1].keys() == {"dog", "car", "person"}
    for label, score in outputs[0].items():
        assert outputs[1][label] == pytest.approx(score, abs=1e-6)


def test_a_moved_export_loads_from_its_own_files(exported, tmp_path):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(exported / "export", moved)
    named = json.loads((moved / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]["hf_model_name"]
    assert named == str((exported / "export").resolve())  # the config still names the old place
    shutil.move(str(exported / "export"), str(tmp_path / "gone"))  # ... which no longer exists
    try:
        model, _, tokenizer = vgclip.load_checkpoint(moved / WEIGHTS_FILE)  # the weights file works too
        reference, _, _ = vgclip.load_checkpoint(exported / "run")
    finally:
        shutil.move(str(tmp_path / "gone"), str(exported / "export"))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6)
        tokens = tokenizer(["a red car", "sky"])
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), rtol=0, atol=1e-6)


def test_missing_text_tower_files_are_one_clear_error(exported, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(exported / "export" / name, folder / name)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = str(tmp_path / "nowhere")
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(VgclipError, match="config.json and tokenizer.json are neither in the folder"):
        vgclip.load_checkpoint(folder)


def _edited_export(exported, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(exported / "export", folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    edit(config["model_cfg"])
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


VIT = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda cfg: cfg.update(vision_cfg=VIT), "the image tower is not a timm model"),
        (lambda cfg: cfg["vision_cfg"].update(timm_pool="abs_attn"), "vision_cfg.timm_pool='abs_attn'"),
        (lambda cfg: cfg["text_cfg"].update(hf_pooler_type="cls_pooler"), "text pooler 'cls_pooler'"),
        (lambda cfg: cfg["text_cfg"].update(hf_proj_type="mlp"), "text projection 'mlp'"),
        (lambda cfg: cfg.update(text_cfg={"context_length": 77, "width": 512}), "open_clip's own transformer"),
    ],
)
def test_towers_vgclip_cannot_build_are_refused(exported, tmp_path, edit, message):
    folder = _edited_export(exported, tmp_path, edit)
    with pytest.raises(VgclipError, match="vgclip cannot build this model") as info:
        vgclip.load_checkpoint(folder)
    assert message in str(info.value) and str(folder) in str(info.value)


def test_unknown_weights_are_refused_on_one_line(exported, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "siglip-like"
    shutil.copytree(exported / "export", folder)
    state = load_file(str(folder / WEIGHTS_FILE))
    state["logit_bias"] = torch.zeros(1)  # SigLIP's bias: vgclip has no place for it
    save_file(state, str(folder / WEIGHTS_FILE))
    args = ["zeroshot", "--checkpoint", str(folder), "--voc-root", str(exported / "voc"), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "weight 'logit_bias' has no counterpart" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_export_folder_has_a_card_for_the_hub(exported):
    text = (exported / "export" / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "open_clip" and {"clip", "vgclip", "open_clip"} <= set(front["tags"])
    assert front["pipeline_tag"] == "zero-shot-image-classification"
    assert f'create_model_and_transforms("local-dir:{exported / "export"}")' in text
    assert f'vgclip.load_checkpoint("{exported / "export"}")' in text
    assert f"from the run `{(exported / 'run').resolve()}`" in text


def test_serve_scores_with_the_export(exported):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vgclip.serve.startup import ServeSettings, build_app

    image = sorted((exported / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    scores = []
    for checkpoint in ("run", "export"):
        with TestClient(build_app(ServeSettings(exported / checkpoint))) as client:
            response = client.post("/api/predict", data={"labels": "dog,car"},
                                   files=[("images", (image.name, image.read_bytes()))])  # fmt: skip
            assert response.status_code == 200, response.text
            scores.append(response.json()["results"][0]["scores"])
    assert scores[1] == pytest.approx(scores[0], abs=1e-6) and set(scores[0]) == {"dog", "car"}
