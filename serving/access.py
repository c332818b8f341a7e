"""Who may call and how a call is named: the API key (stored as its SHA-256) and the request id."""

import hashlib
import hmac
import re
import uuid
from pathlib import Path

from models.errors import SettingsError

__all__ = ["key_digest", "key_matches", "read_key_file", "request_id_of"]


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


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(header: str | None) -> str:
    """The client's x-request-id when it is a plain token of at most 128 characters, else a new one: what is
    echoed and logged is never arbitrary text."""
    return header if header and _REQUEST_ID.match(header) else uuid.uuid4().hex


def key_matches(token: str | None, digest: str) -> bool:
    """Whether the token the client sent hashes to `digest`, compared in constant time."""
    return bool(token) and hmac.compare_digest(key_digest(token), digest)
