"""Who may call: the API key (stored as its SHA-256), each app's `Access` and `KEYED`, the one auth dependency
of every keyed route (each app's ingress names its `Access`: the key's SHA-256, the headers that may carry it, and
the app's words for a refusal)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request

from models.errors import SettingsError
from serving.edge import EdgeError

__all__ = ["KEYED", "Access", "key_digest", "key_matches", "read_key_file"]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode("utf-8")).hexdigest()


def read_key_file(path: str | Path, flag: str = "--api-key-file") -> str:
    """The SHA-256 of the API key in `path`; a SettingsError naming the file when it is missing or empty
    (an empty key would be the hash of the empty string: anyone could send it)."""
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise SettingsError([f"{flag} {path}: {exc.strerror or exc}"], "API key") from None
    if not key:
        raise SettingsError([f"{flag} {path}: the file is empty"], "API key")
    return key_digest(key)


def key_matches(token: str | None, digest: str) -> bool:
    """Whether the token the client sent hashes to `digest`, compared in constant time."""
    return bool(token) and hmac.compare_digest(key_digest(token), digest)


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


async def _authorized(request: Request) -> None:
    """The ingress replica's `access` decides (Ray Serve runs one instance of the ingress class per replica).
    A coroutine: FastAPI would run a plain function in its thread pool, two thread hops per request for a hash."""
    from ray import serve

    serve.get_replica_context().servable_object.access.check(request)


KEYED = [Depends(_authorized)]
