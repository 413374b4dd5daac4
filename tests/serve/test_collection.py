"""The Collection page of `vgclip serve --collection OUT`: the folder read once, paging, label filters equal to
numpy, text queries, thumbnails only of the collection's own files, bad folders in one line, the page in Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'vgclip[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from tests.serve._collection_fixtures import CollectionRows, random_rows, write_collection  # noqa: E402
from tests.serve._serve_fixtures import (  # noqa: E402
    ARTEFACTS,
    CHROMIUM,
    REAL_PHOTOS,
    chromium_page,
    live_server,
    make_run,
)
from vgclip.errors import VgclipError  # noqa: E402
from vgclip.serve.collection import load_collection  # noqa: E402

LABELS = ["cat", "dog", "person", "car"]
THRESHOLDS = {"cat": 0.35, "dog": 0.6, "person": 0.5, "global": 0.5}  # car: the global value
ROWS = 130
TARGET = 77  # the row whose embedding is the query's
QUERY = "a red car on a street"
WITH_FILES = 40  # rows 0..39 have a local image file; the others are shard samples (no path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(run, collection folder, rows, image folder): a tiny run and a collection tagged 'with it'."""
    import vgclip
    from vgclip.serve.collection_routes import query_embedding

    root = tmp_path_factory.mktemp("collection")
    run = make_run(root / "run")
    images = root / "images"
    images.mkdir()
    photos = sorted(REAL_PHOTOS.glob("*.jpg"))[:WITH_FILES] if REAL_PHOTOS.is_dir() else []
    paths: list[str | None] = []
    for i in range(WITH_FILES):
        target = images / f"photo{i:03d}.jpg"
        if i < len(photos):
            shutil.copy(photos[i], target)
        else:
            Image.new("RGB", (80, 60), (i * 6 % 256, 90, 160)).save(target)
        paths.append(str(target))
    model, _, tokenizer = vgclip.load_checkpoint(run)
    dim = len(query_embedding(model, tokenizer, QUERY))
    rows = random_rows(ROWS, len(LABELS), dim, seed=3, paths=paths + [None] * (ROWS - WITH_FILES))
    rows.embeddings[TARGET] = query_embedding(model, tokenizer, QUERY).astype(np.float16)
    folder = write_collection(root / "out", rows, LABELS, thresholds=THRESHOLDS, checkpoint=str(run), part_rows=50)
    return run, folder, rows, images


@pytest.fixture(scope="module")
def client(setup):
    from vgclip.serve.startup import ServeSettings, build_app

    run, folder, _, _ = setup
    with TestClient(build_app(ServeSettings(run, collection=folder))) as test_client:
        yield test_client


