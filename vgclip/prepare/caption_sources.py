"""Other caption sources in the same record format as Visual Genome: COCO captions and CSV/TSV files.

Whole-image captions become regions with no box (`[phrase]`), written to the shards as
``{"phrase": ..., "box": null}``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

from vgclip.prepare.cleaning import CleaningSettings, PhraseDeduper, Skips, clean_phrase
from vgclip.prepare.visual_genome import stream_json_array
from vgclip.errors import VgclipError

CSV_HEADER = ("path", "caption")  # the optional header line of --captions-csv (any case)


def _clean_captions(labelled: list[tuple[str, object]], settings: CleaningSettings, skips: Skips) -> list[list]:
    """Clean and de-duplicate one image's (skip label, caption) pairs; return [[phrase], ...]."""
    dedup = PhraseDeduper()
    out = []
    for label, text in labelled:
        phrase, reason = clean_phrase(text, settings)
        if phrase is None:
            skips.add(label, reason)
        elif dedup.is_duplicate(phrase):
            skips.add(label, "phrase_duplicate")
        else:
            out.append([phrase])
    return out


def iter_coco_records(captions_json: str | Path, images_dir: str | Path, settings: CleaningSettings,
                      skips: Skips) -> Iterator[dict]:
    """Records from a COCO captions file (captions_*.json) and its image folder (checked right away)."""
    captions_json, images_dir = Path(captions_json), Path(images_dir)
    if not captions_json.is_file():
        raise VgclipError(f"--coco-captions {captions_json}: no such file")
    if not images_dir.is_dir():
        raise VgclipError(f"--coco-images {images_dir}: no such directory")
    return _coco_records(captions_json, images_dir, settings, skips)


def _coco_records(captions_json: Path, images_dir: Path, settings: CleaningSettings, skips: Skips) -> Iterator[dict]:
    images: dict[int, tuple[str, int, int]] = {}
    for n, entry in enumerate(stream_json_array(captions_json, "images.item")):
        try:
            image_id, file_name = int(entry["id"]), str(entry["file_name"])
            width, height = int(entry.get("width") or 0), int(entry.get("height") or 0)
        except (KeyError, TypeError, ValueError):
            skips.add(f"coco:images[{n}]", "image_entry_missing_keys")
            continue
        images[image_id] = (file_name, width, height)
    if not images:
        raise VgclipError(f"{captions_json}: no 'images' entries (is this a COCO captions file?)")
    captions: dict[int, list[object]] = {}
    for n, ann in enumerate(stream_json_array(captions_json, "annotations.item")):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            skips.add(f"coco:annotations[{n}]", "caption_missing_keys")
        elif ann["image_id"] not in images:
            skips.add(f"coco:annotations[{n}]", "caption_unknown_image")
        else:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
    for image_id, (file_name, width, height) in images.items():
        item = f"coco:{image_id}"
        labelled = [(f"{item}/caption[{n}]", text) for n, text in enumerate(captions.get(image_id, []))]
        regions = _clean_captions(labelled, settings, skips)
        path = images_dir / file_name
        if not regions:
            skips.add(item, "no_valid_captions")
        elif ".." in Path(file_name).parts or not os.path.isfile(path):
            skips.add(item, "missing_image_file")
        else:
            yield {"key": f"coco-{image_id:012d}", "image_id": image_id, "source": "coco", "path": str(path),
                   "width": width or None, "height": height or None, "regions": regions}


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, row) of a CSV/TSV file: tab for .tsv, else sniffed between comma and tab.

    Line numbers are 1-based lines of the file (the header is line 1); a row whose quoted field spans
    several lines is numbered by the line it starts on.
    """
    try:
        fh = open(path, encoding="utf-8-sig", errors="replace", newline="")
    except OSError as exc:
        raise VgclipError(f"--captions-csv {path}: cannot read ({exc.strerror or exc})") from None
    with fh:
        sample = fh.read(8192)
        fh.seek(0)
        if path.suffix.lower() == ".tsv":
            delimiter = "\t"
        else:
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",\t").delimiter
            except csv.Error:
                delimiter = ","
        reader = csv.reader(fh, delimiter=delimiter)
        ended = 0  # the last line of the previous row
        try:
            for row in reader:
                yield ended + 1, row
                ended = reader.line_num
        except csv.Error as exc:
            raise VgclipError(f"{path}: malformed CSV at line {reader.line_num}: {exc}") from None


def iter_csv_records(csv_path: str | Path, settings: CleaningSettings, skips: Skips) -> Iterator[dict]:
    """Records from a `path,caption` CSV/TSV: two columns, an optional first line `path,caption`, comma or
    tab separated (tab for .tsv), UTF-8; relative image paths are relative to the CSV file's folder.

    Several rows for the same image become several captions of one record; image ids are assigned
    in order of first appearance (1, 2, ...).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise VgclipError(f"--captions-csv {csv_path}: no such file")
    return _csv_records(csv_path, settings, skips)


def _csv_records(csv_path: Path, settings: CleaningSettings, skips: Skips) -> Iterator[dict]:
    name = csv_path.name  # skips name the file and the line: "caps.csv:41 (photos/x.jpg)"
    grouped: dict[str, list[tuple[int, str]]] = {}
    for line, row in _csv_rows(csv_path):
        if line == 1 and [c.strip().lower() for c in row] == list(CSV_HEADER):
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip():
            skips.add(f"{name}:{line}", "csv_bad_row")
            continue
        grouped.setdefault(row[0].strip(), []).append((line, row[1]))
    for image_id, (rel, rows) in enumerate(grouped.items(), start=1):
        path = Path(rel) if os.path.isabs(rel) else csv_path.parent / rel
        regions = _clean_captions([(f"{name}:{line}", text) for line, text in rows], settings, skips)
        where = f"{name}:{rows[0][0]} ({rel})"
        if not regions:
            skips.add(where, "no_valid_captions")
        elif not os.path.isfile(path):
            skips.add(where, "missing_image_file")
        else:
            yield {"key": f"csv-{image_id:09d}", "image_id": image_id, "source": "csv", "path": str(path),
                   "width": None, "height": None, "regions": regions}
