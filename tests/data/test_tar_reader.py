"""The fast shard tar reader agrees with Python's tarfile and refuses damage loudly."""

from __future__ import annotations

import io
import tarfile

import pytest

from vgclip.data.tar_reader import iter_tar_files, iter_tar_samples

LONG = "sub/" + "k" * 120  # over USTAR's 100-byte name field: needs a prefix, PAX or GNU long name


def write_tar(path, members, fmt=tarfile.USTAR_FORMAT, extras=True):
    """A tar with regular `members` (name -> bytes), plus a directory and a symlink when `extras`."""
    with tarfile.open(path, "w", format=fmt) as tar:
        if extras:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extras:
            link = tarfile.TarInfo("a-link")
            link.type, link.linkname = tarfile.SYMTYPE, "somedir"
            tar.addfile(link)
    return path


def reference(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile_in_every_format(tmp_path, fmt):
    members = {"a.jpg": b"\xff\xd8" + bytes(range(256)) * 5, "a.json": b"{}", "b.jpg": b"", "b.json": b"x" * 512}
    if fmt != tarfile.USTAR_FORMAT:
        members[LONG + ".json"] = b"{\"long\": true}"
    else:
        members["p" * 90 + "/" + "q" * 60 + ".json"] = b"prefix field"  # USTAR splits it into prefix + name
    path = write_tar(tmp_path / "s.tar", members, fmt)
    assert list(iter_tar_files(path)) == reference(path) == list(members.items())


def test_pax_header_names_from_webdataset_writer(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "w.tar")) as sink:
        sink.write({"__key__": "img-000001", "jpg": b"\xff\xd8jpeg", "json": b"{\"a\": 1}"})
        sink.write({"__key__": "x" * 150, "jpg": b"j", "json": b"{}"})
    got = list(iter_tar_samples(tmp_path / "w.tar"))
    assert got == [("img-000001", {"jpg": b"\xff\xd8jpeg", "json": b"{\"a\": 1}"}), ("x" * 150, {"jpg": b"j", "json": b"{}"})]


def test_samples_group_by_key_skip_meta_and_seek_over_unwanted(tmp_path):
    path = write_tar(tmp_path / "s.tar", {"__meta__/info.json": b"m", "k1.JPG": b"img1", "k1.json": b"{}",
                                          "k2.json": b"{2}", "k3.jpg": b"i3", "k3.json": b"{3}", "k3.JPG": b"again"})
    samples = list(iter_tar_samples(path))
    # Suffixes are lower-cased; a repeated suffix starts a new sample (so nothing is silently lost).
    assert samples == [("k1", {"jpg": b"img1", "json": b"{}"}), ("k2", {"json": b"{2}"}),
                       ("k3", {"jpg": b"i3", "json": b"{3}"}), ("k3", {"jpg": b"again"})]
    only_json = list(iter_tar_samples(path, wanted=lambda suffix: suffix == "json"))
    assert only_json[0] == ("k1", {"jpg": b"", "json": b"{}"})


def test_truncated_tar_gives_members_before_the_damage_then_raises(tmp_path):
    path = write_tar(tmp_path / "s.tar", {"a.jpg": b"1" * 600, "a.json": b"{}", "b.jpg": b"2" * 2000, "b.json": b"{}"},
                     extras=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 * 5 + 700])  # inside b.jpg's data
    seen = []
    with pytest.raises(tarfile.ReadError, match="truncated"):
        for key, parts in iter_tar_samples(cut):
            seen.append((key, sorted(parts)))
    assert seen == [("a", ["jpg", "json"])]


def test_corrupt_header_and_non_tar_raise_read_error(tmp_path):
    path = write_tar(tmp_path / "s.tar", {"a.jpg": b"1", "a.json": b"{}"}, extras=False)
    data = bytearray(path.read_bytes())
    data[512 * 2 + 3] ^= 0x55  # a byte of the second header's name: its checksum no longer matches
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar_files(bad))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_files(junk))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert list(iter_tar_files(empty)) == []


def test_negative_base256_size_is_damage_not_a_hang(tmp_path):
    path = write_tar(tmp_path / "s.tar", {"a.jpg": b"1" * 10, "a.json": b"{}"}, extras=False)
    data = bytearray(path.read_bytes())
    header = data[:512]
    header[124:136] = b"\xff" * 10 + (-512).to_bytes(2, "big", signed=True)  # GNU base-256: -512
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    data[:512] = header
    bad = tmp_path / "neg.tar"
    bad.write_bytes(bytes(data))
    for wanted in (None, lambda suffix: False):  # read, and seeked over (as the resume scan does)
        with pytest.raises(tarfile.ReadError, match="negative"):
            list(iter_tar_samples(bad, wanted))
