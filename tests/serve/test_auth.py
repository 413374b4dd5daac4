"""Who may use `vgclip serve`: the token beyond loopback (in-process, then a live server on 0.0.0.0 driven by
curl-like clients and headless Chromium), and the refusal of writes from other origins."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'vgclip[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from tests.serve._serve_fixtures import ARTEFACTS, CHROMIUM, chromium_page, live_server, make_report, make_run  # noqa: E402
from vgclip.errors import VgclipError  # noqa: E402
from vgclip.serve.auth import choose_token, is_loopback, same_origin  # noqa: E402
from vgclip.serve.startup import ServeSettings, build_app, open_lines  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
SAVE_BODY = {"mode": "global", "global_threshold": 0.5, "per_class": {}, "objective": "manual"}


def _routes(client: TestClient, headers: dict[str, str] | None = None) -> dict[str, int]:
    """Status of each page and API route the brief names (plus the docs and a static file)."""
    files = [("images", ("x.png", b"\x89PNG not really"))]
    form = {"labels": "a"}
    return {
        "/": client.get("/", headers=headers).status_code,
        "/thresholds": client.get("/thresholds", headers=headers).status_code,
        "/docs": client.get("/docs", headers=headers).status_code,
        "/static/tag.js": client.get("/static/tag.js", headers=headers).status_code,
        "/api/labels": client.get("/api/labels", headers=headers).status_code,
        "/api/report": client.get("/api/report", headers=headers).status_code,
        "POST /api/predict": client.post("/api/predict", files=files, data=form, headers=headers).status_code,
        "POST /api/report/thresholds": client.post("/api/report/thresholds", json=SAVE_BODY,
                                                   headers=headers).status_code,
    }  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("access")
    run = make_run(root / "run")
    report, _ = make_report(run, root)
    return run, report


@pytest.fixture(scope="module")
def guarded(made) -> TestClient:
    run, report = made
    with TestClient(build_app(ServeSettings(run, report, token=TOKEN, max_upload_mb=1.0))) as client:
        yield client


def test_choose_token_by_address_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_token("127.0.0.1", None, False, None) == (None, False)  # loopback: as before
    assert choose_token("localhost", TOKEN, False, None) == (TOKEN, False)
    assert choose_token("::1", None, False, TOKEN) == (TOKEN, False)
    generated, made_here = choose_token("0.0.0.0", None, False, None)
    assert made_here and len(generated) >= 40 and generated != choose_token("0.0.0.0", None, False, None)[0]
    assert choose_token("192.168.1.5", None, False, TOKEN) == (TOKEN, False)
    assert choose_token("0.0.0.0", None, True, TOKEN) == (None, False)  # --no-token wins over the environment
    with pytest.raises(VgclipError, match="contradict"):
        choose_token("0.0.0.0", TOKEN, True, None)
    for weak in ("short", "with space in it, long enough", "a+b/c=d" * 4):
        with pytest.raises(VgclipError, match="at least 16"):
            choose_token("0.0.0.0", weak, False, None)
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "[::1]", "LOCALHOST", "0.0.0.0", "::", "myhost")] == [
        True, True, True, True, False, False, False]  # fmt: skip


def test_open_lines_name_the_url_or_warn() -> None:
    (line, warning), = open_lines("0.0.0.0", 8123, "abc" * 6, True, False)
    assert not warning and re.search(r"open http://[^/\s]+:8123/\?token=abcabcabcabcabcabc ", line)
    (given, _), = open_lines("10.0.0.2", 8123, TOKEN, False, False)
    assert TOKEN not in given and "http://10.0.0.2:8123/?token=TOKEN" in given  # a given token is not echoed
    (plain, _), (warn, is_warning) = open_lines("10.0.0.2", 8123, None, False, True)
    assert plain.startswith("vgclip serve: open http://10.0.0.2:8123/ ") and is_warning
    assert warn.startswith("vgclip serve: warning: --no-token: anyone who can reach 10.0.0.2:8123 ")
    assert len(open_lines("127.0.0.1", 8123, None, False, True)) == 1  # loopback: nothing to warn about
    assert "http://[::1]:8123/" in open_lines("::1", 8123, None, False, False)[0][0]


def test_same_origin_compares_scheme_host_and_port() -> None:
    def scope(*headers: tuple[str, str], scheme: str = "http") -> dict:
        return {"scheme": scheme, "headers": [(k.encode(), v.encode()) for k, v in headers]}

    host = ("host", "box:8000")
    assert same_origin(scope(host))  # no Origin nor Referer: curl, scripts
    assert same_origin(scope(host, ("origin", "http://BOX:8000")))
    assert same_origin(scope(("host", "box"), ("origin", "http://box:80")))
    assert same_origin(scope(("host", "box"), ("origin", "https://box"), scheme="https"))  # behind a TLS proxy
    assert same_origin(scope(host, ("referer", "http://box:8000/thresholds?x=1")))
    for other in ("http://evil.example", "http://box:8001", "https://box:8000", "null", "http://box:8000.evil.example"):
        assert not same_origin(scope(host, ("origin", other))), other
    assert not same_origin(scope(host, ("referer", "http://evil.example/box:8000")))
    assert not same_origin(scope(("origin", "http://box:8000")))  # no Host to compare with


def test_every_route_needs_the_token_but_health(guarded: TestClient) -> None:
    guarded.cookies.clear()
    refused = _routes(guarded)
    assert set(refused.values()) == {401}, refused
    page, api = guarded.get("/thresholds"), guarded.get("/api/report")
    assert page.text.count("\n") == 1 and "token" in page.text and page.headers["www-authenticate"].startswith("Bearer")
    assert "token" in api.json()["detail"]
    assert guarded.get("/api/health").json() == {"status": "ok"}  # open, and says nothing else
    for wrong in (TOKEN + "x", TOKEN[:-1], "Bearer"):
        assert set(_routes(guarded, {"Authorization": f"Bearer {wrong}"}).values()) == {401}
    assert guarded.get(f"/?token={TOKEN}x").status_code == 401
    allowed = _routes(guarded, {"Authorization": f"Bearer {TOKEN}"})
    assert allowed == {**{k: 200 for k in allowed}, "POST /api/predict": 415}, allowed  # 415: the "PNG" is not one
    assert "checkpoint" in guarded.get("/api/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()


def test_the_token_url_sets_a_strict_httponly_cookie(guarded: TestClient) -> None:
    guarded.cookies.clear()
    first = guarded.get(f"/thresholds?token={TOKEN}&x=1")
    assert first.status_code == 200 and 'url=/thresholds?x=1"' in first.text  # then the same URL without the token
    cookie = first.headers["set-cookie"]
    assert TOKEN in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert first.headers["cache-control"] == "no-store"
    assert _routes(guarded) == {**{k: 200 for k in _routes(guarded)}, "POST /api/predict": 415}
    guarded.cookies.clear()
    guarded.cookies.set(cookie.split("=")[0], TOKEN + "x")
    assert guarded.get("/").status_code == 401


def test_a_write_from_another_origin_is_refused_whatever_the_token(guarded: TestClient, made) -> None:
    _, report = made
    saved = report / "saved" / "thresholds.json"
    guarded.cookies.clear()
    assert guarded.get(f"/?token={TOKEN}").status_code == 200  # logged in: the cookie is set
    before = saved.read_bytes() if saved.exists() else None
    for header in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}, {"Origin": "null"}):
        answer = guarded.post("/api/report/thresholds", json={**SAVE_BODY, "global_threshold": 0.91}, headers=header)
        assert answer.status_code == 403 and "refused" in answer.json()["detail"], header
        assert (saved.read_bytes() if saved.exists() else None) == before  # nothing written
    own = guarded.post("/api/report/thresholds", json=SAVE_BODY, headers={"Origin": "http://testserver"})
    assert own.status_code == 200 and json.loads(saved.read_text())["global"] == 0.5


def test_loopback_without_token_still_refuses_foreign_writes(made) -> None:
    run, report = made
    with TestClient(build_app(ServeSettings(run, report))) as client:
        assert client.get("/api/labels").status_code == 200  # no token asked, as before
        assert client.post("/api/report/thresholds", json=SAVE_BODY).status_code == 200  # curl-like: no Origin
        evil = client.post("/api/report/thresholds", json=SAVE_BODY, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403


@pytest.fixture(scope="module")
def open_server(made, tmp_path_factory: pytest.TempPathFactory):
    """(live server, printed token) of `vgclip serve --host 0.0.0.0` (no --token: it makes one up)."""
    run, report = made
    with live_server(tmp_path_factory.mktemp("open"), run, report, host="0.0.0.0") as live:
        found = re.search(r"^vgclip serve: open http://\S+:\d+/\?token=([A-Za-z0-9_-]+) ", live.text(), re.M)
        assert found, live.text()[-2000:]
        yield live, found.group(1)


@pytest.mark.slow
def test_live_server_on_all_interfaces_needs_the_printed_token(open_server) -> None:
    httpx = pytest.importorskip("httpx2", reason="httpx2 is not installed (pip install 'vgclip[dev]')")
    live, token = open_server
    with httpx.Client(base_url=live.base, timeout=60) as client:
        assert set(_routes(client).values()) == {401}
        assert set(_routes(client, {"Authorization": f"Bearer {token[:-1]}x"}).values()) == {401}
        allowed = _routes(client, {"Authorization": f"Bearer {token}"})
        assert allowed == {**{k: 200 for k in allowed}, "POST /api/predict": 415}, allowed
        assert client.get("/api/health").json() == {"status": "ok"}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_browser_opens_the_printed_url_then_the_cookie_carries_the_token(open_server, made) -> None:
    live, token = open_server
    saved = made[1] / "saved" / "thresholds.json"
    saved.unlink(missing_ok=True)
    with chromium_page(1280, 900) as page:
        # A link on another site (here a blank page's): a SameSite=Strict cookie must still reach the page.
        page.set_content(f'<a id="open" href="{live.base}/?token={token}">vgclip</a>')
        page.click("#open")
        page.wait_for_url(live.base + "/")  # the token is gone from the address bar
        page.wait_for_function("document.getElementById('labels').value.length > 0")
        page.click("nav a[href='/thresholds']")
        page.wait_for_selector("#per-class tbody tr")
        page.click("#save")  # the page's own POST: same origin, so accepted
        page.wait_for_function("document.getElementById('save-status').textContent.startsWith('Saved')")
        page.screenshot(path=str(ARTEFACTS / "thresholds-with-token.png"))
        assert "token" not in page.url
        (cookie,) = page.context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == token
        assert page.evaluate("document.cookie") == ""  # HttpOnly: page scripts cannot read it
    assert saved.is_file()  # written by the page's Save
