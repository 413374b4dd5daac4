"""Shards where users keep them: loopback HTTP, fsspec (in-memory "s3"), pipe:, brace patterns of
img2dataset-layout shards; a stream cut mid-shard; the tar reader switch; prepare that finds nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from tests._train_fixtures import http_folder
from vgclip.cli import main
from vgclip.config import DataConfig
from vgclip.data import loader as loader_module
from vgclip.data.loader import count_samples, list_shards, make_loader
from vgclip.data.shard_locations import read_samples
from vgclip.data.transforms import build_image_transform
from vgclip.errors import VgclipError

EVAL_16 = build_image_transform(16, mean=(0, 0, 0), std=(1, 1, 1), train=False)
TRAIN_16 = build_image_transform(16, train=True)


def words(texts: list[str]) -> dict[str, list[str]]:
    """A "tokenizer" that keeps the texts, so batches can be compared by text."""
    return {"text": texts}


def jpeg(colour: tuple[int, int, int], size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def prepared_folder(root: Path, sizes=(5, 4, 6)) -> Path:
    """A folder in the layout `vgclip prepare` writes: train shards and a manifest listing them."""
    (root / "train").mkdir(parents=True)
    names, i = [], 0
    for s, size in enumerate(sizes):
        name = f"train/shard-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(size):
                meta = {"image_id": i, "source": "vg", "width": 40, "height": 30,
                        "regions": [{"phrase": f"img{i} thing {k}", "box": [2 * k, 2, 20, 20]} for k in range(3)]}
                sink.write({"__key__": f"vg-{i:09d}", "jpg": jpeg((i * 13 % 256, 80, 160)), "json": json.dumps(meta)})
                i += 1
        names.append(name)
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": names, "images": i}}}))
    return root


def batches(data, cfg: DataConfig, transform=EVAL_16, train=False, start_batch=0) -> list[tuple[torch.Tensor, list]]:
    loader = make_loader(data, "train", cfg, transform, words, train=train, seed=3, epoch=1, start_batch=start_batch)
    return [(images, tokens["text"]) for images, tokens in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(ta == tb and torch.equal(ia, ib) for (ia, ta), (ib, tb) in zip(a, b))


def test_http_folder_gives_the_same_batches_as_disk_and_resumes_exactly(tmp_path):
    folder = prepared_folder(tmp_path / "shards")
    cfg = DataConfig(batch_size=2, num_workers=2, shuffle_buffer=4)
    with http_folder(folder) as url:
        assert [str(s) for s in list_shards(url, "train")] == [url + f"train/shard-00000{i}.tar" for i in range(3)]
        assert count_samples(url, "train") == 15
        local, remote = batches(folder, cfg, TRAIN_16, train=True), batches(url, cfg, TRAIN_16, train=True)
        assert len(local) >= 5 and same(local, remote)
        assert same(batches(url, cfg, TRAIN_16, train=True, start_batch=4), local[4:])


def test_stream_cut_mid_shard_is_retried_then_skipped(tmp_path, monkeypatch):
    folder = prepared_folder(tmp_path / "shards")
    monkeypatch.setattr(loader_module, "RETRY_WAIT_S", 0.0)
    with http_folder(folder, cut="shard-000001.tar", cut_at=3 * 512 + 100) as url:
        loader = make_loader(url, "train", DataConfig(batch_size=1, num_workers=0), EVAL_16, words,
                             train=False, seed=0)
        texts = [t for _, tokens in loader for t in tokens["text"]]
    ids = sorted({int(t.split()[0][3:]) for t in texts})
    assert set(range(5)) <= set(ids) and set(range(9, 15)) <= set(ids)  # shards 0 and 2 in full
    assert len(texts) == len(ids)  # the retries gave no sample twice
    assert loader.skipped.get("bad_tar") == 1
    assert loader.failed_shards == [url + "train/shard-000001.tar"]


def img2dataset_shards(root: Path) -> str:
    """Shards as img2dataset writes them (jpg + txt + json, via webdataset's ShardWriter); returns a
    brace pattern. Sample 3 has no caption, sample 5 an image that does not decode, 7 is a PNG."""
    root.mkdir(parents=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=4) as sink:
        for i in range(10):
            sample = {"__key__": f"{i:09d}", "jpg": jpeg((200, i * 20, 40)), "txt": f"a photo number {i}",
                      "json": json.dumps({"url": f"https://example.com/{i}.jpg", "caption": f"a photo number {i}",
                                          "key": f"{i:09d}", "status": "success"})}
            if i == 3:
                del sample["txt"]
                sample["json"] = json.dumps({"url": "https://example.com/3.jpg", "status": "success"})
            if i == 5:
                sample["jpg"] = b"\xff\xd8 not really a jpeg"
            if i == 7:
                png = io.BytesIO()
                Image.new("RGB", (30, 30), "white").save(png, format="PNG")
                sample["png"] = png.getvalue()
                del sample["jpg"]
            sink.write(sample)
    return str(root / "{00000..00002}.tar")


def test_img2dataset_shards_by_brace_pattern(tmp_path):
    pattern = img2dataset_shards(tmp_path / "cc")
    assert len(list_shards(pattern, "train")) == 3
    with pytest.raises(VgclipError, match="no 'val' split"):
        list_shards(pattern, "val")
    loader = make_loader(pattern, "train", DataConfig(batch_size=4, num_workers=2), EVAL_16, words,
                         train=False, seed=0)
    texts = sorted(t for _, tokens in loader for t in tokens["text"])
    assert texts == sorted(f"a photo number {i}" for i in (0, 1, 2, 4, 6, 7, 8, 9))
    assert loader.skipped == {"no_phrases": 1, "bad_image": 1}
    with pytest.raises(VgclipError, match="only captions|caption shards"):
        make_loader(pattern, "train", DataConfig(pairing="region"), EVAL_16, words, train=True, seed=0)


def test_s3_url_through_fsspec(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFileSystem

    class S3InMemory(MemoryFileSystem):
        """fsspec's in-memory filesystem answering s3:// URLs: the fsspec path end to end, no cloud."""

        protocol = ("s3",)

        @classmethod
        def _strip_protocol(cls, path: str) -> str:
            return MemoryFileSystem._strip_protocol(path.removeprefix("s3://"))

    folder = prepared_folder(tmp_path / "shards", sizes=(3, 4))
    memory = S3InMemory()
    for path in folder.rglob("*"):
        if path.is_file():
            memory.pipe_file(f"/bucket/prefix/{path.relative_to(folder)}", path.read_bytes())
    fsspec.register_implementation("s3", S3InMemory, clobber=True)
    try:
        cfg = DataConfig(batch_size=2, num_workers=0)
        assert same(batches("s3://bucket/prefix/", cfg), batches(folder, cfg))
    finally:
        fsspec.register_implementation("s3", "s3fs.S3FileSystem", clobber=True)
        memory.rm("/bucket", recursive=True)


def test_pipe_and_webdataset_reader_give_the_same_samples(tmp_path):
    folder = prepared_folder(tmp_path / "shards", sizes=(4,))
    shard = folder / "train" / "shard-000000.tar"
    direct = list(read_samples(shard))
    assert len(direct) == 4
    assert list(read_samples(f"pipe:cat {shard}")) == direct
    assert list(read_samples(shard, reader="webdataset")) == direct
    cfg = DataConfig(batch_size=2, num_workers=0)
    assert same(batches(folder, cfg), batches(folder, DataConfig(batch_size=2, num_workers=0, tar_reader="webdataset")))


def test_prepare_with_every_image_missing_fails_in_one_line(tmp_path, capsys):
    vg = tmp_path / "vg"
    (vg / "VG_100K").mkdir(parents=True)  # the folder exists, the images are elsewhere
    (vg / "image_data.json").write_text(json.dumps([{"image_id": i, "width": 64, "height": 48} for i in (1, 2)]))
    (vg / "region_descriptions.json").write_text(json.dumps([
        {"id": i, "regions": [{"region_id": i, "image_id": i, "phrase": "a thing", "x": 1, "y": 1, "width": 9,
                               "height": 9}]} for i in (1, 2)]))
    code = main(["prepare", "--vg-root", str(vg), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "missing_image_file 2" in err and str(vg / "VG_100K") in err
    assert not (tmp_path / "out" / "manifest.json").exists()
