"""Every kind of bad input to `vgclip prepare`: counted skips with the right reasons, good items all kept."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.prepare._shard_reading import shard_samples
from vgclip.commands import prepare
from vgclip.data.images import BadImageError, open_image, open_image_checked, pil_detail
from vgclip.errors import VgclipError
from vgclip.prepare.cleaning import CleaningSettings, clean_phrase
from vgclip.prepare.visual_genome import stream_json_array

W, H = 40, 30


def run_prepare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare", *argv])
    return args.run(args)


def _save(path: Path, img: Image.Image, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def _region(rid: int, phrase, x=2, y=2, w=10, h=8, image_id=None) -> dict:
    region = {"region_id": rid, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}
    if image_id is not None:
        region["image_id"] = image_id
    return region


def build_bad_vg(root: Path) -> dict:
    """A VG folder with one image per failure mode; return the expected outcome."""
    vg = root / "VG_100K"
    good_jpeg = Image.new("RGB", (W, H), (200, 40, 40))
    _save(vg / "1.jpg", good_jpeg)                                  # good
    # 2: no file at all
    (vg / "3.jpg").write_bytes(b"")                                 # zero bytes
    buf = io.BytesIO()
    Image.effect_noise((W, H), 60).convert("RGB").save(buf, "JPEG")
    (vg / "4.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    _save(vg / "5.jpg", good_jpeg, "PNG")                           # PNG named .jpg: usable
    _save(vg / "6.jpg", good_jpeg.convert("P"), "GIF")              # GIF named .jpg: usable
    _save(vg / "7.jpg", Image.new("CMYK", (W, H), (0, 200, 0, 0)))  # CMYK
    _save(vg / "8.jpg", Image.new("L", (W, H), 90))                 # grayscale
    _save(root / "VG_100K_2" / "9.jpg", good_jpeg.convert("P"), "PNG")  # palette, in the other folder
    _save(vg / "10.jpg", Image.new("RGBA", (W, H), (0, 0, 0, 0)), "PNG")  # alpha -> white
    _save(vg / "11.jpg", Image.new("RGB", (W * 5, H * 5)))          # far larger than image_data says
    _save(vg / "12.jpg", Image.new("RGB", (300, 200)))              # over --max-pixels 50000
    _save(vg / "13.jpg", good_jpeg)                                 # image_data entry lacks keys
    _save(vg / "14.jpg", good_jpeg)                                 # regions entry lacks "regions"
    image_data = [{"image_id": i, "width": W, "height": H, "url": f"http://x/VG_100K/{i}.jpg"}
                  for i in range(1, 15) if i not in (12, 13)]
    image_data.append({"image_id": 12, "width": 300, "height": 200, "url": "http://x/VG_100K/12.jpg"})
    image_data.append({"image_id": 13, "url": "http://x/VG_100K/13.jpg"})
    regions = []
    for i in range(1, 15):
        if i == 14:
            regions.append({"id": 14, "phrases": []})
            continue
        regions.append({"id": i, "regions": [_region(i * 100, f"thing number {i}"),
                                             _region(i * 100 + 1, f"other thing {i}", x=30, y=25, w=20, h=20)]})
    # Image 1 also carries every kind of bad phrase / box.
    regions[0]["regions"] += [
        _region(1, "A\x07 red\u200b  car\t\n"),         # control chars: cleaned, kept as "A red car"
        _region(2, "\x01\x02 \x1f"),                    # nothing left: dropped
        _region(3, "INVALID_UTF8"),                     # replaced by raw bytes below
        _region(4, "negative box", w=-5),
        _region(5, "zero box", h=0),
        _region(6, "outside box", x=100, y=100),
        _region(7, "THING NUMBER 1"),                   # duplicate, case-insensitive
        _region(8, "x" * 300),                          # too long
        {"region_id": 9, "phrase": "no box"},           # missing keys
    ]
    raw = json.dumps(regions).encode("utf-8").replace(b"INVALID_UTF8", b"bad \xff\xfe")  # invalid UTF-8
    root.joinpath("region_descriptions.json").write_bytes(raw)
    root.joinpath("image_data.json").write_text(json.dumps(image_data))
    good = {1: 3, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 2}  # image id -> phrases that must arrive
    skips = {
        "image_missing_file": 0, "missing_image_file": 1, "image_empty_file": 1, "image_truncated": 1,
        "image_larger_than_expected": 1, "image_too_many_pixels": 1, "image_data_missing_keys": 1,
        "no_image_data": 1, "regions_entry_missing_keys": 1, "no_regions_entry": 0,
        "phrase_empty": 1, "phrase_invalid_utf8": 1, "box_nonpositive_size": 2, "box_outside_image": 1,
        "phrase_duplicate": 1, "phrase_too_long": 1, "region_missing_keys": 1,
    }
    return {"good": good, "skips": {k: v for k, v in skips.items() if v}}


def read_shards(out: Path) -> dict[str, dict]:
    """key -> (json meta, image) of every sample in every shard."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*/shard-*.tar")):
        for key, sample in shard_samples(tar_path).items():
            samples[key] = {"json": sample["meta"], "jpg": Image.open(io.BytesIO(sample["jpg"]))}
    return samples


