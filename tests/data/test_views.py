"""Multi-crop evaluation (`eval.crops=multi`): the views cover the image, the first view is the centre crop,
embeddings are averaged per image, and the choice travels with the thresholds to `vgclip predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests._paths import SHARED_DATA
from tests.serve._serve_fixtures import make_run
from vgclip.config import ConfigError, EvalConfig
from vgclip.data.transforms import build_image_transform, resized_size
from vgclip.data.views import VIEWS, ZOOM, MultiCropTransform, crop_views, encode_views, eval_transform
from vgclip.errors import VgclipError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    return make_run(tmp_path_factory.mktemp("views") / "run")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory):
    from vgclip.synthetic.writers import write_synthetic_voc

    out = tmp_path_factory.mktemp("views") / "voc"
    write_synthetic_voc(out, 24, seed=3, min_side=64, max_side=96)
    return out


@pytest.fixture(scope="module")
def multi_report(tiny_run, voc_root, tmp_path_factory: pytest.TempPathFactory):
    """`vgclip zeroshot ... eval.crops=multi` with thresholds tuned (on the evaluation split: a test)."""
    from vgclip.cli import main as cli

    out = tmp_path_factory.mktemp("views") / "report"
    assert cli(["zeroshot", "--checkpoint", str(tiny_run), "--voc-root", str(voc_root), "--out", str(out),
                "--no-plots", "--tune-on-eval", "eval.crops=multi"]) == 0
    return out


@pytest.mark.parametrize("size", [(640, 480), (300, 700), (256, 256), (900, 300)])  # up to 3:1, 3 squares span it
def test_views_lie_inside_the_image_and_cover_all_of_it(size):
    width, height = size
    views = crop_views(width, height, 64)
    assert len(views) == VIEWS
    covered = np.zeros((height, width), dtype=bool)
    for view in views:
        resized_w, resized_h = resized_size(width, height, view.short_side)
        assert view.left >= 0 and view.top >= 0 and view.left + 64 <= resized_w and view.top + 64 <= resized_h
        sx, sy = width / resized_w, height / resized_h  # the view's square in source pixels
        left, top = int(view.left * sx), int(view.top * sy)
        covered[top : round((view.top + 64) * sy), left : round((view.left + 64) * sx)] = True
    assert covered.all()  # an object anywhere in the photo is in some view (a centre crop alone drops the ends)
    assert [v.short_side for v in views] == [64] * 3 + [round(64 / ZOOM)] * 5


def _smooth_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Photo-like (smooth) random content: pure noise would measure the kernels' rounding of clipped overshoot."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, size[1] // 4), max(2, size[0] // 4), 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def _real_photos(count: int) -> list[Image.Image]:
    folder = SHARED_DATA / "voc2012-sample"
    return [Image.open(p).convert("RGB") for p in sorted(folder.rglob("*.jpg"))[:count]]


def test_views_are_torchvision_resize_and_crops():
    """Each view is torchvision's Resize + CenterCrop / end squares / FiveCrop on the PIL image, as open_clip
    preprocesses: the same pixels up to the kernels' rounding (a misplaced crop moves textured pixels by far more)."""
    from torchvision import transforms as T

    side = 64
    images = [_smooth_image(size, n) for n, size in enumerate([(500, 275), (333, 500), (97, 96), (64, 200), (40, 30)])]
    for image in images + _real_photos(8):  # the real photos where ../shared/data is present
        near = T.Resize(side, interpolation=T.InterpolationMode.BICUBIC)(image)
        far = T.Resize(round(side / ZOOM), interpolation=T.InterpolationMode.BICUBIC)(image)
        width, height = near.size
        expected = [T.CenterCrop(side)(near), near.crop((0, 0, side, side)),
                    near.crop((width - side, height - side, width, height)), *T.FiveCrop(side)(far)]
        views = MultiCropTransform(build_image_transform(side, train=False)).pixels(image)
        for got, want in zip(views, expected, strict=True):
            grey = (got.int() - torch.from_numpy(np.array(want)).permute(2, 0, 1).int()).abs()
            assert grey.max() <= 2 and grey.float().mean() < 0.05, (image.size, grey.max(), grey.float().mean())


