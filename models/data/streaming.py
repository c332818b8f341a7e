"""`advanced_settings.stream_image_files`: images read lazily from their source through fsspec, with a
bounded on-disk cache, instead of being copied to local disk first.

With an `image_root` that is an fsspec URL (`s3://bucket/data`, `gs://…`, `abfs://…`, `https://…`,
`memory://…`), the cloud `image_url`s of the data (azureml://…/paths/x.jpg, https://<account>.blob…,
s3://…) resolve under that URL. Each image is a `StreamedImage`: an `os.PathLike` whose path is fetched
into the cache the first time something opens it (validation, then each epoch's reads), so the
data code that opens local files needs no change. The cache keeps the most recently used images up
to `VISIONSERVE_IMAGE_CACHE_MB` (default 2048) MiB in `VISIONSERVE_IMAGE_CACHE` (default
~/.cache/visionserve/images).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

PLACEHOLDER = Path("/__visionserve_streamed__")  # the image_root given to the reader, replaced by the URL


def is_remote(root: str | os.PathLike | None) -> bool:
    """Whether `image_root` is an fsspec URL other than a local file path."""
    text = str(root) if root is not None else ""
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class ImageCache:
    """A bounded on-disk LRU cache of fetched files (safe across processes: atomic writes)."""

    folder: str
    max_bytes: int

    @classmethod
    def default(cls) -> ImageCache:
        folder = os.environ.get("VISIONSERVE_IMAGE_CACHE", str(Path.home() / ".cache" / "visionserve" / "images"))
        return cls(folder, int(float(os.environ.get("VISIONSERVE_IMAGE_CACHE_MB", "2048")) * 2**20))

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:32]
        return Path(self.folder) / (digest + PurePosixPath(url.split("?")[0]).suffix.lower())

    def fetch(self, url: str) -> Path:
        """The local copy of `url`, read through fsspec on a miss; older entries are evicted past max_bytes."""
        path = self.path_for(url)
        if path.is_file():
            os.utime(path)  # recently used
            return path
        import fsspec

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with fsspec.open(url, "rb") as source:
                data = source.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {url}") from None
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used files until the cache holds at most max_bytes."""
        entries = []
        for entry in os.scandir(self.folder):
            if entry.is_file() and not entry.name.endswith(".part"):
                stat = entry.stat()
                entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= self.max_bytes:
                break
            if keep is not None and name == str(keep):
                continue
            try:
                os.remove(name)
            except FileNotFoundError:
                pass
            total -= size


class StreamedImage(os.PathLike):
    """An image at a URL that becomes a local path (through the cache) only when opened."""

    def __init__(self, url: str, cache: ImageCache):
        self.url, self.cache = url, cache

    def __fspath__(self) -> str:
        return str(self.cache.fetch(self.url))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StreamedImage({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StreamedImage) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


def stream_records(records: list, root: str, cache: ImageCache | None = None) -> list:
    """Records read with image_root=PLACEHOLDER → their images streamed from under the `root` URL."""
    cache = cache or ImageCache.default()
    prefix = str(PLACEHOLDER) + "/"
    base = str(root).rstrip("/")
    out = []
    for record in records:
        image = str(record.image)
        if image.startswith(prefix):
            record = replace(record, image=StreamedImage(f"{base}/{image[len(prefix):]}", cache))
        out.append(record)
    return out
