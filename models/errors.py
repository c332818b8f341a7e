"""The errors users see, and the one list of machine-readable error codes.

Light on purpose (standard library only): the CLI imports it to tell a user's mistake (exit 2, a
message) from a bug, before any heavy module is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    """`error.code` of every refusal: per image (an error row) or per request (an HTTP error body)."""

    # one image
    NOT_AN_IMAGE = "not_an_image"  # no decoder recognises the bytes
    MISSING = "missing"  # a file that is not there
    UNREADABLE = "unreadable"  # corrupt, truncated, or a file that cannot be read
    TOO_SMALL = "too_small"  # under the minimum side
    TOO_LARGE = "too_large"  # over the bytes, side or pixel limit (decompression bombs too)
    INVALID_INPUT = "invalid_input"  # an entry that is not a base64 string nor a JSON entry
    INVALID_BASE64 = "invalid_base64"
    INVALID_XAI_PARAMETERS = "invalid_xai_parameters"
    EXPLANATIONS_UNSUPPORTED = "explanations_unsupported"  # explanations asked of a detector
    INFERENCE_FAILED = "inference_failed"  # the model failed on this image (logged)
    # one request
    INVALID_REQUEST = "invalid_request"  # the body's shape: a field missing or of the wrong type
    MALFORMED_JSON = "malformed_json"
    REQUEST_TOO_LARGE = "request_too_large"
    TOO_MANY_IMAGES = "too_many_images"
    INVALID_PARAMETER = "invalid_parameter"  # a per-request setting or xai parameter
    INVALID_IMAGE = "invalid_image"  # some images cannot be scored (without ?partial=true)
    TOO_MANY_EXPLANATIONS = "too_many_explanations"
    EXPLANATION_TIMEOUT = "explanation_timeout"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"  # a file the studio does not have
    INTERNAL_ERROR = "internal_error"


class SettingsError(ValueError):
    """One or more settings were rejected; `problems` lists each one."""

    def __init__(self, problems: Sequence[str], source: str = "settings"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source}:\n{lines}")


class ImageError(ValueError):
    """An image that cannot be used; `code` says why in one word (an `ErrorCode`)."""

    def __init__(self, code: ErrorCode | str, message: str):
        self.code = ErrorCode(code)
        super().__init__(message)


@dataclass(frozen=True)
class Problem:
    """One problem in a data file: where (file, line, field) and what."""

    source: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DataError(ValueError):
    """The data cannot be used; `problems` lists every reason."""

    def __init__(self, problems: Sequence[Problem | str], what: str = "data", shown: int = 50):
        self.problems = [str(p) for p in problems]
        head = "\n".join(f"  - {p}" for p in self.problems[:shown])
        more = f"\n  ... and {len(self.problems) - shown} more" if len(self.problems) > shown else ""
        super().__init__(f"{len(self.problems)} problem(s) in {what}:\n{head}{more}")


# What the CLI reports as a message with exit code 2 instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)

