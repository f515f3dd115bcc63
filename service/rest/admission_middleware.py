"""Admission at the HTTP edge: 503 `overloaded` + Retry-After before the server takes on more
than it can hold (the limits themselves live in service.admission_limits).

Per request:
1. the body reserves `chunk x charge_factor` bytes from the shared budget as each chunk arrives
   (never the declared Content-Length: a client sending 1 byte a second holds 1 byte's worth); a
   chunk that does not fit waits up to CALIB_BUFFER_WAIT_S for room (the oldest request always
   gets it), then 503;
   the routes add what an .npz upload declares it inflates to (`calib.reservation` in the scope).
2. an evaluate (or compare) request takes an evaluation slot once its whole body is in, waiting in
   the bounded queue if need be: a slow upload never holds the slot; a client that disconnects
   while queued leaves the queue at once.
Both are returned when the request ends, however it ends. Predict requests only meet step 1 (and
the predict work bound, service.rest.requests). Before a 503 the unread body is drained (read and
dropped), so the client, which writes its whole body first, gets the 503 instead of a reset
connection; a client that sent `Expect: 100-continue` gets the 503 at once instead.
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

from service.admission_limits import JSON_CHARGE, ByteBudget, EvaluationGate, Overloaded, charge_factor
from service.rest.auth import holds_valid_key
from service.rest.errors import error_response

# The routes that take a body, by path (matched here, before the router runs): their template,
# to label a 503 in the metrics as the router would, and whether they go through the gate.
BODY_ROUTES = [(re.compile(r"^/v1/models/(?P<name>[^/]+)/evaluate/?$"), "/v1/models/{name}/evaluate", True),
               (re.compile(r"^/v1/models/(?P<name>[^/]+)/predict/?$"), "/v1/models/{name}/predict", False),
               # compare runs the model over two whole batches: as heavy as evaluate, so gated like it
               (re.compile(r"^/v1/models/(?P<name>[^/]+)/compare/?$"), "/v1/models/{name}/compare", True),
               # fitting a calibration profile: a model pass over the batch plus k-fold fits
               (re.compile(r"^/v1/models/(?P<name>[^/]+)/calibrations/?$"), "/v1/models/{name}/calibrations", True),
               (re.compile(r"^/v1/calibrations/?$"), "/v1/calibrations", True),
               (re.compile(r"^/v1/feedback/?$"), "/v1/feedback", False)]
# /v2 infer parses its body as JSON whatever the Content-Type (tritonclient sends none): charged as JSON.
V2_INFER = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?$")


class AdmissionMiddleware:
    """Holds the app's EvaluationGate and ByteBudget (also at `app.state.admission`)."""

    def __init__(self, app, fastapi_app) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        settings = fastapi_app.state.settings
        self.gate = EvaluationGate(settings.max_concurrent_evaluations, settings.evaluation_queue,
                                   settings.evaluation_queue_timeout_s)
        self.budget = ByteBudget(settings.max_buffered_bytes, settings.buffer_wait_s)
        fastapi_app.state.admission = self
        metrics = getattr(fastapi_app.state, "metrics", None)
        if metrics is not None and hasattr(metrics, "watch_admission"):
            metrics.watch_admission(self.gate, self.budget)

    @staticmethod
    def _gated(scope) -> bool:
        """Whether the request goes through the evaluation gate. Sets the scope's route and path
        parameters for a body route (the router overwrites both), so metrics label a 503 by endpoint."""
        if scope.get("method") != "POST":
            return False
        for pattern, template, gated in BODY_ROUTES:
            match = pattern.match(scope.get("path", ""))
            if match:
                scope["route"] = SimpleNamespace(path=template)
                scope["path_params"] = match.groupdict()
                return gated
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not holds_valid_key(getattr(self.fastapi_app.state, "api_keys", None), headers):
            return await self.app(scope, receive, send)  # the router answers 401: no slot, no bytes
        gated = self._gated(scope)
        factor = charge_factor(headers.get(b"content-type", b"").decode("latin-1"))
        if V2_INFER.match(scope.get("path", "")):
            factor = JSON_CHARGE
        reservation = self.budget.reservation()
        scope["calib.reservation"] = reservation  # the routes charge inflated uploads to it
        token = None
        started = False
        body_done = False
        loop = asyncio.get_running_loop()
        admitted_at = loop.time()

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def app_receive():
            """Charges each chunk as it arrives (never the declared length: a slow client holds only
            what it sent); a gated request takes its evaluation slot once the whole body is in."""
            nonlocal body_done, token, admitted_at
            if body_done:
                return await receive()
            message = await receive()
            if message["type"] != "http.request":
                body_done = True
                return message
            body_done = not message.get("more_body", False)  # before reserving: a 503 drains only the rest
            await reservation.reserve_waiting(len(message.get("body", b"")) * factor)
            if body_done:
                if gated:
                    token, disconnect = await self._wait_for_slot(receive)
                    if token is None:
                        return disconnect  # the client went away while queued
                    admitted_at = loop.time()
            return message

        try:
            await self.app(scope, app_receive, tracking_send)
        except Overloaded as exc:
            if started:
                raise
            await self._reject(exc, scope, receive, send, drain=not body_done)
        finally:
            reservation.close()
            if token is not None:
                self.gate.release(token, loop.time() - admitted_at)

    async def _wait_for_slot(self, receive):
        """(token, None) once admitted; (None, the disconnect message) if the client went away
        meanwhile (the body is read, so `receive` only ever answers a disconnect)."""
        acquire = asyncio.ensure_future(self.gate.acquire())
        watch = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({acquire, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not acquire.done():
                acquire.cancel()
                await asyncio.gather(acquire, return_exceptions=True)
                return None, watch.result()
            token = await acquire  # raises Overloaded (queue full or timed out)
        except BaseException:
            if not acquire.done():
                acquire.cancel()
                await asyncio.gather(acquire, return_exceptions=True)
            elif not acquire.cancelled() and acquire.exception() is None:
                self.gate.release(acquire.result())
            raise
        finally:
            if not watch.done():
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        return token, None

    async def _reject(self, exc: Overloaded, scope, receive, send, drain: bool) -> None:
        """503 overloaded; `drain`: the body has not been read to its end."""
        response = error_response(503, "overloaded", exc.message, {"reason": exc.reason,
                                                                   "retry_after_s": exc.retry_after},
                                  scope=scope)
        response.headers["Retry-After"] = str(exc.retry_after)
        metrics = getattr(self.fastapi_app.state, "metrics", None)
        if metrics is not None and hasattr(metrics, "admission_rejections"):
            metrics.admission_rejections.labels(exc.reason).inc()
        if dict(scope.get("headers") or []).get(b"expect", b"").lower() == b"100-continue":
            response.headers["Connection"] = "close"  # the client waits for us: it never sends the body
        elif drain:
            await _drain(receive)
        await response(scope, receive, send)


async def _drain(receive) -> None:
    """Read and drop the rest of the body before answering. A client writes its whole body before
    it reads the response; answered early, its upload races uvicorn's keep-alive timer (5 s) and,
    under load, loses: a reset connection instead of the 503 (measured: 6 of 200 overload
    requests). Dropping chunks costs no memory."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _content_length(headers: dict) -> int | None:
    try:
        value = int(headers[b"content-length"])
    except (KeyError, ValueError):
        return None
    return value if value >= 0 else None
