"""The one table of dataset archives `vgclip download` knows: URL, size, checksum, and what each installs.

Pascal VOC: URLs and MD5s are those torchvision publishes (torchvision.datasets.voc.DATASET_YEAR_DICT; a test
checks they still agree); sizes are the Content-Length the Oxford host serves.
Visual Genome: sizes and SHA-256 sums are those the Hugging Face `datasets` loader recorded for the same URLs
(datasets/visual_genome/dataset_infos.json). Where no checksum is published (`None`: v1.2's
region_descriptions.json.zip), the download is checked by its size where one is known and by the CRC-32 of
every zip member. Nothing here was measured by vgclip itself.

A mirror replaces the host: the archive is fetched from `MIRROR/<filename>` (file names are unique in the table).
"""

from __future__ import annotations

from dataclasses import dataclass

from vgclip.errors import VgclipError

MIRROR_ENV = "VGCLIP_MIRROR"

_VG_IMAGES = "https://cs.stanford.edu/people/rak248/VG_100K_2"
# visualgenome.org/static/... is the address older scripts use; the dataset moved to this host.
_VG_DATA = "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset"
_VOC_HOST = "https://thor.robots.ox.ac.uk/pascal/VOC"


@dataclass(frozen=True)
class Archive:
    """One file to fetch and what extracting it adds to the dataset folder.

    `provides` are paths relative to the output folder that the archive must contain (checked after
    extraction) and that are renamed into place. `single_file` marks a zip holding one file that is installed
    under `provides[0]` whatever its name inside. `images` archives are skipped by `--no-images`.
    """

    filename: str
    url: str
    kind: str  # "zip" or "tar"
    provides: tuple[str, ...]
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    images: bool = False
    single_file: bool = False

    def url_from(self, mirror: str | None) -> str:
        """The URL to fetch: the official one, or MIRROR/<filename>."""
        return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url


@dataclass(frozen=True)
class DatasetSource:
    """A dataset as a list of archives; `root` is the folder (relative to --out) the readers are pointed at."""

    name: str
    title: str
    archives: tuple[Archive, ...]
    root: str = ""
    reader_flag: str = "--vg-root"

    def selected(self, images: bool = True) -> tuple[Archive, ...]:
        """The archives to fetch (without the image archives when `images` is False)."""
        return tuple(a for a in self.archives if images or not a.images)

    def total_size(self, images: bool = True) -> int:
        """Bytes to download when every size is known (unknown sizes count as 0)."""
        return sum(a.size or 0 for a in self.selected(images))


_VG_IMAGE_ARCHIVES = (
    Archive("images.zip", f"{_VG_IMAGES}/images.zip", "zip", ("VG_100K",), size=9_731_705_982,
            sha256="51c682d2721f880150720bb416e0346a4c787e4c55d7f80dfd1bd3f73ba81646", images=True),
    Archive("images2.zip", f"{_VG_IMAGES}/images2.zip", "zip", ("VG_100K_2",), size=5_471_658_058,
            sha256="99da1a0ddf87011319ff3b05cf9176ffee2731cc3c52951162d9ef0d68e3cfb5", images=True),
)
_VG_IMAGE_DATA = Archive(
    "image_data.json.zip", f"{_VG_DATA}/image_data.json.zip", "zip", ("image_data.json",), size=1_780_854,
    sha256="b87a94918cb2ff4d952cf1dfeca0b9cf6cd6fd204c2f8704645653be1163681a", single_file=True,
)
# Image archives first, annotations last: the readers look for the JSON files, so a folder that is only
# partly renamed into place never passes their checks.
SOURCES: dict[str, DatasetSource] = {
    "vg-1.2": DatasetSource("vg-1.2", "Visual Genome v1.2", (
        *_VG_IMAGE_ARCHIVES,
        _VG_IMAGE_DATA,
        # Size from a public download script that checks exact byte counts (its other VG sizes match the
        # Hugging Face record); no checksum is published for this file.
        Archive("region_descriptions.json.zip", f"{_VG_DATA}/region_descriptions.json.zip", "zip",
                ("region_descriptions.json",), size=127_377_968, single_file=True),
    )),
    "vg-1.0": DatasetSource("vg-1.0", "Visual Genome v1.0", (
        *_VG_IMAGE_ARCHIVES,
        _VG_IMAGE_DATA,
        Archive("region_descriptions_v1.json.zip", f"{_VG_DATA}/region_descriptions_v1.json.zip", "zip",
                ("region_descriptions.json",), size=99_460_401,
                sha256="9e54cd76082f7ce5168a1779fc8c3d0629720492ec0fa12f2d8339c3e0dc9734", single_file=True),
    )),
    "voc2007": DatasetSource("voc2007", "Pascal VOC2007 (trainval + test)", (
        Archive("VOCtrainval_06-Nov-2007.tar", f"{_VOC_HOST}/voc2007/VOCtrainval_06-Nov-2007.tar", "tar",
                ("VOCdevkit/VOC2007",), size=460_032_000, md5="c52e279531787c972589f7e41ab4ae64"),
        Archive("VOCtest_06-Nov-2007.tar", f"{_VOC_HOST}/voc2007/VOCtest_06-Nov-2007.tar", "tar",
                ("VOCdevkit/VOC2007",), size=451_020_800, md5="b6e924de25625d8de591ea690078ad9f"),
    ), root="VOCdevkit/VOC2007", reader_flag="--voc-root"),
    "voc2012": DatasetSource("voc2012", "Pascal VOC2012 (trainval)", (
        Archive("VOCtrainval_11-May-2012.tar", f"{_VOC_HOST}/voc2012/VOCtrainval_11-May-2012.tar", "tar",
                ("VOCdevkit/VOC2012",), size=1_999_639_040, md5="6cd6e144f989b92b3379bac3b3de84fd"),
    ), root="VOCdevkit/VOC2012", reader_flag="--voc-root"),
}  # fmt: skip

DATASETS = ("vg", "voc2007", "voc2012")
VG_VERSIONS = ("1.2", "1.0")


def get_source(dataset: str, version: str | None = None) -> DatasetSource:
    """The table entry for `dataset` ("vg", "voc2007", "voc2012"); `version` applies to vg only."""
    if dataset == "vg":
        version = version or VG_VERSIONS[0]
        if version not in VG_VERSIONS:
            raise VgclipError(f"--version {version}: Visual Genome versions are {', '.join(VG_VERSIONS)}")
        return SOURCES[f"vg-{version}"]
    if dataset not in SOURCES:
        raise VgclipError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if version is not None:
        raise VgclipError(f"--version applies to vg only, not {dataset}")
    return SOURCES[dataset]
