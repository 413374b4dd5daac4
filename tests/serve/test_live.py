"""`vgclip serve` as a real uvicorn server on 127.0.0.1: concurrent load, and the pages driven by headless Chromium."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The HTTP client Starlette's TestClient uses (httpx2 with Starlette 1.x).
httpx = pytest.importorskip("httpx2", reason="httpx2 is not installed (pip install 'vgclip[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'vgclip[serve]')")

from tests._paths import ROOT
from tests.serve._serve_fixtures import (  # noqa: E402
    ARTEFACTS,
    CHROMIUM,
    REAL_PHOTOS,
    chromium_page,
    live_server,
    make_report,
    make_run,
)

# Screenshots for people to look at: kept after the run (the folder is git-ignored).


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """(base URL, report folder, process) of `vgclip serve` on a free loopback port; stopped with SIGINT after."""
    root = tmp_path_factory.mktemp("live")
    run = make_run(root / "run")
    report, _ = make_report(run, root)
    with live_server(root, run, report) as live:
        yield live.base, report, live.proc


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_concurrent_load_no_errors_stable_memory(server) -> None:
    base, _, _ = server
    labels = "aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow"
    bodies = [_jpeg(i) for i in range(8)]

    def client_run(index: int, requests: int) -> list[int]:
        codes = []
        with httpx.Client(base_url=base, timeout=60) as client:
            for k in range(requests):
                files = [("images", (f"img{index}-{k}.jpg", bodies[(index + k) % len(bodies)]))]
                codes.append(client.post("/api/predict", files=files, data={"labels": labels}).status_code)
        return codes

    def round_of(clients: int, requests: int) -> list[int]:
        with ThreadPoolExecutor(clients) as pool:
            return [c for codes in pool.map(client_run, range(clients), [requests] * clients) for c in codes]

    assert round_of(16, 2) == [200] * 32  # warm-up: allocator pools, thread pools
    before = httpx.get(f"{base}/api/health").json()
    codes = round_of(16, 4) + round_of(16, 4)
    after = httpx.get(f"{base}/api/health").json()
    assert codes == [200] * 128
    assert after["batched_images"] - before["batched_images"] == 128
    assert after["batches"] - before["batches"] < 128  # requests shared forwards
    growth = after["rss_bytes"] - before["rss_bytes"]
    assert growth < 64 * 1024 * 1024, f"server memory grew by {growth / 2**20:.1f} MiB under a repeated load"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_pages_in_a_real_browser(server) -> None:
    base, report, _ = server
    photos = sorted(REAL_PHOTOS.glob("*.jpg"))[:3] if REAL_PHOTOS.is_dir() else []
    if not photos:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        photos = [ARTEFACTS / "synthetic.jpg"]
        photos[0].write_bytes(_jpeg(0))
    with chromium_page(1280, 900) as page:
        _tag_page(page, base, photos)
        page.screenshot(path=str(ARTEFACTS / "tag.png"), full_page=True)
        _threshold_page(page, base, report)
        page.screenshot(path=str(ARTEFACTS / "thresholds.png"), full_page=True)
        page.goto(base + "/docs")  # Swagger UI renders from files vgclip serves (Chromium has no internet here)
        page.wait_for_selector('.opblock-summary-path[data-path="/api/predict"]')
        page.screenshot(path=str(ARTEFACTS / "docs.png"))


@pytest.mark.slow
def test_an_upload_over_the_limit_reads_as_413_whatever_the_client(server) -> None:
    """urllib sends the whole body before it reads: it gets the 413 and its message, not a connection reset, and
    the connection (http.client) then serves the next request."""
    import http.client
    import urllib.error
    import urllib.request

    base, _, _ = server
    body = b"\0" * (40 * 1024 * 1024)  # twice the default 20 MiB limit
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    request = urllib.request.Request(f"{base}/api/predict", data=body, headers=headers)
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 413
        assert "too large" in json.loads(caught.value.read())["detail"]
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    try:
        connection.request("POST", "/api/predict", body=body, headers=headers)
        refused = connection.getresponse()
        assert refused.status == 413 and "40.0 MiB" in json.loads(refused.read())["detail"]
        connection.request("GET", "/api/health")  # the same connection: the refused body was read to its end
        assert connection.getresponse().status == 200
    finally:
        connection.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_tag_page_says_an_upload_is_too_large(server, tmp_path: Path) -> None:
    base, _, _ = server
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * (21 * 1024 * 1024))  # over the 20 MiB limit: refused before anything decodes it
    with chromium_page(1280, 700) as page:
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('labels').value.length > 0")
        page.set_input_files("#files", [str(big)])
        page.wait_for_function("document.getElementById('status').classList.contains('error')")
        text = page.text_content("#status")
        page.screenshot(path=str(ARTEFACTS / "tag-too-large.png"))
    assert text.startswith("413: the upload is too large: 21.0 MiB"), text


def _shown_set(page) -> list[str]:
    text = page.locator(".result .predicted").first.text_content()
    return [] if text == "(none)" else text.split(", ")


def _tag_page(page, base: str, photos: list[Path]) -> None:
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('labels').value.length > 0")
    labels = ["circle", "square", "star", "triangle"]
    page.fill("#labels", ", ".join(labels))
    page.select_option("#score", "softmax")  # spread over the labels (sigmoid saturates on the tiny model)
    page.set_input_files("#files", [str(p) for p in photos])  # picking files scores them at once
    page.wait_for_selector(".result .bar-row")
    assert page.locator(".result").count() == len(photos)
    scores = {row.get_attribute("data-label"): float(row.get_attribute("data-score"))
              for row in page.locator(".result").first.locator(".bar-row").all()}  # fmt: skip
    assert sorted(scores) == sorted(labels)
    ordered = sorted(scores.values())
    seen = set()
    for target in (ordered[0] - 0.01, (ordered[-1] + ordered[-2]) / 2, (ordered[0] + ordered[1]) / 2,
                   ordered[-1] + 0.01):  # fmt: skip
        page.fill("#global-threshold", f"{target:.6f}")  # moves the slider (the browser snaps it to its step)
        applied = float(page.input_value("#global-threshold"))
        expected = [lab for lab in labels if scores[lab] >= applied]
        assert _shown_set(page) == expected, (applied, scores)
        seen.add(tuple(expected))
    assert len(seen) >= 3  # all labels, some, none: the set followed the slider
    page.fill("#global-threshold", f"{(ordered[0] + ordered[1]) / 2:.6f}")


def _threshold_page(page, base: str, report: Path) -> None:
    from vgclip.eval.metrics import threshold_metrics
    from vgclip.serve.report_folder import read_scores_csv

    page.goto(base + "/thresholds")
    page.wait_for_selector("#per-class tbody tr")
    page.select_option("#mode", "global")  # the report's own thresholds (per class) are shown first
    page.click("#tune-f1")
    page.wait_for_function("document.getElementById('save-status').textContent.startsWith('Moved to f1')")
    _, classes, scores, labels, valid = read_scores_csv(report / "scores.csv")
    shown = float(page.get_attribute("#global-value", "data-value"))
    micro_f1 = threshold_metrics(scores, labels, valid, classes, np.float64(shown))["micro"]["f1"]
    assert page.text_content("#averages .micro-f1") == f"{micro_f1:.3f}"
    page.select_option("#gallery-class", classes[0])
    page.wait_for_function("[...document.querySelectorAll('.gallery img')].every(i => i.complete && i.naturalWidth > 0)")
    box = page.locator("#curve").bounding_box()  # drag the threshold line on the curve to the right
    before = float(page.get_attribute("#global-value", "data-value"))
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    dragged = float(page.get_attribute("#global-value", "data-value"))
    lo, hi = float(page.get_attribute("#global-threshold", "min")), float(page.get_attribute("#global-threshold", "max"))
    # The curve's viewBox is 640 wide with the plot between x=40 and x=630: 80 % of it is x=512.
    assert dragged == pytest.approx(lo + (512 - 40) / 590 * (hi - lo), abs=0.01 * (hi - lo)) and dragged != before
    page.click("#tune-f1")  # back to the F1 threshold before saving
    page.wait_for_function(f"Number(document.getElementById('global-value').dataset.value) === {shown!r}")
    page.click("#save")
    page.wait_for_function("document.getElementById('save-status').textContent.startsWith('Saved')")
    saved = report / "saved" / "thresholds.json"
    info = json.loads(saved.read_text())
    assert info["mode"] == "global" and info["objective"] == "f1" and set(info["per_class"]) == set(classes)
    assert info["global"] == pytest.approx(shown)


@pytest.mark.slow
def test_bench_serve_reports_both_sides(tmp_path: Path) -> None:
    """The benchmark runs end to end on a tiny run and prints the fields README quotes (no speed is asserted)."""
    bench = ROOT / "benchmarks" / "bench_serve.py"
    done = subprocess.run([sys.executable, str(bench), "--config", "tiny", "--images", "12", "--clients", "4",
                           "--rounds", "1", "--time-limit", "60"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["errors"] == 0 and out["clients"] == 4 and out["offline_images_per_s"] > 0
    assert out["crops"] == "centre"  # both sides score with the run's eval.crops (the tiny preset: one crop)
    assert out["served_vs_offline"] == pytest.approx(out["served_images_per_s"] / out["offline_images_per_s"], rel=0.01)
    for key in ("requests_per_s", "p50_ms", "p95_ms", "server_rss_mb_before", "server_rss_mb_after"):
        assert out[key] > 0
