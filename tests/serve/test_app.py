"""`vgclip serve` JSON API in-process: scores as `vgclip predict` gives them, bad input, the report, saving thresholds."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'vgclip[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from tests._voc_fixtures import VOC_LIKE
from tests.serve._serve_fixtures import REAL_PHOTOS, make_report, make_run  # noqa: E402
from vgclip.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    from vgclip.serve.startup import ServeSettings, build_app

    root = tmp_path_factory.mktemp("serve")
    run = make_run(root / "run")
    report, voc = make_report(run, root)
    setup = ServeSettings(run, report, max_upload_mb=1.0, max_pixels=1_000_000)
    with TestClient(build_app(setup)) as client:
        yield client, run, report, voc


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "red.png", folder / "blue.jpg", folder / "noise.jpg"]
    Image.new("RGB", (40, 30), "red").save(paths[0])
    Image.new("RGB", (30, 40), "blue").save(paths[1])
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(paths[2])
    return paths


def _post(client: TestClient, paths: list[Path], labels: str, **fields: str):
    files = [("images", (p.name, p.read_bytes())) for p in paths]
    return client.post("/api/predict", files=files, data={"labels": labels, **fields})


def _cli_predict(capsys: pytest.CaptureFixture, run: Path, labels: str, paths: list[Path], *extra: str) -> dict:
    assert main(["predict", "--checkpoint", str(run), "--labels", labels, "--json", *extra, *map(str, paths)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "cosine"])
def test_scores_match_vgclip_predict(served, images: list[Path], score: str, capsys: pytest.CaptureFixture) -> None:
    client, run, _, _ = served
    answer = _post(client, images, "red thing, blue thing\ncat", score=score, templates="ensemble")
    assert answer.status_code == 200, answer.text
    out = answer.json()
    cli = _cli_predict(capsys, run, "red thing,blue thing,cat", images, "--score", score, "--templates", "ensemble")
    assert out["labels"] == ["red thing", "blue thing", "cat"] and out["score"] == score
    for mine, theirs in zip(out["results"], cli["results"]):
        assert mine["image"] == Path(theirs["image"]).name
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-5)
        assert mine["predicted"] == theirs["predicted"]  # no thresholds: the top label, as the CLI


def test_thresholds_number_and_per_label(served, images: list[Path]) -> None:
    client = served[0]
    low = _post(client, images[:1], "a,b", score="cosine", thresholds="-2").json()
    assert low["results"][0]["predicted"] == ["a", "b"] and low["thresholds"] == {"a": -2.0, "b": -2.0}
    mixed = _post(client, images[:1], "a,b", score="sigmoid", thresholds=json.dumps({"a": 0.0, "b": 1.01})).json()
    assert mixed["results"][0]["predicted"] == ["a"]


def test_defaults_come_from_the_report_thresholds(served) -> None:
    client, _, report, _ = served
    info = json.loads((report / "thresholds.json").read_text())
    labels = client.get("/api/labels").json()
    assert labels["labels"] == info["classes"] and labels["score"] == "sigmoid"
    assert labels["thresholds"] == pytest.approx(info["per_class"])
    assert labels["global_threshold"] == pytest.approx(info["global"])  # where the tag page's slider starts
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["report"] is True and health["rss_bytes"] > 0


@pytest.mark.skipif(not REAL_PHOTOS.is_dir(), reason=f"real VOC photos absent ({REAL_PHOTOS})")
def test_real_photos(served, capsys: pytest.CaptureFixture) -> None:
    client, run, _, _ = served
    photos = sorted(REAL_PHOTOS.glob("*.jpg"))[:4]
    out = _post(client, photos, "person,dog,cat,car,aeroplane", score="softmax").json()
    cli = _cli_predict(capsys, run, "person,dog,cat,car,aeroplane", photos, "--score", "softmax")
    assert [r["image"] for r in out["results"]] == [p.name for p in photos]
    for mine, theirs in zip(out["results"], cli["results"]):
        assert sum(mine["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-5)


def test_bad_input_answers(served, images: list[Path], tmp_path: Path) -> None:
    client = served[0]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    bad = _post(client, [images[0], text], "a")
    assert bad.status_code == 415 and "notes.jpg" in bad.json()["detail"]
    assert "BytesIO" not in bad.json()["detail"]
    wide = tmp_path / "wide.png"
    Image.new("L", (2000, 600)).save(wide)  # 1.2 Mpx > the 1 Mpx this server accepts; a few KB on the wire
    big = _post(client, [wide], "a")
    assert big.status_code == 413 and "wide.png" in big.json()["detail"]
    heavy = client.post("/api/predict", files=[("images", ("x.png", b"\0" * 1_200_000))], data={"labels": "a"})
    assert heavy.status_code == 413 and "over the limit" in heavy.json()["detail"]
    assert _post(client, images[:1], " , \n").status_code == 422
    assert _post(client, images[:1], "a,a").status_code == 422
    assert _post(client, images[:1], "a", score="logit").status_code == 422
    assert _post(client, images[:1], "a,b", thresholds='{"a": 0.5}').status_code == 422
    assert client.post("/api/predict", data={"labels": "a"}).status_code == 422


def test_text_embeddings_cached_and_requests_batched(served, images: list[Path]) -> None:
    client = served[0]
    engine_stats = client.get("/api/health").json()
    labels = "cached one, cached two"
    assert _post(client, images[:1], labels).status_code == 200

    def one(_: int) -> int:
        return _post(client, images[:1], labels).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(16)))
    assert codes == [200] * 16
    after = client.get("/api/health").json()
    forwards = after["batches"] - engine_stats["batches"]
    assert after["batched_images"] - engine_stats["batched_images"] == 17
    assert forwards < 17  # concurrent requests shared forwards
    assert after["text_builds"] - engine_stats["text_builds"] == 1  # one label set, encoded once


def test_report_page_data_tune_and_gallery(served) -> None:
    client, _, report, _ = served
    response = client.get("/api/report", headers={"Accept-Encoding": "gzip"})
    data = response.json()
    ids = data["image_ids"]
    assert data["available"] and data["score"] == "sigmoid" and len(data["scores"]) == len(ids)
    # The page's one document travels compressed; its content is exactly page_data (served from a cache).
    assert response.headers["content-encoding"] == "gzip"
    assert response.num_bytes_downloaded < len(response.content) / 2
    assert json.loads(client.get("/api/report", headers={"Accept-Encoding": "identity"}).content) == data
    assert len(data["curve"]["threshold"]) == len(data["curve"]["micro_f1"]) and data["gallery"] == sorted(ids)
    thumb = client.get(f"/api/report/images/{ids[0]}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "content-encoding" not in thumb.headers  # a JPEG is not compressed again
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 256
    for attempt in ("..%2F..%2Freport.json", "%2Fetc%2Fpasswd", "nope", "..%2Fscores.csv"):
        assert client.get(f"/api/report/images/{attempt}").status_code == 404
    tuned = client.post("/api/report/tune", json={"objective": "f1", "mode": "per_class"}).json()
    assert tuned["mode"] == "per_class" and set(tuned["per_class"]) == set(data["classes"])
    assert client.post("/api/report/tune", json={"objective": "sensitivity"}).status_code == 422


def test_saved_thresholds_give_vgclip_predict_the_same_labels(served, images: list[Path],
                                                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    client, run, report, voc = served
    tuned = client.post("/api/report/tune", json={"objective": "f1", "mode": "per_class"}).json()
    first = sorted(tuned["per_class"])[0]
    chosen = {**tuned["per_class"], first: 0.0}  # a hand-moved class threshold
    saved = client.post("/api/report/thresholds", json={"mode": "per_class", "global_threshold": tuned["global"],
                                                        "per_class": chosen, "objective": "f1"})  # fmt: skip
    assert saved.status_code == 200, saved.text
    path = Path(saved.json()["path"])
    assert path == report / "saved" / "thresholds.json" and not list(path.parent.glob(".*tmp"))
    photos = sorted((voc / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:6] + images
    labels = ",".join(tuned["classes"])
    cli = _cli_predict(capsys, run, labels, photos, "--thresholds", str(path))
    api = _post(client, photos, labels, thresholds=json.dumps(chosen)).json()
    assert cli["thresholds"] == pytest.approx(chosen)
    assert [r["predicted"] for r in api["results"]] == [r["predicted"] for r in cli["results"]]
    assert any(first in r["predicted"] for r in cli["results"])  # threshold 0 on a sigmoid: always predicted
    bad = client.post("/api/report/thresholds", json={"mode": "per_class", "global_threshold": 0.5, "per_class": {}})
    assert bad.status_code == 422 and "miss" in bad.json()["detail"]


def test_demo_prints_a_serve_command_the_cli_accepts() -> None:
    import shlex

    from vgclip.cli import build_parser
    from vgclip.commands.demo import serve_command

    argv = shlex.split(serve_command(Path("demo out/run"), Path("demo out/report")))
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.checkpoint == Path("demo out/run") and args.report == Path("demo out/report")
    assert args.host == "127.0.0.1"


def test_cli_stays_light_and_report_errors_are_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import sys, vgclip, vgclip.cli; vgclip.cli.build_parser(); print('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from vgclip.errors import VgclipError
    from vgclip.serve.report_folder import load_report

    with pytest.raises(VgclipError, match="report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"settings": {}}))
    (tmp_path / "scores.csv").write_text("image_id,score_a,label_b\nx,0.5,1\n")
    with pytest.raises(VgclipError, match="scores.csv"):
        load_report(tmp_path)
    (tmp_path / "scores.csv").write_text("image_id,score_a,label_a\nx,0.5,1\ny,nan,0\n")
    with pytest.raises(VgclipError, match="scores.csv: image 'y' has a score that is not a finite number"):
        load_report(tmp_path)


def test_report_page_json_writes_missing_numbers_as_null(served, tmp_path: Path) -> None:
    """A report.json may hold NaN (Python's json writes it); the page's document is strict JSON all the same."""
    import shutil

    from vgclip.serve.report_folder import load_report, page_data, page_json

    folder = shutil.copytree(served[2], tmp_path / "report")
    report = json.loads((folder / "report.json").read_text())
    report["mAP"] = float("nan")
    (folder / "report.json").write_text(json.dumps(report))
    data = load_report(folder)
    page = json.loads(page_json(data))  # strict: json.loads would accept NaN, the page's JSON.parse would not
    assert page["mAP"] is None and "NaN" not in page_json(data).decode()
    assert page["scores"] == page_data(data)["scores"] and page["image_ids"] == data.image_ids


def test_pages_and_api_docs_need_no_internet(served) -> None:
    import re

    client = served[0]
    for page in ("/", "/thresholds", "/docs"):
        html = client.get(page)
        assert html.status_code == 200
        links = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html.text) + re.findall(r"(?:_url|url): *'([^']+)'", html.text)
        assert links and not [u for u in links if "//" in u], f"{page} loads from elsewhere: {links}"
        for url in links:
            if url.endswith((".js", ".css")):
                assert client.get(url).status_code == 200, url
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_labels_the_file_lacks_take_its_global_threshold_with_warnings(served, images: list[Path]) -> None:
    client, _, report, _ = served
    info = json.loads((report / "thresholds.json").read_text())
    first = info["classes"][0]
    out = _post(client, images[:1], f"{first}, tree").json()  # the file's score kind and templates
    assert out["thresholds"] == pytest.approx({first: info["per_class"][first], "tree": info["global"]})
    assert len(out["warnings"]) == 1 and "no threshold for 'tree'" in out["warnings"][0]
    same = _post(client, images[:1], ",".join(info["classes"])).json()
    assert same["warnings"] == [] and same["thresholds"] == pytest.approx(info["per_class"])
    other = _post(client, images[:1], f"{first}, tree", score="softmax").json()
    assert other["thresholds"] is None and "not applied" in other["warnings"][0]


def test_file_thresholds_rule_as_vgclip_predict() -> None:
    from vgclip.serve.app import AppSettings, file_thresholds, scoring_texts

    options = AppSettings(list(VOC_LIKE["classes"]), "softmax", "single", tuned={**VOC_LIKE, "score": "softmax"},
                           class_texts={**VOC_LIKE["class_texts"], "tvmonitor": "television"},
                           labels_source="t.json")  # fmt: skip
    limits, notes = file_thresholds(["dining table", "tv monitor", "tree"], "softmax", "single", options)
    assert limits == [0.2, 0.4, 0.1518] and "'tree'" in notes[0] and "softmax scores depend" in notes[1]
    assert scoring_texts(["dining table", "tv monitor", "tvmonitor", "tree"], options) == \
        ["dining table", "television", "television", "tree"]  # the texts the classes were tuned with
    options.tuned = {k: v for k, v in options.tuned.items() if k != "global"}
    with pytest.raises(Exception, match="no global threshold.*the thresholds field"):
        file_thresholds(["tree"], "softmax", "single", options)


def test_missing_fields_are_one_readable_message(served, images: list[Path]) -> None:
    client = served[0]
    files = [("images", (images[0].name, images[0].read_bytes()))]
    for data in ({}, {"labels": ""}):
        answer = client.post("/api/predict", files=files, data=data)
        assert answer.status_code == 422 and answer.json() == {"detail": "the label list is empty: give labels "
                                                               "separated by commas or one per line"}  # fmt: skip
    nothing = client.post("/api/predict", data={"labels": "a"})
    assert nothing.status_code == 422 and nothing.json()["detail"].startswith("no image uploaded")
    bad = client.post("/api/report/tune", json={"objective": ["f1"]})
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], str) and "objective" in bad.json()["detail"]