def test_first_view_is_exactly_the_centre_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    centre = build_image_transform(64, train=False)
    views = MultiCropTransform(centre)(image)
    assert views.shape == (VIEWS, 3, 64, 64)
    assert torch.equal(views[0], centre(image))
    assert not torch.equal(views[1], views[2])  # the two ends of the long side differ


def test_encode_views_averages_unit_embeddings_per_image():
    weight = torch.randn(3, 5)

    def encode(x):
        return F.normalize(x.mean(dim=(2, 3)) @ weight, dim=-1)

    flat = torch.randn(2, 3, 8, 8)
    assert torch.equal(encode_views(encode, flat), encode(flat))
    multi = torch.randn(2, 4, 3, 8, 8)
    expected = F.normalize(torch.stack([encode(multi[i]).mean(0) for i in range(2)]), dim=-1)
    assert torch.allclose(encode_views(encode, multi), expected, atol=1e-6)


def test_choices_are_checked():
    centre = build_image_transform(32, train=False)
    assert eval_transform(centre, "centre") is centre
    assert isinstance(eval_transform(centre, "multi"), MultiCropTransform)
    with pytest.raises(VgclipError, match="eval.crops=multi needs vgclip's eval image transform"):
        eval_transform(lambda image: image, "multi")
    with pytest.raises(ConfigError, match="eval.crops"):
        EvalConfig(crops="corners")


def test_multi_crop_zeroshot_records_crops_and_predict_follows_the_thresholds(tiny_run, multi_report):
    out = multi_report
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["crops"] == "multi"
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["crops"] == "multi"
    from vgclip.eval.tagging import predict_settings

    settings = predict_settings(tiny_run, thresholds["classes"], thresholds_file=out / "thresholds.json")
    assert settings.crops == "multi"
    assert predict_settings(tiny_run, thresholds["classes"]).crops == "centre"  # the run's own eval config


def test_predict_and_serve_score_with_the_crops_of_the_thresholds(tiny_run, multi_report, tmp_path, capsys):
    from vgclip.cli import main as cli
    from vgclip.serve.startup import ServeSettings, build_app

    out = multi_report
    capsys.readouterr()
    image = tmp_path / "wide.png"
    Image.new("RGB", (90, 30), "red").save(image)
    classes = ",".join(json.loads((out / "thresholds.json").read_text())["classes"])
    assert cli(["predict", "--checkpoint", str(tiny_run), "--labels", classes, "--thresholds",
                str(out / "thresholds.json"), str(image), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["crops"] == "multi" and len(printed["results"]) == 1
    from fastapi.testclient import TestClient

    with TestClient(build_app(ServeSettings(checkpoint=tiny_run, thresholds=out / "thresholds.json"))) as client:
        assert client.get("/api/labels").json()["crops"] == "multi"
        answer = client.post("/api/predict", data={"labels": classes},
                             files=[("images", ("wide.png", image.read_bytes(), "image/png"))])
        assert answer.status_code == 200, answer.text
        served = answer.json()["results"][0]["scores"]
    # The server scores the 8 crops as predict does (same model, same thresholds file).
    assert served == pytest.approx(printed["results"][0]["scores"], abs=1e-5)


@pytest.mark.parametrize("crops", ["centre", "multi"])
def test_encode_images_asks_for_unit_embeddings(tmp_path, crops):
    """open_clip models return unnormalised features unless asked: encode_images must ask, with or without views."""
    from vgclip.eval.scoring import encode_images

    class OpenClipLike(torch.nn.Module):
        def encode_image(self, images, normalize: bool = False):
            features = images.mean(dim=(2, 3)) * 10
            return F.normalize(features, dim=-1) if normalize else features

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(path)
    enc = encode_images(OpenClipLike(), [path], build_image_transform(32, train=False), num_workers=0, crops=crops)
    assert torch.allclose(enc.embeddings.norm(dim=-1), torch.ones(1), atol=1e-5)
