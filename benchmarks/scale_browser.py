"""bench_scale.py's serve stage: `vgclip serve` on the zeroshot report, its threshold page in headless Chromium.

`stage_serve` starts the server (a subprocess, as a user runs it), waits for /api/health, runs this file as a
second subprocess (`python scale_browser.py URL`) that opens URL/thresholds in Debian's Chromium through Playwright
and prints one JSON line, then stops the server with SIGINT. The page figures:
  drawn_s          from navigation start until the curve (#curve has elements) and the per-class table are drawn
  gallery_s        until the network is idle after that (the gallery's first page of thumbnails loaded)
  gallery_images   thumbnails in the gallery's DOM and thumbnails fetched (of `report_images` in the report)
  json_bytes       bytes of the JSON responses the page fetched (decoded; encoded beside it)
  json_timeline_ms per JSON request, ms after navigation start: sent, first byte (the server's work), last byte
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

DRAWN = ("document.querySelectorAll('#per-class tbody tr').length > 0 && "
         "document.getElementById('curve').childElementCount > 0")
RESOURCES = ("performance.getEntriesByType('resource').map(e => ({name: e.name, type: e.initiatorType, "
             "encoded: e.encodedBodySize, decoded: e.decodedBodySize, start: e.startTime, "
             "first_byte: e.responseStart, end: e.responseEnd}))")
STARTUP_S = 300


def measure_page(base: str) -> dict:
    """Open BASE/thresholds; the figures of the module docstring."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(120_000)
            start = time.perf_counter()
            page.goto(base + "/thresholds", wait_until="commit")
            page.wait_for_function(DRAWN, polling=50)
            drawn = time.perf_counter() - start
            drawn_in_page = page.evaluate("performance.now()") / 1000
            page.wait_for_load_state("networkidle")
            gallery = time.perf_counter() - start
            entries = page.evaluate(RESOURCES)
            dom_images = page.evaluate("document.querySelectorAll('.gallery img').length")
            rows = page.evaluate("document.querySelectorAll('#per-class tbody tr').length")
        finally:
            browser.close()
    images = [e for e in entries if "/api/report/images/" in e["name"]]
    data = [e for e in entries if "/api/" in e["name"] and e not in images]
    return {"drawn_s": round(drawn, 3), "drawn_in_page_s": round(drawn_in_page, 3), "gallery_s": round(gallery, 3),
            "gallery_dom_images": dom_images, "gallery_images_fetched": len(images), "per_class_rows": rows,
            "json_bytes": sum(e["decoded"] for e in data), "json_encoded_bytes": sum(e["encoded"] for e in data),
            "json_requests": [e["name"].split("/api/", 1)[1] for e in data],
            # per JSON request: (ms from navigation start to the request, to its first byte, to its end)
            "json_timeline_ms": [[round(e["start"]), round(e["first_byte"]), round(e["end"])] for e in data]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < STARTUP_S and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/api/health", timeout=2) as answer:
                if answer.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("bench_scale: vgclip serve did not start")


def stage_serve(s) -> dict:
    """The serve stage (s: scale_stages.Scale): server costs over its life, the page's figures."""
    import threading

    from scale_measure import _cpu_seconds, machine_note, watch
    from scale_stages import ENV

    port = _port()
    base = f"http://127.0.0.1:{port}"
    log = s.out / "logs" / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    before, cpu0, start = machine_note(), _cpu_seconds(), time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(s.cli("serve", "--checkpoint", str(s.trained), "--report", str(s.out / "report"),
                                      "--port", str(port)), stdout=out, stderr=subprocess.STDOUT, env=ENV)
        seen: dict = {}
        watcher = threading.Thread(target=lambda: seen.update(watch(proc)), daemon=True)
        watcher.start()
        try:
            startup = _wait_healthy(base, proc)
            done = subprocess.run([sys.executable, __file__, base], capture_output=True, text=True, env=ENV,
                                  timeout=600, check=False)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            watcher.join(timeout=10)
    if done.returncode != 0:
        raise SystemExit(f"bench_scale: the threshold page failed:\n{done.stderr[-3000:]}")
    page = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(_cpu_seconds() - cpu0, 2),
            "peak_rss_mb": seen.get("peak_rss_mb"), "max_process_rss_mb": seen.get("max_process_rss_mb"),
            "bytes_written": 0, "rc": seen.get("rc"), "start": before, "end": machine_note(),
            "items": s.sizes["voc_test"], "startup_s": round(startup, 2), "report_images": s.sizes["voc_test"],
            **page}


if __name__ == "__main__":
    print(json.dumps(measure_page(sys.argv[1])))
