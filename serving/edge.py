"""The HTTP threshold every app shares (`visionserve serve`, the hub, the studio's keyed routes): one body reader,
one key check, one way errors become answers, one request id.

- `read_body`: a body read up to a cap, refused (413) from its declared length or while streaming, before it is
  buffered whole.
- `KEYED`: the one auth dependency of every keyed route; each app's ingress names its `Access` (the key's SHA-256,
  the headers that may carry it, and the app's words for a refusal).
- `install(app, ...)`: the one exception handler per app (`EdgeError`s in the app's format, a path no route
  answers, anything unexpected as a 500 without a traceback), and the request id: the client's `x-request-id`
  when it is a plain token, else a new one sent back as `x-visionserve-request-id`; one log line per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serving.access import key_matches, request_id_of

log = logging.getLogger("ray.serve")
REQUEST_ID = "x-visionserve-request-id"


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


@dataclass(frozen=True)
class Access:
    """Who may call an app's keyed routes: anyone when `digest` is None, else who sends the key that hashes to it
    as `Authorization: Bearer <key>` or in one of `headers`; `refusal()` is the app's 401."""

    digest: str | None
    refusal: Callable[[], EdgeError]
    headers: tuple[str, ...] = ()

    def check(self, request: Request) -> None:
        if self.digest is None:
            return
        header = request.headers.get("authorization", "")
        token = next((request.headers[h] for h in self.headers if request.headers.get(h)), None) or (
            header[7:].strip() if header[:7].lower() == "bearer " else "")
        if not key_matches(token, self.digest):
            raise self.refusal()


def _authorized(request: Request) -> None:
    """The ingress replica's `access` decides (Ray Serve runs one instance of the ingress class per replica)."""
    from ray import serve

    serve.get_replica_context().servable_object.access.check(request)


KEYED = [Depends(_authorized)]


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
