"""One JSON error envelope for everything: {"error": {"code", "message", "status", "request_id"}};
under /v2 the Open Inference Protocol's own {"error": "<message>"} instead (422 there is 400).

Bad input raises `InputError` anywhere below; the handlers here turn it (and FastAPI's own
validation / routing errors) into 4xx bodies. Only a bug gets `internal_error` (500).
`ERROR_RESPONSES` is the one place the error statuses are documented for OpenAPI: routers pick
theirs with `error_responses(...)`, so a new status is one entry here and one name in a router.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.inputs import InputError
from service.http_metrics import endpoint_label
from service.registry import UnknownModelError, UnknownVersionError
from service.rest.request_id import current_request_id
from service.schemas import ErrorResponse

logger = logging.getLogger("service.errors")

CLIENT_CLOSED_REQUEST = 499  # the status a disconnected client's request is counted and logged with

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large",
              415: "unsupported_media_type", 503: "not_ready"}


def _documented(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int, dict] = {
    400: _documented("`malformed_json` / `malformed_multipart`: the body cannot be parsed"),
    408: _documented("`request_timeout`: the body did not arrive within CALIB_BODY_READ_TIMEOUT_S"),
    404: _documented("`unknown_model`: no loaded model has this name (`details.available` lists them)"),
    413: _documented("`payload_too_large`: the body, or an array it inflates to, is over CALIB_MAX_BODY_BYTES"),
    415: _documented("`unsupported_media_type`: the body is neither application/json nor multipart/form-data"),
    422: _documented("the input or a query parameter is invalid; `code` names the problem "
                     "(`invalid_shape`, `invalid_parameter`, `too_many_instances`, ...)"),
    503: _documented("`not_ready`: no model is loaded (the service is starting, or every artifact failed "
                    "to load: see /health/ready); or `overloaded` (predict, evaluate, compare): too many evaluations "
                    "running and queued, or the buffered-bytes budget is spent; retry after `Retry-After` "
                    "seconds (`details.reason`: queue_full, queue_timeout or byte_budget); or `shutting_down` "
                    "(evaluate, compare): the server stopped and the request outlived its graceful timeout"),
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """The OpenAPI `responses` entries of these error statuses, all with the ErrorResponse body."""
    return {status: ERROR_RESPONSES[status] for status in statuses}


class Unavailable(Exception):
    """The service cannot take the request now (503); `code` says why, e.g. `not_ready`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   request: Request | None = None, scope=None) -> JSONResponse:
    body = {"code": code, "message": message, "status": status}
    if details:
        body["details"] = details
    request_id = current_request_id.get()
    if request_id is not None:
        body["request_id"] = request_id
    scope = scope if scope is not None else (request.scope if request is not None else None)
    content = {"error": body}
    if is_v2_path(scope):  # the Open Inference Protocol's envelope (service.rest.v2), 400 for bad input
        status = 400 if status == 422 else status
        content = {"error": message}
    app = scope.get("app") if scope is not None else None
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.errors.labels(endpoint_label(scope), str(status), code).inc()
    return JSONResponse(content, status_code=status)


def is_v2_path(scope) -> bool:
    path = scope.get("path", "") if scope is not None else ""
    return path == "/v2" or path.startswith("/v2/")


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, request=request)


def shown(text: str, limit: int = 64) -> str:
    """A client-chosen string as an error message may echo it: repr'd and at most `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


async def _unknown_model(request: Request, exc: UnknownModelError) -> JSONResponse:
    return error_response(404, "unknown_model", f"no model named {shown(exc.name)}; loaded: {exc.available}",
                          {"available": exc.available}, request=request)


async def _unknown_version(request: Request, exc: UnknownVersionError) -> JSONResponse:
    return error_response(404, "unknown_version", f"model {shown(exc.name)} has no version {shown(exc.version)}; "
                                                  f"its versions: {exc.available}",
                          {"available": exc.available}, request=request)


async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
    return error_response(503, exc.code, exc.message, request=request)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request", request=request)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    response = error_response(exc.status_code, code, str(exc.detail), request=request)
    for name, value in (exc.headers or {}).items():  # e.g. the Allow header of a 405 (RFC 9110)
        response.headers[name] = value
    if exc.status_code == 405:
        response.headers["Allow"] = allowed_methods(request) or response.headers.get("Allow", "")
    return response


def allowed_methods(request: Request) -> str:
    """Every method the API documents at this path. Starlette's own `Allow` names only the first
    route whose path matches, but a path often has one route per method (GET and POST of
    /v1/calibrations, GET and DELETE of one profile): RFC 9110 wants all of them. Read from the
    OpenAPI document (built once), so `Allow` and the document cannot disagree."""
    table = getattr(request.app.state, "allowed_methods", None)
    if table is None:
        table = [(re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path)) + "/?$"),
                  {m.upper() for m in ops if m in ("get", "put", "post", "delete", "patch", "head", "options")})
                 for path, ops in request.app.openapi().get("paths", {}).items()]
        request.app.state.allowed_methods = table
    methods = set().union(*[m for regex, m in table if regex.match(request.url.path)])
    return ", ".join(sorted(methods))


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away before its answer (mid-upload, or while its work ran): one info line,
    no traceback, counted as 499 (nginx's "client closed request"); nobody reads the answer."""
    logger.info("client disconnected before the answer: %s %s (request_id=%s)", request.method,
                request.scope.get("route").path if request.scope.get("route") else "unmatched",
                current_request_id.get())
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s (request_id=%s)", request.method, request.url.path,
                     current_request_id.get(), exc_info=exc)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log",
                          request=request)


def install(app: FastAPI) -> None:
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(UnknownModelError, _unknown_model)
    app.add_exception_handler(UnknownVersionError, _unknown_version)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _internal)