def test_every_bad_input_is_a_counted_skip_and_good_items_arrive(tmp_path: Path) -> None:
    expected = build_bad_vg(tmp_path / "vg")
    out = tmp_path / "shards"
    assert run_prepare("--vg-root", str(tmp_path / "vg"), "--out", str(out), "--workers", "1",
                       "--max-pixels", "50000", "--quiet") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["counts"] == expected["skips"]
    assert len(manifest["skipped"]["items"]) == sum(expected["skips"].values())
    samples = read_shards(out)
    assert {s["json"]["image_id"]: len(s["json"]["regions"]) for s in samples.values()} == expected["good"]
    phrases = {r["phrase"] for r in samples["vg-000000001"]["json"]["regions"]}
    assert phrases == {"thing number 1", "other thing 1", "A red car"}
    for s in samples.values():
        assert s["jpg"].format == "JPEG" and s["jpg"].mode == "RGB"
        for region in s["json"]["regions"]:  # the overflowing box was clipped to the image
            x, y, w, h = region["box"]
            assert 0 <= x and 0 <= y and x + w <= s["json"]["width"] + 1e-6 and y + h <= s["json"]["height"] + 1e-6
    assert samples["vg-000000010"]["jpg"].getpixel((5, 5)) >= (250, 250, 250)  # alpha over white
    notes = manifest["notes"]["counts"]
    assert notes == {"format_mismatch:PNG_named_jpg": 3, "format_mismatch:GIF_named_jpg": 1}
    total = manifest["splits"]["train"]["images"] + manifest["splits"]["val"]["images"]
    assert total == len(expected["good"])


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    build_bad_vg(tmp_path / "vg")
    bad = tmp_path / "vg" / "region_descriptions.json"
    bad.write_text('[{"id": 1, "regions": []}, {"id": 2,, "regions": []}]')
    with pytest.raises(VgclipError, match=r"region_descriptions\.json: malformed JSON near byte \d+"):
        run_prepare("--vg-root", str(tmp_path / "vg"), "--out", str(tmp_path / "out"), "--quiet")
    bad.write_text('{"not": "an array"}')
    with pytest.raises(VgclipError, match="expected an array at the top level"):
        list(stream_json_array(bad))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_pillow_decompression_bomb_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "a.jpg", Image.new("RGB", (120, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own guard (warning, then error)
    for limit in (5000, 1500):  # above 2x and between 1x and 2x of Pillow's limit
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(BadImageError) as info:
            open_image_checked(tmp_path / "a.jpg", max_pixels=10**9)
        assert info.value.reason == "too_many_pixels"


def test_image_errors_name_the_file_not_pillows_buffer(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is text, not a JPEG")
    expected = "../notes.jpg: not_an_image (not a JPEG, PNG, GIF, BMP, WEBP or TIFF image)"
    for source in (b"this is text, not a JPEG", tmp_path / "notes.jpg"):  # bytes (serve, predict) or a path
        with pytest.raises(BadImageError) as info:
            open_image(source, "../notes.jpg")
        assert str(info.value) == expected
    from vgclip.serve.engine import check_upload

    with pytest.raises(BadImageError, match="^notes.jpg: not_an_image \\(not a JPEG") as info:
        check_upload("notes.jpg", b"GIF89a" + b"\0" * 10, 10**6)  # a truncated header: no format Pillow knows
    assert "BytesIO" not in str(info.value) and len(str(info.value).splitlines()) == 1
    leaky = OSError("broken data stream when reading image file <_io.BytesIO object at 0x7f3a2c1b9e50>\nmore")
    assert pil_detail(leaky) == "broken data stream when reading image file more"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a"]))
def test_random_bytes_never_crash_the_image_opener(tmp_path: Path, data: bytes, prefix: bytes) -> None:
    path = tmp_path / "fuzz.jpg"
    path.write_bytes(prefix + data)
    try:
        img = open_image_checked(path)
    except BadImageError as exc:
        assert exc.reason
    else:
        assert img.mode == "RGB"


@given(st.text(max_size=80))
def test_clean_phrase_never_leaves_control_characters(text: str) -> None:
    cleaned, reason = clean_phrase(text, CleaningSettings(max_phrase_chars=60))
    if cleaned is None:
        assert reason.startswith("phrase_")
    else:
        assert cleaned == cleaned.strip() and "  " not in cleaned and 0 < len(cleaned) <= 60
        assert all(ch.isprintable() for ch in cleaned) and "\ufffd" not in cleaned
