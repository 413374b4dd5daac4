"""`vgclip download` against a loopback HTTP server: no real host is ever contacted.

The server (127.0.0.1, port 0, one thread) serves small archives built from the synthetic writers in the
real layouts: a VG-like zip pair plus the two JSON zips, and a VOC2007-like trainval/test tar pair.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vgclip import cli
from vgclip.data.voc import load_voc
from vgclip.download import archives, install
from vgclip.download.archives import Archive, DatasetSource
from vgclip.download.fetch import FetchSettings, fetch, part_path
from vgclip.download.install import WORK_DIR, DownloadSettings, download_dataset
from vgclip.errors import VgclipError
from vgclip.prepare.cleaning import CleaningSettings, Skips
from vgclip.prepare.visual_genome import iter_vg_records
from vgclip.synthetic.writers import write_synthetic_vg, write_synthetic_voc

SIDES = {"min_side": 64, "max_side": 96}
FAST = FetchSettings(retries=0, backoff_s=0.0, timeout_s=10.0, progress=False)


class LoopbackServer:
    """Serves `files` by name with Range support; records (name, Range header) of every GET."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.drop_next: set[str] = set()  # names whose next response stops half-way
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                server.respond(self, name)

            def log_message(self, *args) -> None:  # keep pytest's output clean
                return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def respond(self, handler: http.server.BaseHTTPRequestHandler, name: str) -> None:
        data = self.files[name]
        start = 0
        spec = handler.headers.get("Range")
        if spec and not self.ignore_range:
            start = int(spec.removeprefix("bytes=").split("-")[0])
            past_end = start >= len(data)
            handler.send_response(416 if past_end else 206)
            handler.send_header("Content-Range", f"bytes {'*' if past_end else f'{start}-{len(data) - 1}'}/{len(data)}")
        else:
            handler.send_response(200)
        body = data[start:]  # empty past the end
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if name in self.drop_next:
            self.drop_next.discard(name)
            body = body[: len(body) // 2]  # then the connection closes: the client sees a short body
            handler.close_connection = True
        handler.wfile.write(body)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip(entries: dict[str, bytes], compression: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(root: Path, members: list[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for path in members:
            tf.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return buf.getvalue()


def _files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder.parent).as_posix(): p.read_bytes() for p in sorted(folder.iterdir())}


def _voc_tars(root: Path) -> tuple[bytes, bytes]:
    """Real VOC2007 ships trainval and test as two tars that fill the same VOCdevkit/VOC2007 folder."""
    voc = root / "VOCdevkit" / "VOC2007"
    main = voc / "ImageSets" / "Main"
    tars = []
    for split in ("trainval", "test"):
        ids = (main / f"{split}.txt").read_text().split()
        members = [root / "VOCdevkit", voc, voc / "Annotations", voc / "JPEGImages", voc / "ImageSets", main]
        members += [voc / "Annotations" / f"{i}.xml" for i in ids] + [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
        members += sorted(main.glob(f"*{split}.txt"))
        tars.append(_tar(root, members))
    return tars[0], tars[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Synthetic VG and VOC folders and the archive bytes made from them."""
    root = tmp_path_factory.mktemp("download-src")
    write_synthetic_vg(root / "vg", 10, seed=5, **SIDES)
    write_synthetic_voc(root / "voc", 10, seed=5, **SIDES)
    vg = root / "vg"
    assert any((vg / "VG_100K").iterdir()) and any((vg / "VG_100K_2").iterdir())
    trainval, test = _voc_tars(root / "voc")
    files = {
        "images.zip": _zip(_files_under(vg / "VG_100K"), zipfile.ZIP_STORED),
        "images2.zip": _zip(_files_under(vg / "VG_100K_2"), zipfile.ZIP_STORED),
        "image_data.json.zip": _zip({"image_data.json": (vg / "image_data.json").read_bytes()}, zipfile.ZIP_DEFLATED),
        # Named differently inside, as some mirrors do: installed as region_descriptions.json anyway.
        "region_descriptions.json.zip": _zip({"region_descriptions_v1_2.json": (vg / "region_descriptions.json")
                                              .read_bytes()}, zipfile.ZIP_DEFLATED),
        "VOCtrainval_06-Nov-2007.tar": trainval,
        "VOCtest_06-Nov-2007.tar": test,
    }
    return {"root": root, "files": files}


@pytest.fixture
def server(built):
    srv = LoopbackServer(built["files"])
    yield srv
    srv.close()


def vg_source(server: LoopbackServer, files: dict[str, bytes]) -> DatasetSource:
    """A VG table like the real one: image zips first (one with a checksum, one checked by CRC), JSON last."""
    def entry(name: str, provides: str, **kw) -> Archive:
        return Archive(name, server.url(name), "zip", (provides,), size=len(files[name]), **kw)

    return DatasetSource("vg-test", "Visual Genome (test)", (
        entry("images.zip", "VG_100K", sha256=hashlib.sha256(files["images.zip"]).hexdigest(), images=True),
        entry("images2.zip", "VG_100K_2", images=True),
        entry("image_data.json.zip", "image_data.json", single_file=True),
        entry("region_descriptions.json.zip", "region_descriptions.json", single_file=True),
    ))


def voc_source(server: LoopbackServer, files: dict[str, bytes]) -> DatasetSource:
    archives = tuple(
        Archive(name, server.url(name), "tar", ("VOCdevkit/VOC2007",), size=len(files[name]),
                md5=hashlib.md5(files[name]).hexdigest())
        for name in ("VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar")
    )
    return DatasetSource("voc2007", "Pascal VOC2007 (test)", archives, root="VOCdevkit/VOC2007",
                         reader_flag="--voc-root")


def _vg_records(root: Path) -> list[dict]:
    return list(iter_vg_records(root, CleaningSettings(), Skips()))


def test_vg_download_gives_a_folder_prepare_reads_and_a_rerun_does_nothing(built, server, tmp_path):
    out = tmp_path / "visual_genome"
    result = download_dataset(vg_source(server, built["files"]), out, DownloadSettings(fetch=FAST))
    assert result.root == out and len(result.installed) == 4
    records = _vg_records(out)
    expected = _vg_records(built["root"] / "vg")
    assert [r["key"] for r in records] == [r["key"] for r in expected] and len(records) == 10
    assert {Path(r["path"]).parent.name for r in records} == {"VG_100K", "VG_100K_2"}
    assert [r["regions"] for r in records] == [r["regions"] for r in expected]
    # Staging and archives are gone; only the markers stay in the hidden work folder.
    assert sorted(p.name for p in (out / WORK_DIR).iterdir()) == ["archives", "installed"]
    assert not any((out / WORK_DIR / "archives").iterdir())
    seen = len(server.requests)
    again = download_dataset(vg_source(server, built["files"]), out, DownloadSettings(fetch=FAST))
    assert again.installed == [] and again.downloaded == [] and len(server.requests) == seen


def test_vg_folder_passes_vgclip_prepare(built, server, tmp_path):
    out = tmp_path / "vg"
    download_dataset(vg_source(server, built["files"]), out, DownloadSettings(fetch=FAST))
    shards = tmp_path / "shards"
    code = cli.main(["prepare", "--vg-root", str(out), "--out", str(shards), "--workers", "1",
                     "--train-images", "8", "--val-images", "2", "--quiet"])
    assert code == 0
    assert list((shards / "train").glob("shard-*.tar")) and list((shards / "val").glob("shard-*.tar"))


def test_voc2007_command_merges_trainval_and_test(built, server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(archives.SOURCES, "voc2007", voc_source(server, built["files"]))
    assert cli.main(["download", "voc2007", "--out", str(tmp_path / "data"), "--quiet"]) == 0
    original = built["root"] / "voc"
    for split in ("test", "trainval"):
        got, want = load_voc(tmp_path / "data", split), load_voc(original, split)
        assert got.root == tmp_path / "data" / "VOCdevkit" / "VOC2007"
        assert got.image_ids == want.image_ids and np.array_equal(got.labels, want.labels)
        assert np.array_equal(got.ignore, want.ignore) and not got.skipped
    capsys.readouterr()
    assert cli.main(["download", "voc2007", "--out", str(tmp_path / "data")]) == 0
    assert "already complete" in capsys.readouterr().out


def test_dropped_connection_then_rerun_resumes_with_a_range_request(built, server, tmp_path):
    files = built["files"]
    source = vg_source(server, files)
    server.drop_next.add("images.zip")
    with pytest.raises(VgclipError, match=r"images\.zip.*rerun to resume") as err:
        download_dataset(source, tmp_path / "vg", DownloadSettings(fetch=FAST))
    assert "\n" not in str(err.value)
    part = tmp_path / "vg" / WORK_DIR / "archives" / "images.zip.part"
    have = part.stat().st_size
    assert 0 < have < len(files["images.zip"])
    assert not (tmp_path / "vg" / "VG_100K").exists()
    download_dataset(source, tmp_path / "vg", DownloadSettings(fetch=FAST))
    assert ("images.zip", f"bytes={have}-") in server.requests
    assert len(_vg_records(tmp_path / "vg")) == 10


def test_a_retry_within_the_run_resumes_too(built, server, tmp_path):
    server.drop_next.add("images2.zip")
    retrying = replace(FAST, retries=2)
    download_dataset(vg_source(server, built["files"]), tmp_path / "vg", DownloadSettings(fetch=retrying))
    ranges = [r for name, r in server.requests if name == "images2.zip"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(built['files']['images2.zip']) // 2}-"
    assert len(_vg_records(tmp_path / "vg")) == 10


def test_a_server_ignoring_range_restarts_the_file_cleanly(built, server, tmp_path):
    server.drop_next.add("images.zip")
    server.ignore_range = True
    retrying = replace(FAST, retries=1)
    download_dataset(vg_source(server, built["files"]), tmp_path / "vg", DownloadSettings(fetch=retrying))
    assert len(_vg_records(tmp_path / "vg")) == 10  # the sha256 check passed: no duplicated prefix


def test_fetch_completes_a_whole_part_file_and_restarts_one_the_server_cannot_continue(built, server, tmp_path):
    name = "image_data.json.zip"
    data = built["files"][name]
    part_path(tmp_path / "a.zip").write_bytes(data)  # complete but never renamed: the server answers 416
    fetch(server.url(name), tmp_path / "a.zip", None, FAST)
    assert (tmp_path / "a.zip").read_bytes() == data and server.requests == [(name, f"bytes={len(data)}-")]
    part_path(tmp_path / "b.zip").write_bytes(data + b"junk")  # longer than the file: not a prefix of it
    fetch(server.url(name), tmp_path / "b.zip", None, replace(FAST, retries=1))
    assert (tmp_path / "b.zip").read_bytes() == data and server.requests[-1] == (name, None)


def _corrupt_member_data(data: bytes) -> bytes:
    """Flip bytes in the middle of the first member's data, keeping the size (CRC-32 then fails)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    raw = bytearray(data)
    raw[middle:middle + 8] = bytes(b ^ 0xFF for b in raw[middle:middle + 8])
    return bytes(raw)


def test_corrupted_zip_is_refused_kept_aside_and_nothing_extracted(built, server, tmp_path):
    files = built["files"]
    source = vg_source(server, files)  # images2.zip has no checksum: its CRCs are what catch the damage
    server.files["images2.zip"] = _corrupt_member_data(files["images2.zip"])
    out = tmp_path / "vg"
    with pytest.raises(VgclipError, match=r"images2\.zip: damaged download \(member .* CRC-32.*kept aside"):
        download_dataset(source, out, DownloadSettings(fetch=FAST))
    assert (out / WORK_DIR / "archives" / "images2.zip.bad").is_file()
    assert sorted(p.name for p in out.iterdir()) == [WORK_DIR]  # nothing extracted into the folder
    assert not list((out / WORK_DIR).glob("staging-*"))
    server.files["images2.zip"] = files["images2.zip"]  # the host is fixed: a rerun fetches it again
    download_dataset(source, out, DownloadSettings(fetch=FAST))
    assert len(_vg_records(out)) == 10


def test_checksum_mismatch_names_the_file_and_keeps_it(built, server, tmp_path):
    files = built["files"]
    source = voc_source(server, files)
    bad = bytearray(files["VOCtest_06-Nov-2007.tar"])
    bad[-2000] ^= 0xFF
    server.files["VOCtest_06-Nov-2007.tar"] = bytes(bad)
    with pytest.raises(VgclipError, match=r"VOCtest_06-Nov-2007\.tar: damaged download \(md5 [0-9a-f]{32}, "
                                          r"expected [0-9a-f]{32}\); kept aside as .*\.bad"):
        download_dataset(source, tmp_path / "data", DownloadSettings(fetch=FAST))
    assert not (tmp_path / "data" / "VOCdevkit").exists()


def test_interrupted_extraction_is_completed_by_the_rerun(built, server, tmp_path, monkeypatch):
    source = voc_source(server, built["files"])
    real = install.extract_into

    def crash_in_test_tar(path, archive, dest):
        if archive.filename.startswith("VOCtest"):
            (dest / "VOCdevkit" / "VOC2007" / "JPEGImages" / "half-written.jpg").write_bytes(b"\xff\xd8")
            raise KeyboardInterrupt
        real(path, archive, dest)

    monkeypatch.setattr(install, "extract_into", crash_in_test_tar)
    with pytest.raises(KeyboardInterrupt):
        download_dataset(source, tmp_path / "data", DownloadSettings(fetch=FAST))
    assert not (tmp_path / "data" / "VOCdevkit").exists()  # the half-extracted tree is only in staging
    with pytest.raises(VgclipError):
        load_voc(tmp_path / "data", "test")
    monkeypatch.setattr(install, "extract_into", real)
    fetched = len(server.requests)
    download_dataset(source, tmp_path / "data", DownloadSettings(fetch=FAST))
    assert len(server.requests) == fetched  # verified archives are reused, not fetched again
    assert load_voc(tmp_path / "data", "test").image_ids == load_voc(built["root"] / "voc", "test").image_ids


def test_install_interrupted_before_its_markers_is_finished_by_the_rerun(built, server, tmp_path, monkeypatch):
    source = vg_source(server, built["files"])
    real = install.atomic_write_text

    def crash_on_marker(path, text):
        if Path(path).parent.name == "installed":
            raise KeyboardInterrupt  # every path is renamed into place, no archive is marked installed yet
        real(path, text)

    monkeypatch.setattr(install, "atomic_write_text", crash_on_marker)
    with pytest.raises(KeyboardInterrupt):
        download_dataset(source, tmp_path, DownloadSettings(fetch=FAST))
    assert (tmp_path / "VG_100K").is_dir() and not (tmp_path / WORK_DIR / "installed").exists()
    monkeypatch.setattr(install, "atomic_write_text", real)
    fetched = len(server.requests)
    result = download_dataset(source, tmp_path, DownloadSettings(fetch=FAST))  # the paths are its own: no refusal
    assert len(result.installed) == 4 and len(server.requests) == fetched
    assert len(_vg_records(tmp_path)) == 10


def test_http_error_names_the_url_and_suggests_a_mirror(built, server, tmp_path):
    source = vg_source(server, built["files"])
    missing = replace(source.archives[2], url=server.url("moved/image_data.json.zip"))
    source = replace(source, archives=(missing,))
    with pytest.raises(VgclipError, match=r"http://127\.0\.0\.1:\d+/moved/image_data\.json\.zip: HTTP 404.*--mirror"):
        download_dataset(source, tmp_path / "vg", DownloadSettings(fetch=FAST))


def test_mirror_from_the_environment_replaces_the_host(built, server, tmp_path, monkeypatch):
    source = voc_source(server, built["files"])
    # The "official" host refuses connections; only the mirror can serve the files.
    dead = tuple(replace(a, url=f"http://127.0.0.1:9/pascal/{a.filename}") for a in source.archives)
    monkeypatch.setitem(archives.SOURCES, "voc2007", replace(source, archives=dead))
    monkeypatch.setenv(archives.MIRROR_ENV, server.url(""))
    assert cli.main(["download", "voc2007", "--out", str(tmp_path), "--quiet", "--retries", "0"]) == 0
    assert load_voc(tmp_path, "trainval").image_ids
    assert set([n for n, _ in server.requests]) == {"VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"}


def test_not_enough_space_says_how_much_is_needed_before_any_request(server, tmp_path):
    huge = Archive("huge.zip", server.url("huge.zip"), "zip", ("huge",), size=10**18)
    with pytest.raises(VgclipError, match=r"not enough free space in .*: 2000000\.0 TB needed, .* free"):
        download_dataset(DatasetSource("huge", "huge", (huge,)), tmp_path, DownloadSettings(fetch=FAST))
    assert server.requests == []


def test_a_folder_not_installed_by_download_is_never_replaced(built, server, tmp_path):
    (tmp_path / "VG_100K").mkdir()
    (tmp_path / "VG_100K" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(VgclipError, match=r"VG_100K already exists and was not installed by `vgclip download`"):
        download_dataset(vg_source(server, built["files"]), tmp_path, DownloadSettings(fetch=FAST))
    assert server.requests == [] and (tmp_path / "VG_100K" / "mine.jpg").is_file()


def test_no_images_fetches_annotations_only(built, server, tmp_path):
    source = vg_source(server, built["files"])
    download_dataset(source, tmp_path, DownloadSettings(fetch=FAST, images=False))
    assert set([n for n, _ in server.requests]) == {"image_data.json.zip", "region_descriptions.json.zip"}
    assert not (tmp_path / "VG_100K").exists() and (tmp_path / "region_descriptions.json").is_file()
    download_dataset(source, tmp_path, DownloadSettings(fetch=FAST))  # later, with images: only those are added
    assert [n for n, _ in server.requests].count("image_data.json.zip") == 1
    assert len(_vg_records(tmp_path)) == 10


def test_command_refuses_options_that_do_not_apply(tmp_path, capsys):
    assert cli.main(["download", "voc2012", "--no-images", "--out", str(tmp_path)]) == 2
    assert "--no-images applies to vg only" in capsys.readouterr().err


def test_voc_table_agrees_with_torchvision():
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    ours = {a.filename: a for key in ("voc2007", "voc2012") for a in archives.SOURCES[key].archives}
    for year in ("2007", "2007-test", "2012"):
        entry = DATASET_YEAR_DICT[year]
        archive = ours[entry["filename"]]
        assert (archive.url, archive.md5) == (entry["url"], entry["md5"])
        assert archive.provides == (entry["base_dir"],)


def test_vg_table_has_every_archive_prepare_needs():
    for version in ("1.2", "1.0"):
        source = archives.get_source("vg", version)
        provided = {p for a in source.archives for p in a.provides}
        assert provided == {"VG_100K", "VG_100K_2", "image_data.json", "region_descriptions.json"}
        assert all(a.sha256 is None or len(a.sha256) == 64 for a in source.archives)
        assert [a.images for a in source.archives] == [True, True, False, False]
    with pytest.raises(VgclipError, match="--version"):
        archives.get_source("voc2007", "1.2")
