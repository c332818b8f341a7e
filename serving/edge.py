"""The HTTP threshold every app shares (`visionserve serve`, the hub, the studio's keyed routes): one body reader,
one way errors become answers, one request id (the one key check is serving.access's `KEYED`). Nothing here
needs Ray: the pyfunc's errors derive from `EdgeError` too.

- `read_body`: a body read up to a cap, refused (413) from its declared length or while streaming, before it is
  buffered whole.
- `install(app, ...)`: the one exception handler per app (`EdgeError`s in the app's format, a path no route
  answers, anything unexpected as a 500 without a traceback), and the request id: the client's `x-request-id`
  when it is a plain token, else a new one sent back as `x-visionserve-request-id`; one log line per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


log = logging.getLogger("ray.serve")
REQUEST_ID = "x-visionserve-request-id"
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class EdgeError(Exception):
    """An answer other than 2xx: `status`, a machine-readable `code`, a message, headers. Subclasses word the
    body as their API does (serving.contract.RequestError, serving.hub.api.ApiError)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message}
        return {"error": {**error, "request_id": request_id} if request_id else error}

    def response(self, request_id: str | None = None) -> JSONResponse:
        return JSONResponse(self.body(request_id), self.status, headers=self.headers)


async def read_body(request: Request, limit: int, too_large: Callable[[], EdgeError]) -> bytes:
    """The body, read up to `limit` bytes: a declared length over it is refused before reading, a chunked body
    as soon as it passes it (`too_large()` is raised either way)."""
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def request_id_of(header: str | None) -> str:
    """The client's x-request-id when it is a plain token of at most 128 characters, else a new one: what is
    echoed and logged is never arbitrary text."""
    return header if header and _PLAIN_ID.match(header) else uuid.uuid4().hex


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def install(app: FastAPI, internal: Callable[[], EdgeError], no_route: Callable[[int, str], EdgeError]) -> None:
    """The app's one exception handler and its request ids (see the module docstring). `internal()`: the app's
    500; `no_route(status, message)`: its answer to a path or method no route takes, or a malformed path value."""

    @app.exception_handler(EdgeError)
    async def _edge(request: Request, exc: EdgeError) -> JSONResponse:
        return exc.response(request_id(request))

    @app.exception_handler(HTTPException)
    async def _no_route(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path[:200]}: {exc.detail}"
        return no_route(exc.status_code, message).response(request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _bad_path(request: Request, exc: RequestValidationError) -> JSONResponse:
        return no_route(400, f"{request.url.path[:200]}: a path or query value is malformed").response(
            request_id(request))

    app.add_middleware(_Threshold, internal=internal)


class _Threshold:
    """Plain ASGI (no per-request task or body copy): request ids, one log line, and anything a route raised that
    no handler took answered as the app's 500, its traceback in the log only."""

    def __init__(self, app: Any, internal: Callable[[], EdgeError]):
        self.app, self.internal = app, internal

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        rid = request_id_of(given)
        scope.setdefault("state", {})["request_id"] = rid
        extra = [] if rid == given else [(REQUEST_ID.encode(), rid.encode())]
        started, sent = time.perf_counter(), {"status": 0}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001  (our own bug: logged with its traceback, answered without one)
            log.exception("request_id=%s %s %s failed", rid, scope.get("method"), scope.get("path"))
            if not sent["status"]:
                await self.internal().response(rid)(scope, receive, send_with_id)
        finally:
            log.info("request_id=%s %s %s status=%s ms=%.1f", rid, scope.get("method"), scope.get("path"),
                     sent["status"], (time.perf_counter() - started) * 1000)
