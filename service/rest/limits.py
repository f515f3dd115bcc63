"""Request-body cap (413) enforced while the body streams in, before anything parses it."""

from __future__ import annotations

from service.inputs import InputError
from service.rest.errors import error_response


class BodyTooLarge(InputError):
    def __init__(self, limit: int, seen: int | None = None):
        size = f" ({seen} bytes)" if seen is not None else ""
        super().__init__("payload_too_large", f"request body{size} exceeds the limit of {limit} bytes "
                         f"(CALIB_MAX_BODY_BYTES)", 413)


class BodyLimitMiddleware:
    """Refuses by Content-Length at once; counts streamed (chunked) bodies as they arrive."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
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
