"""Thresholds and labels that agree everywhere (issue 26): labels a thresholds file does not name take its global
threshold with a notice, labels name classes by their recorded text, and `vgclip serve` applies the same rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests._voc_fixtures import VOC_LIKE
from tests.serve._serve_fixtures import CHROMIUM, chromium_page, live_server, make_report, make_run
from vgclip.cli import main
from vgclip.errors import VgclipError
from vgclip.eval.tagging import threshold_notes
from vgclip.eval.thresholds import label_thresholds, load_thresholds, match_class, save_thresholds



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("labels") / "run")


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(path)
    return path


def test_uncovered_labels_take_the_global_threshold() -> None:
    applied = label_thresholds(VOC_LIKE, ["person", "aeroplane", "tree", "sky"])
    assert applied.values == [0.3, 0.142, 0.1518, 0.1518] and applied.fallback == ["tree", "sky"]
    assert applied.classes == ["person", "aeroplane", None, None]
    glob = {**VOC_LIKE, "mode": "global"}
    assert label_thresholds(glob, ["person", "tree"]).values == [0.1518, 0.1518]
    assert label_thresholds(glob, ["tree"]).fallback == []  # a global file has one value for every label anyway


def test_labels_name_classes_by_their_recorded_text() -> None:
    applied = label_thresholds(VOC_LIKE, ["dining table", "tv monitor", "Airplane", "TVmonitor"])
    assert applied.classes == ["diningtable", "tvmonitor", "aeroplane", "tvmonitor"] and not applied.fallback
    assert applied.values == [0.2, 0.4, 0.142, 0.4]
    assert applied.texts["dining table"] == "dining table" and applied.texts["TVmonitor"] == "tv monitor"
    assert match_class(VOC_LIKE, "dining  table") == "diningtable" and match_class(VOC_LIKE, "table") is None
    same = label_thresholds(VOC_LIKE, ["airplane", "dining table", "person", "tv monitor"])
    assert same.same_label_set(VOC_LIKE)  # the tuned set, named by texts: no softmax warning
    assert threshold_notes(VOC_LIKE, same, "softmax", "t.json") == []
    other = label_thresholds(VOC_LIKE, ["person", "tree"])
    notes = threshold_notes(VOC_LIKE, other, "softmax", "t.json")
    assert notes[0].startswith("notice: t.json has no threshold for 'tree'") and "0.1518" in notes[0]
    assert "softmax scores depend on the label set" in notes[1]


def test_a_file_without_a_global_value_names_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.json"
    save_thresholds({k: v for k, v in VOC_LIKE.items() if k != "global"}, path)
    info = load_thresholds(path)  # a per_class file may leave the global value out
    assert label_thresholds(info, ["person", "dining table"]).values == [0.3, 0.2]
    with pytest.raises(VgclipError, match=r"no value for 'tree', 'sky' .*no global threshold.*--threshold T"):
        label_thresholds(info, ["person", "tree", "sky"], str(path))
    (tmp_path / "global.json").write_text(json.dumps({**VOC_LIKE, "mode": "global", "global": None}))
    with pytest.raises(VgclipError, match="not a vgclip thresholds file"):
        load_thresholds(tmp_path / "global.json")


def _cli(capsys: pytest.CaptureFixture, run: Path, labels: str, path: Path, image: Path) -> tuple[int, dict, str]:
    code = main(["predict", "--checkpoint", str(run), "--labels", labels, "--thresholds", str(path), "--json",
                 str(image)])  # fmt: skip
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_vgclip_predict_with_labels_the_file_lacks(run_dir: Path, image: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    path = tmp_path / "thresholds.json"
    save_thresholds(VOC_LIKE, path)
    code, out, err = _cli(capsys, run_dir, "person,aeroplane,tree,sky", path, image)
    assert code == 0, err
    assert out["thresholds"] == {"person": 0.3, "aeroplane": 0.142, "tree": 0.1518, "sky": 0.1518}
    assert err.strip() == f"vgclip predict: notice: {path} has no threshold for 'tree', 'sky': they use its global " \
                          "threshold 0.1518"  # one line, sigmoid: no label-set warning
    code, out, err = _cli(capsys, run_dir, "dining table,tv monitor", path, image)
    assert code == 0 and out["thresholds"] == {"dining table": 0.2, "tv monitor": 0.4} and err == ""
    save_thresholds({k: v for k, v in VOC_LIKE.items() if k != "global"}, path)
    code, _, err = _cli(capsys, run_dir, "person,tree", path, image)
    assert code == 2 and "--threshold" in err and len(err.strip().splitlines()) == 1


def test_softmax_label_set_warning_follows_class_texts(run_dir: Path, image: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    path = tmp_path / "thresholds.json"
    save_thresholds({**VOC_LIKE, "score": "softmax"}, path)
    code, _, err = _cli(capsys, run_dir, "airplane,dining table,person,tv monitor", path, image)
    assert code == 0 and err == ""  # the tuned label set, named by its texts
    code, _, err = _cli(capsys, run_dir, "airplane,person", path, image)
    assert code == 0 and "softmax scores depend on the label set" in err


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_tag_page_starts_at_the_global_threshold_and_shows_warnings(run_dir: Path, image: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    report, _ = make_report(run_dir, tmp_path)
    info = json.loads((report / "thresholds.json").read_text())
    first = info["classes"][0]
    with live_server(tmp_path, run_dir, report) as live, chromium_page() as page:
        page.goto(live.base + "/")
        page.wait_for_function("document.getElementById('labels').value.length > 0")
        start = float(page.input_value("#global-threshold"))
        page.fill("#labels", f"{first}, tree")
        page.set_input_files("#files", [str(image)])  # scored at once, with the file's score and templates
        page.wait_for_selector("#warnings li")
        warnings = page.locator("#warnings li").all_text_contents()
        shown = {el.get_attribute("data-label"): float(el.input_value())
                 for el in page.locator(".label-threshold").all()}  # fmt: skip
    assert start == pytest.approx(info["global"], abs=1e-9)  # not the first class's threshold
    assert len(warnings) == 1 and "no threshold for 'tree'" in warnings[0]
    assert shown == pytest.approx({first: info["per_class"][first], "tree": info["global"]}, abs=1e-4)
