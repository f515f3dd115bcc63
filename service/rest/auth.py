"""API-key authentication of the data plane: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

`create_app` includes every data-plane router with `protect(...)`, and only when keys are
configured: a keyless service (the default) has no security dependency at all and an OpenAPI
document without security, so the document always tells the truth about *this* server (a
generated client of a keyed server sends the key; one of an open server is not asked for one).
Health checks stay open; /metrics is protected with CALIB_METRICS_REQUIRE_KEY, and the docs
(/docs, /redoc, /openapi.json) with CALIB_DOCS_REQUIRE_KEY (open by default: the schema holds no
secret, and clients are generated from it).

A missing or wrong key is 401 `unauthorized` with `WWW-Authenticate: Bearer`; the key is never
echoed, logged or put in a metric label. Matching is in `service.api_keys.KeyRing`.

Two scopes: the keys of CALIB_API_KEYS read and use calibration profiles (and everything else);
those of CALIB_ADMIN_API_KEYS may also create and delete them, and load and unload models through
the repository API (`protect_admin` on those routes).
A valid read key on an admin route is 403 `forbidden`.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api_keys import KeyRing
from service.rest.errors import error_response
from service.schemas import ErrorResponse

API_KEY_HEADER = "X-API-Key"

api_key_header = APIKeyHeader(name=API_KEY_HEADER, scheme_name="ApiKeyHeader", auto_error=False,
                              description="an API key of the service (CALIB_API_KEYS)")
bearer = HTTPBearer(scheme_name="BearerAuth", auto_error=False,
                    description="an API key of the service (CALIB_API_KEYS), as a bearer token")

UNAUTHORIZED_RESPONSE = {401: {
    "model": ErrorResponse,
    "description": "missing or wrong API key (error code `unauthorized`)",
    "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
}}


class Unauthorized(Exception):
    """No valid key; `message` says which of the two, never the key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def require_api_key(
    request: Request,
    api_key: Optional[str] = Security(api_key_header),
    credentials: Optional[HTTPAuthorizationCredentials] = Security(bearer),
) -> None:
    """Either header may carry the key. The two Security parameters declare the schemes in
    OpenAPI; the rule itself is `presented_keys`, which the admission middleware shares."""
    keys: KeyRing = request.app.state.api_keys
    presented = presented_keys(dict(request.scope["headers"]))
    if not presented:
        raise Unauthorized(f"missing API key: send 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'")
    if not any([keys.matches(k) for k in presented]):  # a list, not a generator: check every one
        raise Unauthorized("invalid API key")


class Forbidden(Exception):
    """A valid key without the scope the route needs."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


FORBIDDEN_RESPONSE = {403: {"model": ErrorResponse,
                            "description": "`forbidden`: the API key may read and use calibration profiles "
                                           "but not create or delete them (CALIB_ADMIN_API_KEYS)"}}


async def require_admin_key(request: Request) -> None:
    """After `require_api_key`: the key must also be an admin key."""
    admin: KeyRing = request.app.state.admin_keys
    if not any([admin.matches(k) for k in presented_keys(dict(request.scope["headers"]))]):
        raise Forbidden("this API key is not an admin key: it may read and use calibration profiles, not create "
                        "or delete them, nor load or unload models (/v2/repository); an admin key of "
                        "CALIB_ADMIN_API_KEYS may")


def protect_admin(keys: KeyRing) -> dict:
    """`include_router(...)` keyword arguments for a router of admin routes: a valid key (401
    otherwise) that is an admin key (403 otherwise); none when the service has no key at all."""
    if not keys:
        return {}
    return {"dependencies": [Security(require_api_key), Security(require_admin_key)],
            "responses": {**UNAUTHORIZED_RESPONSE, **FORBIDDEN_RESPONSE}}


async def _forbidden(request: Request, exc: Forbidden) -> JSONResponse:
    return error_response(403, "forbidden", exc.message, request=request)


async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
    response = error_response(401, "unauthorized", exc.message, request=request)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def presented_keys(headers: dict[bytes, bytes]) -> list[bytes]:
    """The keys a request offers, from raw ASGI headers: `X-API-Key`, and a `Bearer` token
    (the scheme word in any case)."""
    presented = [headers.get(API_KEY_HEADER.lower().encode(), b"").strip()]
    scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer":
        presented.append(token.strip())
    return [k for k in presented if k]


def holds_valid_key(keys: KeyRing | None, headers: dict[bytes, bytes]) -> bool:
    """For middleware that runs before the router (admission control): True when no keys are
    configured or a presented key is one of them."""
    if not keys:
        return True
    return any([keys.matches(k) for k in presented_keys(headers)])  # a list: check every one


def protect(keys: KeyRing) -> dict:
    """`include_router(...)` keyword arguments that put a router behind the keys (none if no key)."""
    if not keys:
        return {}
    return {"dependencies": [Security(require_api_key)], "responses": UNAUTHORIZED_RESPONSE}


def install(app: FastAPI, keys: KeyRing, admin_keys: KeyRing | None = None) -> None:
    """`keys`: every key the service accepts (read and admin); `admin_keys`: those that may also
    create and delete calibration profiles."""
    app.state.api_keys = keys
    app.state.admin_keys = admin_keys if admin_keys is not None else KeyRing(())
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(Forbidden, _forbidden)


DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def protect_docs(app: FastAPI, keys: KeyRing) -> None:
    """CALIB_DOCS_REQUIRE_KEY: the docs and the schema answer 401 without a valid key. A pure-ASGI
    check in front of FastAPI's own doc routes (which take no dependencies)."""

    class DocsKeyMiddleware:
        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if (scope["type"] == "http" and scope.get("path") in DOCS_PATHS
                    and not holds_valid_key(keys, dict(scope.get("headers") or []))):
                response = error_response(401, "unauthorized", "the API docs need an API key "
                                          "(CALIB_DOCS_REQUIRE_KEY)", scope=scope)
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
            return await self.inner(scope, receive, send)

    app.add_middleware(DocsKeyMiddleware)
