"""`vgclip train` on shards where users keep them (issue 13, training side): a prepared folder behind a
loopback HTTP server trains and resumes exactly as from disk, a shard cut mid-stream is named in the
summary, img2dataset shards (brace pattern) train with their skips counted and validate on --val-data."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from tests._train_fixtures import http_folder, write_shards
from vgclip.cli import main
from vgclip.config import load_config
from vgclip.data import loader as loader_module
from vgclip.train.loop import train

TINY = ["data.num_workers=0", "train.checkpoint_every=0"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_http_folder_trains_and_resumes_exactly_as_the_folder_on_disk(tmp_path):
    shards = write_shards(tmp_path / "shards", n_train=32, n_val=8, per_shard=8)
    overrides = ["data.num_workers=2", "train.epochs=2", "train.checkpoint_every=2", "train.keep_checkpoints=10"]
    cfg = load_config("tiny", overrides)
    disk = train(cfg, shards, tmp_path / "disk")
    with http_folder(shards) as url:
        remote = train(cfg, url, tmp_path / "http")
        # Resume from the mid-epoch checkpoint of the HTTP run (epoch 1, 2 of its 4 micro-batches done).
        resumed_run = tmp_path / "resumed"
        shutil.copytree(tmp_path / "http" / "checkpoints" / "step-6", resumed_run / "checkpoints" / "step-6")
        resumed = train(cfg, url, resumed_run, resume="latest")
    assert disk["steps"] == remote["steps"] == resumed["steps"] == 8
    assert remote["data"] == url and remote["val_data"] == url  # validation read the folder's val split over HTTP
    assert remote["val"]["loss"] == disk["val"]["loss"]
    assert remote["skipped"] == {} and remote["failed_shards"] == []
    assert resumed["steps_this_session"] == 2
    assert_same_weights(tmp_path / "disk", tmp_path / "http")
    assert_same_weights(tmp_path / "disk", resumed_run)


def test_a_shard_cut_mid_stream_is_skipped_and_named_in_the_summary(tmp_path, monkeypatch, capsys):
    shards = write_shards(tmp_path / "shards", n_train=32, n_val=8, per_shard=8)
    monkeypatch.setattr(loader_module, "RETRY_WAIT_S", 0.0)
    with http_folder(shards, cut="train/shard-000001.tar") as url:
        code = main(["train", "--data", url, "--out", str(tmp_path / "run"), "--config", "tiny", *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["failed_shards"] == [url + "train/shard-000001.tar"]
    assert summary["skipped"] == {"bad_tar": 1}
    assert summary["samples_seen"] >= 24  # the other three shards (3 batches of 8) were trained on
    assert f"could not be read to the end and were skipped: {url}train/shard-000001.tar" in err


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def img2dataset_shards(root: Path, count: int, *, missing_caption=(), bad_image=()) -> str:
    """Shards as img2dataset writes them (jpg + txt + json, webdataset's ShardWriter, 8 per shard);
    returns their brace pattern."""
    root.mkdir(parents=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(count):
            caption = f"a {('red', 'green', 'blue')[i % 3]} picture number {i}"
            sample = {"__key__": f"{i:09d}", "jpg": jpeg(((i % 3 == 0) * 200, (i % 3 == 1) * 200, (i % 3 == 2) * 200)),
                      "txt": caption, "json": json.dumps({"url": f"https://example.com/{i}.jpg", "caption": caption,
                                                          "key": f"{i:09d}", "status": "success"})}
            if i in missing_caption:  # img2dataset keeps a sample whose caption column was empty
                del sample["txt"]
                sample["json"] = json.dumps({"url": f"https://example.com/{i}.jpg", "status": "success"})
            if i in bad_image:
                sample["jpg"] = b"\xff\xd8 this is no jpeg"
            sink.write(sample)
    return str(root / f"{{00000..{(count - 1) // 8:05d}}}.tar")


def test_img2dataset_pattern_trains_counts_skips_and_validates_on_val_data(tmp_path, capsys):
    train_pattern = img2dataset_shards(tmp_path / "cc", 24, missing_caption=(3, 17), bad_image=(5, 20))
    val_pattern = img2dataset_shards(tmp_path / "cc-val", 8)
    run = tmp_path / "run"
    code = main(["train", "--data", train_pattern, "--val-data", val_pattern, "--out", str(run), "--config", "tiny",
                 *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["data"] == train_pattern and summary["val_data"] == val_pattern
    assert summary["samples_seen"] >= 16  # 20 usable samples: at least 2 batches of 8
    assert summary["skipped"] == {"bad_image": 2, "no_phrases": 2}  # validation read 8 clean samples
    assert summary["val"]["loss"] > 0 and summary["failed_shards"] == []
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("pairing", ["region", "combine:3"])
def test_pairings_that_need_regions_say_a_pattern_has_only_captions(tmp_path, capsys, pairing):
    pattern = img2dataset_shards(tmp_path / "cc", 8)
    run = tmp_path / "run"
    assert main(["train", "--data", pattern, "--out", str(run), "--config", "tiny", f"data.pairing={pairing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "only captions" in err and f"data.pairing={pairing}" in err
    assert not run.exists()  # refused before anything was written


def test_bad_locations_are_one_line_errors_naming_them(tmp_path, capsys):
    pattern = img2dataset_shards(tmp_path / "cc", 8)
    missing = str(tmp_path / "cc" / "{00000..00002}.tar")
    assert main(["train", "--data", missing, "--out", str(tmp_path / "run"), "--config", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such shard file(s)" in err and str(tmp_path / "cc" / "00001.tar") in err and "\n" not in err
    assert main(["train", "--data", pattern, "--val-data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"),
                 "--config", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vgclip train: error: --val-data") and "no such folder" in err
    shards = write_shards(tmp_path / "shards", n_train=8, n_val=0, per_shard=8)
    assert main(["train", "--data", pattern, "--val-data", str(shards), "--out", str(tmp_path / "run"),
                 "--config", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--val-data {shards}: the val shards hold no usable samples" in err


class FakeLoader:
    """What a finished ShardLoader reports."""

    def __init__(self, skipped: dict[str, int], failed: list[str]) -> None:
        self.skipped, self.failed_shards = skipped, failed


def test_the_summary_adds_up_every_loader_and_every_rank():
    from vgclip.train.inputs import DataReport

    rank1 = DataReport()
    rank1.track(FakeLoader({"bad_tar": 2, "bad_image": 1}, ["http://h/b.tar", "http://h/c.tar"]))
    blobs: list[bytes] = []
    rank1.summary(lambda blob: blobs.append(blob) or [blob])
    rank0 = DataReport()
    rank0.track(FakeLoader({"bad_tar": 1}, ["http://h/b.tar"]))  # epoch 0
    rank0.track(iter([]))  # a plain iterable of batches reports nothing
    rank0.track(FakeLoader({"no_phrases": 3}, []))  # epoch 1
    assert rank0.summary(lambda blob: [blob, blobs[0]]) == {
        "skipped": {"bad_image": 1, "bad_tar": 3, "no_phrases": 3},
        "failed_shards": ["http://h/b.tar", "http://h/c.tar"],
    }
