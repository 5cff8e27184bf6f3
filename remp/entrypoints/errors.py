"""One error path for the HTTP server: every error leaves as OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`) with the right status; a bug is a 500 that carries a
request id and no traceback (the traceback goes to the server log). Also the request-body size limit."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from remp.entrypoints.fields import refusal
from remp.logger import init_logger

logger = init_logger(__name__)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or ERROR_TYPES.get(status, "BadRequestError")


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": type_ or ERROR_TYPES.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param), status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg')}")
        msg = "; ".join(_message(err) for err in errs)
        return error_response(400, msg, param=_loc(first) or None)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        # FastAPI's own: unknown route or method, and bodies it cannot parse (invalid UTF-8, JSON nested too deep)
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 400 and "parsing the body" in detail:
            detail = "the body is not valid JSON (invalid UTF-8, or nested too deeply)"
        return error_response(e.status_code, detail)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex
        logger.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=e)
        return error_response(500, f"internal error (request id {request_id}); the server log has the details")


def _loc(err: dict) -> str:
    return ".".join(str(x) for x in err.get("loc", ())[1:])


def _message(err: dict) -> str:
    """One validation error, naming its field; a field the request model does not declare is refused by name."""
    if err.get("type") == "extra_forbidden":
        where = _loc(err).rpartition(".")[0]
        return refusal(str(err["loc"][-1])) + (f" (in {where})" if where else "")
    return f"{_loc(err) or 'body'}: {err.get('msg')}"


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTPExceptions through to the handler above."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes (--max-request-bytes)")


DRAIN_BYTES, DRAIN_S = 64 * 2**20, 10.0  # a refused body is read (and dropped) up to this much, this long


class BodySizeLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 without being parsed (by its Content-Length) or as
    soon as the bytes received pass the limit (chunked uploads). The 413 goes out at once; then, as nginx does,
    the rest of the body is read and dropped (up to DRAIN_BYTES / DRAIN_S) before the response ends: a client
    that sends its whole body before it reads (urllib, httpx) gets the 413, not a connection reset."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(receive, send)
        received, started = 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(receive, send)

    async def _refuse(self, receive: Callable, send: Callable) -> None:
        response = error_response(413, BodyTooLarge(self.limit).detail)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        try:
            await asyncio.wait_for(_drain(receive), DRAIN_S)
        except TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Callable) -> None:
    """Read and drop the request body until it ends, the client goes, or DRAIN_BYTES are read."""
    read = 0
    while read <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        read += len(message.get("body", b""))
