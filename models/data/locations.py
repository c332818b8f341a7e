"""Where a file that a URL or path names lies on this machine, and the one confinement rule.

An `image_url`, a COCO file's URI or an image's `coco_url` is a local path (relative to a base folder, or
absolute), a `file://` URL, or a cloud URL (`azureml://…/paths/<p>`, `AmlDatastore://<p>`, blob, S3, GCS,
ADLS URLs), whose path maps under the image root (else the base folder): an Azure blob URL at
`<root>/<container>/<path>` or `<root>/<path>`, any other at `<root>/<path>`. A URL's query (a SAS token) and
fragment are never part of the path. A URL of any other scheme is refused: read as a relative path, it would
be flattened into one that the root check lets through.

Confinement is one rule, `inside`: the file, links followed, lies under the root, links followed. A cloud
URL is always confined (to the image root, else the base folder); every file the hub reads is confined to its
`--image-root` (`confined=True`). Every reader of such files (training and scoring data, COCO registration,
evaluation, the hub's browse and analyze routes, batch scoring's `--image-root`) maps and confines through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

CLOUD_SCHEMES = frozenset({"azureml", "amldatastore", "http", "https", "wasb", "wasbs", "abfs", "abfss", "s3", "gs",
                           "gcs", "adl"})
_BLOB_HOST = ".blob.core.windows.net"
_MARKER = "/paths/"


class Refused(ValueError):
    """A URL or path that maps nowhere this machine may read: outside the root, of an unknown scheme, broken."""


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ("" for a path, one letter for a Windows drive); Refused for a broken URL."""
    try:
        return urlsplit(url.strip()).scheme.lower()
    except ValueError:  # e.g. a broken IPv6 host
        raise Refused(f"{shown(url)} is not a valid URL") from None


def is_cloud(url: str) -> bool:
    """Whether `url` is a URL (of any scheme but file://) rather than a local path."""
    try:
        scheme = scheme_of(url)
    except Refused:
        return True
    return len(scheme) > 1 and scheme != "file"


def shown(url: str, limit: int = 200) -> str:
    """`url` as messages show it: as given, less the query and fragment of a URL (a SAS token), clipped."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError:  # e.g. a broken IPv6 host
        scheme = "broken"
    local = len(scheme) <= 1 or scheme.lower() == "file"
    text = url if local else url.split("?", 1)[0].split("#", 1)[0]  # as typed: the scheme's case kept
    return text if len(text) <= limit else text[:limit - 1] + "…"


def inside(root: str | Path, path: str | Path) -> bool:
    """`path`, links followed, lies under `root`, links followed."""
    real_root = os.path.realpath(root)
    try:
        return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root
    except ValueError:  # a NUL byte, or paths on different drives
        return False


def _cloud_paths(url: str, scheme: str) -> list[str]:
    """The path(s) under the root a cloud URL names, likeliest first (a blob URL's container may or may not be
    a folder under the root)."""
    parts = urlsplit(url)
    if scheme == "azureml":
        return [unquote(url.split(_MARKER, 1)[1].split("?", 1)[0]) if _MARKER in url else unquote(parts.path.lstrip("/"))]
    if scheme == "amldatastore":
        return [unquote((parts.netloc + parts.path).lstrip("/"))]
    path = unquote(parts.path.lstrip("/"))
    if scheme in ("http", "https") and _BLOB_HOST in parts.netloc.lower():
        container, _, rest = path.partition("/")
        if rest and container not in (".", ".."):
            return [rest, path]  # the container dropped first, as data.md's examples map them
        return [rest or path]
    return [path]


def candidates(url: str, base: Path, root: Path | None, *, quiet: bool = False) -> list[str]:
    """The local paths `url` may name, likeliest first (see the module docstring); Refused for an unknown scheme,
    an empty URL, or a cloud URL whose path leaves the root (lexically: before any file is looked at). `quiet`:
    messages name the URL only, never a path of this machine (a server answering its API users)."""
    url = url.strip()
    if not url or "\x00" in url:
        raise Refused("an empty URL" if not url else f"{shown(url)!r} contains a NUL character")
    scheme = scheme_of(url)
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):  # file://./images/a.jpg: relative, not /images/a.jpg
            relative = Path(unquote(url[len("file://"):]))
            return [str(relative if relative.is_absolute() else base / relative)]
        return [unquote(parts.path)]
    if scheme in CLOUD_SCHEMES:
        top = root if root is not None else base
        mapped = [os.path.join(top, p) for p in _cloud_paths(url, scheme)]
        lexical = os.path.abspath(top)
        for m in mapped:
            if os.path.commonpath([lexical, os.path.abspath(m)]) != lexical:
                where = "" if quiet else f" to {os.path.abspath(m)},"
                raise Refused(f"{shown(url)} maps{where} outside {_root_words(root, base, quiet)}; refused")
        return mapped
    if len(scheme) == 1:  # a Windows drive letter, e.g. C:/data
        return [url]
    if scheme:
        raise Refused(f"{shown(url)}: unknown URL scheme {scheme!r}; use a path, a file:// URL or a cloud URL "
                      f"({', '.join(sorted(CLOUD_SCHEMES))})")
    path = Path(url)
    return [str(path if path.is_absolute() else base / path)]


def _root_words(root: Path | None, base: Path, quiet: bool = False) -> str:
    if quiet:
        return "the image root"
    return f"the image root {root}" if root is not None else f"{base}, the folder of the file naming it (no image root given)"


def locate(url: str, base: Path, root: Path | None, *, confined: bool = False) -> str:
    """The local path `url` names (the first candidate that exists, else the likeliest), confined (real paths)
    to the image root (else `base`) when it is a cloud URL or `confined` is set; Refused otherwise.
    `confined` (a server reading files its API users name): nothing is read without a root, and messages show
    no path of this machine."""
    options = candidates(url, base, root, quiet=confined)
    path = options[0] if len(options) == 1 else next((c for c in options if os.path.lexists(c)), options[0])
    if confined and root is None:
        raise Refused(f"{shown(url)}: a local file, and no image root is set; refused")
    if confined or is_cloud(url):
        top = root if root is not None else base
        if not inside(top, path):
            raise Refused(f"{shown(url)} lies outside {_root_words(root, base, confined)}; refused")
    return path