def _items(client: TestClient, **body) -> dict:
    answer = client.post("/api/collection/items", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _limits(overrides: dict[str, float] | None = None) -> np.ndarray:
    given = {**THRESHOLDS, **(overrides or {})}
    return np.array([given.get(lab, given["global"]) for lab in LABELS])


def test_info_and_paging(client: TestClient, setup) -> None:
    _, folder, rows, _ = setup
    info = client.get("/api/collection").json()
    assert info["available"] and info["count"] == ROWS and info["labels"] == LABELS and info["score"] == "sigmoid"
    assert info["thresholds"] == {"cat": 0.35, "dog": 0.6, "person": 0.5, "car": 0.5} and info["warnings"] == []
    seen = []
    for offset in range(0, ROWS, 48):
        page = _items(client, offset=offset, limit=48)
        assert page["total"] == ROWS and page["offset"] == offset
        seen += [item["row"] for item in page["items"]]
    assert seen == list(range(ROWS))
    item = _items(client, offset=5, limit=1)["items"][0]
    assert item["key"] == rows.keys[5] and item["path"] == rows.paths[5] and item["width"] == rows.widths[5]
    expected = [lab for lab, s, t in zip(LABELS, rows.scores[5], _limits()) if s >= t]
    assert item["predicted"] == expected  # the run's own labels column says the same
    assert pq.read_table(folder / "predictions.parquet", columns=["labels"]).column("labels")[5].as_py() == expected
    assert _items(client, offset=ROWS + 10)["items"] == []
    assert client.post("/api/collection/items", json={"limit": 201}).status_code == 422  # bounded
    assert client.post("/api/collection/items", json={"offset": -1}).status_code == 422
    assert client.get("/api/health").json()["collection"] == ROWS


@pytest.mark.parametrize("match", ["all", "any"])
def test_label_filter_equals_numpy(client: TestClient, setup, match: str) -> None:
    rows = setup[2]
    moved = {"cat": 0.42, "dog": 0.3}
    page = _items(client, labels=["cat", "dog"], match=match, thresholds=moved, limit=200)
    hits = rows.scores[:, :2] >= _limits(moved)[None, :2]
    reference = np.flatnonzero(hits.all(1) if match == "all" else hits.any(1))
    assert [item["row"] for item in page["items"]] == reference.tolist() and page["total"] == len(reference)
    assert page["thresholds"]["cat"] == 0.42 and page["thresholds"]["person"] == 0.5
    counts = (rows.scores >= _limits(moved)[None, :]).sum(0)
    assert page["counts"] == dict(zip(LABELS, counts.tolist()))
    for item in page["items"]:
        scores = rows.scores[item["row"]]
        assert item["predicted"] == [lab for lab, s, t in zip(LABELS, scores, _limits(moved)) if s >= t]


def test_top_label_rule_and_bad_requests(client: TestClient, setup) -> None:
    rows = setup[2]
    page = _items(client, labels=["person"], rule="top", limit=200)
    assert [i["row"] for i in page["items"]] == np.flatnonzero(rows.scores.argmax(1) == 2).tolist()
    assert page["thresholds"] is None and all(i["predicted"] == ["person"] for i in page["items"])
    assert page["counts"] == dict(zip(LABELS, np.bincount(rows.scores.argmax(1), minlength=4).tolist()))
    unknown = client.post("/api/collection/items", json={"labels": ["zebra"]})
    assert unknown.status_code == 422 and "zebra" in unknown.json()["detail"]
    assert client.post("/api/collection/items", json={"query": "x" * 301}).status_code == 422
    assert client.post("/api/collection/items", json={"query": "x", "k": 1001}).status_code == 422


def test_text_query_ranks_by_cosine(client: TestClient, setup) -> None:
    import vgclip
    from vgclip.serve.collection_routes import query_embedding

    run, _, rows, _ = setup
    page = _items(client, query=QUERY, k=20, limit=5)
    assert page["total"] == 20 and page["query"] == QUERY
    assert page["items"][0]["row"] == TARGET and page["items"][0]["similarity"] == pytest.approx(1.0, abs=2e-3)
    model, _, tokenizer = vgclip.load_checkpoint(run)
    cosines = rows.embeddings.astype(np.float32) @ query_embedding(model, tokenizer, QUERY)
    order = np.argsort(-cosines, kind="stable")[:20]
    second = _items(client, query=QUERY, k=20, offset=5, limit=5)  # paging a query: the next five of the same 20
    assert [i["row"] for i in page["items"] + second["items"]] == order[:10].tolist()
    assert [i["similarity"] for i in second["items"]] == pytest.approx(cosines[order[5:10]], abs=1e-5)
    # A query within a label filter ranks only the filtered rows.
    kept = np.flatnonzero(rows.scores[:, 1] >= 0.6)
    within = _items(client, query=QUERY, k=10, labels=["dog"], limit=10)
    assert [i["row"] for i in within["items"]] == kept[np.argsort(-cosines[kept], kind="stable")][:10].tolist()


def test_thumbnails_only_of_collection_rows(client: TestClient, setup) -> None:
    images = setup[3]
    answer = client.get("/api/collection/thumb/3")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert max(Image.open(__import__("io").BytesIO(answer.content)).size) <= 256
    placeholder = client.get(f"/api/collection/thumb/{WITH_FILES + 1}")  # a shard sample: no local file
    assert placeholder.status_code == 200 and placeholder.headers["content-type"].startswith("image/svg+xml")
    outside = images.parent / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    for bad in (str(ROWS), "-1", "1e3", "%2E%2E%2Fsecret.png", "..%2F..%2Fetc%2Fpasswd", f"{'9' * 30}",
                str(outside).replace("/", "%2F")):  # fmt: skip
        assert client.get(f"/api/collection/thumb/{bad}").status_code == 404, bad
    assert client.get("/api/collection/thumb/../../../etc/passwd").status_code == 404
    row = client.get("/api/collection/row", params={"key": "img000003"}).json()
    assert row["row"] == 3 and set(row["scores"]) == set(LABELS)
    assert client.get("/api/collection/row", params={"key": "../img000003"}).status_code == 404


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _one_line_error(folder: Path, *words: str) -> str:
    with pytest.raises(VgclipError) as caught:
        load_collection(folder)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_bad_folders_are_one_line(setup, tmp_path: Path) -> None:
    folder = setup[1]
    _one_line_error(tmp_path / "absent", "no such collection folder")
    _one_line_error(setup[3], "no summary.json")
    bad = _copy(folder, tmp_path)
    (bad / "predictions.parquet").unlink()
    _one_line_error(bad, "no predictions.parquet")
    shutil.rmtree(bad)
    bad = _copy(folder, tmp_path)
    (bad / "embeddings" / "img_emb" / "img_emb_000002.npy").unlink()
    _one_line_error(bad, "2 img_emb parts but 3 metadata parts")
    shutil.rmtree(bad)
    bad = _copy(folder, tmp_path)
    np.save(bad / "embeddings" / "img_emb" / "img_emb_000001.npy", np.zeros((49, 32), np.float16))
    _one_line_error(bad, "metadata_000001.parquet", "has 50 rows")
    shutil.rmtree(bad)
    bad = _copy(folder, tmp_path)
    info = json.loads((bad / "summary.json").read_text())
    (bad / "summary.json").write_text(json.dumps({**info, "labels": [*LABELS, "bird"]}))
    _one_line_error(bad, "predictions.parquet", "score:bird")
    shutil.rmtree(bad)
    bad = _copy(folder, tmp_path)
    meta_file = bad / "embeddings" / "metadata" / "metadata_000001.parquet"
    meta = pq.read_table(meta_file)
    pq.write_table(meta.set_column(0, "key", pa.array(meta.column("key").to_pylist()[::-1])), meta_file)
    _one_line_error(bad, "keys of img_emb_000001.npy")


def test_cli_refuses_a_bad_collection_in_one_line(setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vgclip.cli import main

    run, folder, rows, _ = setup
    assert main(["serve", "--checkpoint", str(run), "--collection", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no summary.json" in err
    other = write_collection(tmp_path / "wide", CollectionRows(rows.keys, rows.paths, rows.scores,
                             np.zeros((ROWS, 8), np.float16)), LABELS, thresholds=None)  # fmt: skip
    assert main(["serve", "--checkpoint", str(run), "--collection", str(other)]) == 2
    assert "8 dimensions" in capsys.readouterr().err


def test_summary_thresholds_forms(tmp_path: Path) -> None:
    from vgclip.serve.collection import summary_thresholds

    info = {"labels": ["a", "b"], "thresholds": {"per_label": {"a": 0.2}, "global": 0.7, "source": "x"}}
    assert summary_thresholds(info, tmp_path) == ([0.2, 0.7], 0.7)
    top = {"labels": ["a"], "thresholds": {"per_label": None, "global": None, "source": "top label"}}
    assert summary_thresholds(top, tmp_path) == (None, None)  # predict without thresholds: the top label
    assert summary_thresholds({"labels": ["a"], "thresholds": None}, tmp_path) == (None, None)
    with pytest.raises(VgclipError, match="no number for 'b'"):
        summary_thresholds({"labels": ["a", "b"], "thresholds": {"a": 0.1}}, tmp_path)


@pytest.mark.slow
def test_large_collection_pages_and_queries(tmp_path: Path) -> None:
    """100,000 rows, 20 labels, 256 dimensions: a page and a query are bounded answers (timing: see README)."""
    from vgclip.serve.collection import Selection, rank_rows, select_rows

    rows = random_rows(100_000, 20, 256, seed=1)
    coll = load_collection(write_collection(tmp_path / "big", rows, [f"l{i}" for i in range(20)],
                                            thresholds={"global": 0.9}, part_rows=10_000))  # fmt: skip
    assert len(coll) == 100_000 and coll.index["img099999"] == 99_999
    chosen = select_rows(coll, Selection(("l3", "l7"), "all", (0.9,) * 20))
    assert chosen.tolist() == np.flatnonzero((rows.scores[:, [3, 7]] >= 0.9).all(1)).tolist()
    query = rows.embeddings[12_345].astype(np.float32)
    top, sims = rank_rows(coll, query / np.linalg.norm(query), np.arange(100_000), 50)
    assert top[0] == 12_345 and len(top) == 50 and np.all(np.diff(sims) <= 0)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_collection_page_in_a_real_browser(setup, tmp_path: Path) -> None:
    run, folder, rows, _ = setup
    cat = np.flatnonzero(rows.scores[:, 0] >= 0.35)
    with live_server(tmp_path, run, None, "--collection", str(folder)) as live, chromium_page(1280, 900) as page:
        page.goto(live.base + "/collection")
        page.wait_for_selector("#items .item")
        page.wait_for_function(f"document.getElementById('status').dataset.total === '{ROWS}'")
        assert page.locator("#items .item").count() == 48
        page.check('#label-thresholds tr[data-label="cat"] input.pick')  # filter by a label at its threshold
        page.wait_for_function(f"document.getElementById('status').dataset.total === '{len(cat)}'")
        shown = [int(r) for r in page.locator("#items .item").evaluate_all("els => els.map(e => e.dataset.row)")]
        assert shown == cat[:48].tolist()
        page.fill('#label-thresholds tr[data-label="cat"] input.label-threshold', "0.8")  # its slider
        strict = np.flatnonzero(rows.scores[:, 0] >= 0.8)
        page.wait_for_function(f"document.getElementById('status').dataset.total === '{len(strict)}'")
        assert page.text_content('#label-thresholds tr[data-label="cat"] .count') == str(len(strict))
        page.uncheck('#label-thresholds tr[data-label="cat"] input.pick')
        page.fill("#query", QUERY)
        page.click("#search")
        page.wait_for_function("document.getElementById('status').dataset.total === '100'")
        assert page.locator("#items .item").first.get_attribute("data-row") == str(TARGET)
        page.click("#next")  # page forward through the query's matches
        page.wait_for_function("document.getElementById('status').dataset.offset === '48'")
        assert page.locator("#items .item").count() == 48
        page.click("#prev")
        page.wait_for_function("document.getElementById('status').dataset.offset === '0'")
        shown = "[...document.querySelectorAll('#items img')].slice(0, 8)"  # the ones in view (the rest load lazily)
        page.wait_for_function(f"{shown}.every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(ARTEFACTS / "collection.png"), full_page=False)
        assert page.locator("#status.error").count() == 0


def test_top_label_run_retag_folder_and_other_weights(setup, tmp_path: Path) -> None:
    """A run without thresholds pages by the top label; a re-tag folder (new labels, no embeddings of its own)
    reads the embeddings it re-tagged; a collection tagged with other weights is served with a warning."""
    import types

    import vgclip
    from vgclip.serve.collection_routes import CollectionRequest, check_collection, page_of

    run, folder, rows, _ = setup
    retag = tmp_path / "out" / "retag-0123456789"
    write_collection(retag, rows, LABELS, thresholds=None, weights_sha256="0" * 64)
    shutil.rmtree(retag / "embeddings")
    info = json.loads((retag / "summary.json").read_text())
    (retag / "summary.json").write_text(json.dumps({**info, "retag_of": str(folder)}))
    coll = load_collection(retag)
    assert coll.thresholds is None and coll.parts[0].path.parent == folder / "embeddings" / "img_emb"
    page = page_of(coll, CollectionRequest(labels=["dog"], limit=200), None)
    assert page["rule"] == "top"
    assert [i["row"] for i in page["items"]] == np.flatnonzero(rows.scores.argmax(1) == 1).tolist()
    assert all(i["predicted"] == ["dog"] for i in page["items"])
    model, transform, tokenizer = vgclip.load_checkpoint(run)
    engine = types.SimpleNamespace(model=model, tokenizer=tokenizer, device="cpu")
    (warning,) = check_collection(coll, engine, run)
    assert "other weights" in warning and str(run) in warning
    assert check_collection(load_collection(folder), engine, run) == []
