"""`X-Served-By: <pid>` on every response when several server processes share the port
(CALIB_WORKERS > 1): says which worker answered, for a slow-request hunt or a load-spread check."""

from __future__ import annotations

import os


class ServedByMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.header = (b"x-served-by", str(os.getpid()).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
