"""Who may reach what, decided before routing: a draining server refuses new /v1 and /admin requests, /v1 needs
the API key when one is set, /admin needs the admin token (and is off without one). Tokens are compared in
constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse

from remp.entrypoints.errors import error_response


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def refusal(
    path: str, authorization: str, *, draining: bool, api_key: str | None, admin_token: str | None
) -> JSONResponse | None:
    """The error answer to a request for `path` with this Authorization header, or None to let it through."""
    if draining and path.startswith(("/v1", "/admin")):
        return error_response(503, "the server is shutting down")
    token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
    if path.startswith("/v1") and api_key and not _same(token, api_key):
        return error_response(401, "invalid or missing API key")
    if path.startswith("/admin"):
        if not admin_token:
            return error_response(404, "the admin API is off: start the server with --admin-token")
        if token is None:
            return error_response(401, "admin API needs 'Authorization: Bearer <admin token>'")
        if not _same(token, admin_token):
            return error_response(403, "wrong admin token")
    return None


class Gate:
    """ASGI middleware: `check(path, authorization header)` may answer a request before it is routed. (Plain
    ASGI, not BaseHTTPMiddleware: that one runs the app in a task group, which turns an HTTPException raised
    while the body is read into an ExceptionGroup, and it gets in the way of streaming.)"""

    def __init__(self, app: Callable[..., Awaitable[None]], check: Callable[[str, str], JSONResponse | None]):
        self.app, self.check = app, check

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            refused = self.check(scope["path"], auth)
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)
