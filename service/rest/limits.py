"""The request body's limits, enforced while it streams in, before anything parses it: its size
(413 `payload_too_large`, CALIB_MAX_BODY_BYTES) and its arrival deadline (408 `request_timeout`,
CALIB_BODY_READ_TIMEOUT_S: a client sending 1 byte a second is cut off, and the connection closed,
so it holds nothing past the deadline)."""

from __future__ import annotations

import asyncio

from service.inputs import InputError
from service.rest.errors import error_response


class BodyTooLarge(InputError):
    def __init__(self, limit: int, seen: int | None = None):
        size = f" ({seen} bytes)" if seen is not None else ""
        super().__init__("payload_too_large", f"request body{size} exceeds the limit of {limit} bytes "
                         f"(CALIB_MAX_BODY_BYTES)", 413)


class BodyReadTimeout(Exception):
    """The body did not arrive in time (not an InputError: answered here, with the connection closed)."""

    def __init__(self, timeout_s: float):
        super().__init__(f"the request body did not arrive within {timeout_s:g} s (CALIB_BODY_READ_TIMEOUT_S)")
        self.message = str(self)


class BodyLimitMiddleware:
    """Refuses by Content-Length at once; counts streamed (chunked) bodies as they arrive; the
    whole body must be in within `read_timeout_s` of the request's start."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None
            if declared is not None and declared > self.max_bytes:
                exc = BodyTooLarge(self.max_bytes, declared)
                response = error_response(413, exc.code, exc.message, scope=scope)
                response.headers["Connection"] = "close"
                return await response(scope, receive, send)

        seen = 0
        started = False
        body_done = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyReadTimeout(self.read_timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside a route's exception handlers
            if started:
                raise
            await error_response(413, exc.code, exc.message, scope=scope)(scope, receive, send)
        except BodyReadTimeout as exc:
            if started:
                raise
            response = error_response(408, "request_timeout", exc.message, scope=scope)
            response.headers["Connection"] = "close"  # the rest of the body is never read
            await response(scope, receive, send)
