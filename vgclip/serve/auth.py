"""Who may use `vgclip serve`: a token when it listens beyond this machine, and no writes from other origins.

`AccessGuard` is one ASGI middleware around the whole app:

- **Token** (when the server has one): a request is let in when it carries the token as `Authorization: Bearer
  TOKEN` (API clients) or as the cookie that opening `http://HOST:PORT/?token=TOKEN` sets (browsers: HttpOnly, so
  page scripts cannot read it; SameSite=Strict, so other sites' pages do not send it). Everything else answers 401
  with one line, except `/api/health`, which answers `{"status": "ok"}` and nothing more (load balancers).
- **Origin**: any method other than GET / HEAD (the routes that change something) is refused (403) when its
  `Origin` (or, without one, its `Referer`) is not this server's own scheme://host:port, token or not, so a page
  on another site cannot make a browser that is logged in (or on the same machine) save thresholds. Requests
  with neither header (curl, scripts) are let through: they are not a browser acting for another site.

`choose_token` turns the command line into the token (or none) the server runs with.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from html import escape
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from vgclip.errors import VgclipError
from vgclip.serve.limits import answer_unread

__all__ = ["OPEN_PATHS", "TOKEN_ENV", "AccessGuard", "choose_token", "is_loopback", "same_origin"]

TOKEN_ENV = "VGCLIP_SERVE_TOKEN"
OPEN_PATHS = ("/api/health",)  # answered without a token, with {"status": "ok"} only
SAFE_METHODS = ("GET", "HEAD")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# URL-safe and cookie-safe as it stands (no escaping anywhere), and long enough not to be guessed.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.~-]{16,}")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in ("localhost", "localhost.")


def choose_token(host: str, token: str | None, no_token: bool, env_token: str | None) -> tuple[str | None, bool]:
    """(token, generated) for `vgclip serve`: --token, else $VGCLIP_SERVE_TOKEN, else a random one when `host` is
    not a loopback address; none with --no-token, or on loopback when neither is given."""
    if no_token and token:
        raise VgclipError("--token and --no-token contradict each other: give one")
    if no_token:
        return None, False
    chosen = token or env_token or None
    if chosen is not None and not TOKEN_PATTERN.fullmatch(chosen):
        raise VgclipError("the token must be at least 16 characters among A-Z a-z 0-9 _ . ~ - (e.g. the output of "
                          "python -c 'import secrets; print(secrets.token_urlsafe())')")  # fmt: skip
    if chosen is None and not is_loopback(host):
        return secrets.token_urlsafe(32), True
    return chosen, False


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _origin_of(url: str, default_scheme: str | None = None) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL or of `host[:port]` with `default_scheme`; None when it has none (`null`)."""
    try:
        parts = urlsplit(url if default_scheme is None else f"{default_scheme}://{url}")
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme.replace("ws", "http"), host.lower(), port or DEFAULT_PORTS[scheme]


def same_origin(scope: dict) -> bool:
    """Whether the request's Origin (else Referer) is this server's scheme://host:port (from its Host header);
    True when it has neither (not a browser acting for a page)."""
    claimed = _header(scope, b"origin") or _header(scope, b"referer")
    if claimed is None:
        return True
    host = _header(scope, b"host")
    own = _origin_of(host, scope.get("scheme", "http")) if host else None
    return own is not None and _origin_of(claimed) == own


class AccessGuard:
    """ASGI middleware: the token check (when `token` is set) and the same-origin rule for writes (always)."""

    def __init__(self, app: Any, token: str | None = None, drain_limit: int = 0) -> None:
        self.app = app
        self.token = token
        self.drain_limit = drain_limit  # how much of a refused body is read first (see vgclip.serve.limits)
        # The cookie is named after the token so that two servers on one host (cookies ignore ports) keep theirs.
        digest = hashlib.sha256(token.encode()).hexdigest()[:12] if token else ""
        self.cookie = f"vgclip_token_{digest}"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        await answer_unread(refusal, scope, receive, send, self.drain_limit)

    def refusal(self, scope: dict) -> Response | None:
        """The answer that stops this request here, or None to let the app answer it."""
        method = scope.get("method", "GET")
        if (method not in SAFE_METHODS or scope["type"] == "websocket") and not same_origin(scope):
            claimed = _header(scope, b"origin") or _header(scope, b"referer")
            text = (f"refused: a {method} from {claimed[:100]!r}, not from this server's own pages (writes are "
                    "taken from them, or from clients that send no Origin)")  # fmt: skip
            return _one_line(scope, 403, text)
        if self.token is None:
            return None
        query = self._query_token(scope)
        if query is not None and self._valid(query) and method in SAFE_METHODS and scope["type"] == "http":
            return self._welcome(scope)
        if self._valid(self._bearer(scope)) or self._valid(self._cookie_token(scope)):
            return None
        if scope.get("path") in OPEN_PATHS:
            return JSONResponse({"status": "ok"})
        return _one_line(scope, 401, "this vgclip server needs its token: open the URL `vgclip serve` printed "
                                     "(http://HOST:PORT/?token=...), or send Authorization: Bearer TOKEN",
                         {"WWW-Authenticate": 'Bearer realm="vgclip serve"'})  # fmt: skip

    def _valid(self, candidate: str | None) -> bool:
        # Constant time: how much of a guess matches must not show in how long the answer takes.
        if candidate is None or self.token is None:
            return False
        return hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), self.token.encode())

    @staticmethod
    def _bearer(scope: dict) -> str | None:
        kind, _, value = (_header(scope, b"authorization") or "").partition(" ")
        return value.strip() if kind.lower() == "bearer" else None

    def _cookie_token(self, scope: dict) -> str | None:
        # Parsed by hand: http.cookies gives up on the whole header for one odd cookie of another app on this host.
        for item in (_header(scope, b"cookie") or "").split(";"):
            name, _, value = item.strip().partition("=")
            if name == self.cookie:
                return value
        return None

    @staticmethod
    def _query_token(scope: dict) -> str | None:
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        return next((value for key, value in pairs if key == "token"), None)

    def _welcome(self, scope: dict) -> Response:
        """The first visit with ?token=: set the cookie, then go to the same URL without the token. A page that moves
        on (rather than a 303) because a SameSite=Strict cookie set during a redirect that another site started
        (a link in a chat or a mail) is not sent on that redirect's next request, which would answer 401."""
        rest = [(k, v) for k, v in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
                if k != "token"]  # fmt: skip
        target = (scope.get("root_path", "") + scope["path"]) + (f"?{urlencode(rest)}" if rest else "")
        link = escape(target, quote=True)
        html = (f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={link}">'
                f'<title>vgclip</title><p>Signed in. <a href="{link}">Continue</a></p>')  # fmt: skip
        answer = HTMLResponse(html, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        answer.set_cookie(self.cookie, self.token or "", httponly=True, samesite="strict", path="/",
                          secure=scope.get("scheme") == "https")  # fmt: skip
        return answer


def _one_line(scope: dict, status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    """A refusal: {"detail": text} under /api (what the pages' fetch shows), plain text elsewhere."""
    if str(scope.get("path", "")).startswith("/api/"):
        return JSONResponse({"detail": text}, status, headers=headers)
    return PlainTextResponse(f"{status}: {text}\n", status, headers=headers)
