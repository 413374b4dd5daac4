"""The hub reachability check goes where the download would go: through HTTPS_PROXY / HTTP_PROXY."""

from __future__ import annotations

import http.server
import threading

import pytest

import vgclip.model.hub as hub


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy stand-in on 127.0.0.1: answers every request itself and records its target."""

    seen: list[str] = []

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def proxy():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Proxy.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _fresh_session(monkeypatch, **env):
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import close_session

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this test asks

    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    close_session()  # the hub's client reads the proxy variables when it is created
    hub.host_reachable.cache_clear()


def test_a_host_only_the_proxy_can_reach_counts_as_reachable(monkeypatch, proxy):
    # No such host resolves here: a direct connection fails, the proxy answers.
    target = "http://hub.vgclip-test.invalid/"
    _fresh_session(monkeypatch, HTTP_PROXY=proxy)
    try:
        assert hub.host_reachable(target, timeout=5.0)
        assert _Proxy.seen == [target]
    finally:
        _fresh_session(monkeypatch)


def test_without_the_proxy_the_same_host_is_unreachable(monkeypatch):
    _fresh_session(monkeypatch)
    assert not hub.host_reachable("http://hub.vgclip-test.invalid/", timeout=2.0)
