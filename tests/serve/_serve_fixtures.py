"""A tiny saved run and a `vgclip zeroshot` report on synthetic VOC data, for the `vgclip serve` tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._paths import ROOT, SHARED_DATA

SHARED = SHARED_DATA
REAL_PHOTOS = SHARED / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Screenshots of the browser tests (kept out of the repository).
ARTEFACTS = Path(os.environ.get("VGCLIP_TEST_ARTEFACTS", ROOT / ".pytest_cache" / "serve"))


@contextmanager
def chromium_page(width: int = 1280, height: int = 720) -> Iterator:
    """A page of Debian's headless Chromium driven by Playwright (a browser download is not possible here);
    ARTEFACTS exists for its screenshots. Skips where Playwright is not installed."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def make_run(folder: Path) -> Path:
    """A randomly initialised 'tiny' run folder (fast to load; scores are arbitrary but deterministic)."""
    import vgclip
    from vgclip.model.checkpoint import save_model

    config = vgclip.load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    save_model(folder, model, tokenizer, config)
    return folder


def make_report(run: Path, folder: Path, score: str = "sigmoid") -> tuple[Path, Path]:
    """(report folder, VOC folder): `vgclip zeroshot` on 40 synthetic VOC images, thresholds tuned per class."""
    from vgclip.cli import main
    from vgclip.synthetic.writers import write_synthetic_voc

    voc = folder / "voc"
    write_synthetic_voc(voc, 40, seed=5, min_side=64, max_side=80)
    report = folder / "report"
    argv = ["zeroshot", "--checkpoint", str(run), "--voc-root", str(voc), "--out", str(report), "--workers", "0",
            "--no-plots", f"eval.score={score}"]  # fmt: skip
    assert main(argv) == 0
    return report, voc


STARTUP_LIMIT_S = 180  # a loaded 2-core machine imports torch and transformers slowly


@dataclass
class LiveServer:
    """A running `vgclip serve`: its loopback base URL, process and log (stdout and stderr together)."""

    base: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        """Everything the server printed so far."""
        return self.log.read_text(errors="replace")


@contextmanager
def live_server(root: Path, run: Path, report: Path | None, *extra: str,
                host: str = "127.0.0.1") -> Iterator[LiveServer]:  # fmt: skip
    """`vgclip serve` on a free port (with `--report report` unless it is None), bound to `host` and reached
    through 127.0.0.1; waits until /api/health answers (it needs no token), stops it with SIGINT after and checks
    that it exits cleanly."""
    from tests._train_fixtures import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VGCLIP_SERVE_TOKEN", None)  # the tests say which token they want
    log_path = root / f"serve-{port}.log"
    shown = ["--report", str(report)] if report is not None else []
    argv = [sys.executable, "-m", "vgclip.cli", "serve", "--checkpoint", str(run), *shown,
            "--host", host, "--port", str(port), *extra]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
        try:
            _wait_healthy(server)
            yield server
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down cleanly
            try:
                code = proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert code == 0, server.text()[-2000:]


def _wait_healthy(server: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{server.base}/api/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:  # refused while starting (URLError is an OSError)
            time.sleep(0.5)
    server.proc.kill()
    pytest.fail(f"server did not start: {server.text()[-2000:]}")
