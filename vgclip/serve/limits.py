"""Request-body limits of `vgclip serve`, answered so that every HTTP client can read the answer.

A server that answers an upload before reading its body, then closes, makes the kernel reset the connection
(unread data in the socket): a client that sends the whole body before reading (Python's `urllib.request`,
browsers' `fetch`) then sees "connection reset" instead of the 413 and its message. So a refused body is read and
discarded first, up to a bound a few times the upload limit; beyond that bound the answer is sent with
`Connection: close` (reading gigabytes to be polite is not worth it). A client that sent `Expect: 100-continue`
(curl) has sent no body yet: it gets the answer at once and never sends it.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

__all__ = ["DRAIN_FACTOR", "BodyLimit", "answer_unread", "drain_body", "too_large"]

DRAIN_FACTOR = 4  # a refused body up to 4x the upload limit is read and discarded before answering


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _declared_length(scope: dict) -> int | None:
    """The request's Content-Length, or None when absent or not a number."""
    length = _header(scope, b"content-length")
    return int(length) if length is not None and length.isdigit() else None


async def drain_body(receive: Any, limit: int) -> bool:
    """Read and discard the request body; True when it ended within `limit` bytes (False: too long, or the client
    went away), so the connection can stay open for the next request."""
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if seen > limit:
            return False


async def answer_unread(response: Response, scope: dict, receive: Any, send: Any, drain_limit: int) -> None:
    """Send `response` to a request whose body nobody will use, so that the client can read it (see the module)."""
    expects = (_header(scope, b"expect") or b"").lower() == b"100-continue"
    length = _declared_length(scope)
    has_body = length != 0 and (length is not None or _header(scope, b"transfer-encoding") is not None)
    if has_body and not expects:
        # Reading a declared body longer than the bound would only delay the same close: skip it.
        drained = length is None or length <= drain_limit
        if not (drained and await drain_body(receive, drain_limit)):
            response.headers["connection"] = "close"
    await response(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a POST must say its length (411 otherwise) and stay within the upload limit (413)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = _declared_length(scope)
            answer = None
            if length is None:
                answer = JSONResponse({"detail": "a request body needs a Content-Length"}, 411)
            elif length > self.max_bytes:
                answer = JSONResponse({"detail": too_large(length, self.max_bytes)}, 413)
            if answer is not None:
                return await answer_unread(answer, scope, receive, send, DRAIN_FACTOR * self.max_bytes)
        await self.app(scope, receive, send)


def too_large(length: int, limit: int) -> str:
    """The 413 message: sizes in MiB (what --max-upload-mb says) and in bytes."""
    return (f"the upload is too large: {length / 2**20:.1f} MiB ({length} bytes) is over the limit of "
            f"{limit / 2**20:.1f} MiB ({limit} bytes; vgclip serve --max-upload-mb)")  # fmt: skip
