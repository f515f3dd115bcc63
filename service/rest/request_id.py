"""Request IDs and the access log: every answer carries `X-Request-ID`, every error body its
`request_id`, and one "service.access" log line per request names it, so a user's bug report
(or the client's exception) leads straight to the server's log line.

The ID is the caller's own when it is sane (1-128 characters of [A-Za-z0-9._:+/=-]: fits a
header, a log line and JSON unescaped), else a fresh uuid4 hex. `RequestIdMiddleware` is pure
ASGI and is put outside *everything* (`ServiceApp` below wraps Starlette's ServerErrorMiddleware
too), so 500s, 413s from the body limit, 404s and 401s carry the ID like any other answer.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar

from fastapi import FastAPI

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode("latin-1")
SANE_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}")

access_logger = logging.getLogger("service.access")

current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def request_id_from(headers) -> str:
    """The client's ID when sane, else a new one (ASGI raw headers: [(name, value)] bytes)."""
    for name, value in headers or ():
        if name.lower() == _HEADER_KEY:
            if SANE_ID.fullmatch(value):
                return value.decode("ascii")
            break  # only the first X-Request-ID counts
    return uuid.uuid4().hex


def _printable(text: str, limit: int = 300) -> str:
    """A path as it may go in a log line: control and non-ASCII characters escaped, bounded."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


class RequestIdMiddleware:
    """Assigns the ID (contextvar for `error_response`), echoes it, writes the access line.

    The access line holds client address, method, path (no query string), status, duration and
    ID; never headers, so never an API key."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id_from(scope.get("headers"))
        token = current_request_id.set(rid)
        started = time.perf_counter()
        status = 500  # what the client gets if nothing below answers

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER_KEY]
                headers.append((_HEADER_KEY, rid.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
            self._log(scope, status, time.perf_counter() - started, rid)

    @staticmethod
    def _log(scope, status: int, seconds: float, rid: str) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        path = _printable(scope.get("path", ""))
        method = _printable(scope.get("method", ""), 16)
        access_logger.info("%s %s %s %d %.1fms request_id=%s", client[0] if client else "-", method, path,
                           status, seconds * 1000, rid,
                           extra={"request_id": rid, "http_method": method, "http_path": path,
                                  "http_status": status, "duration_ms": round(seconds * 1000, 3)})


class ServiceApp(FastAPI):
    """FastAPI with `RequestIdMiddleware` outside Starlette's own ServerErrorMiddleware.

    `add_middleware` can only place a middleware *inside* ServerErrorMiddleware, whose 500
    answer would then bypass it (no header, no access line with the real status)."""

    def build_middleware_stack(self):
        return RequestIdMiddleware(super().build_middleware_stack())
