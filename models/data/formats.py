"""The one list of image formats and image limits (data.md), in a module light enough for any process
(the locust load generator, Ray Data's read tasks, the CLI) to import."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Every extension a folder of images is scanned for (batch scoring, load tests, VOC images): what the
# spec lists for training (JPEG, PNG, GIF, BMP, WEBP, ICO, TIFF, MPO) with their usual spellings.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".ico",
                                     ".tif", ".tiff", ".mpo")

MB = 2**20
MIN_SIDE = 50
MAX_SIDE = 16_000
MAX_TRAINING_SIDE = 10_240
MAX_TRAINING_BYTES = 20 * MB
MAX_PREDICTION_BYTES = 6 * MB  # one image of a synchronous request
MAX_BATCH_BYTES = 20 * MB  # one image of batch scoring


def is_image_file(path: Path) -> bool:
    """A regular file with one of the image extensions (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted by their path relative to it."""
    return sorted((p for p in folder.rglob("*") if is_image_file(p)), key=lambda p: p.relative_to(folder).as_posix())


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be: sides in pixels, encoded size in bytes (None: no byte limit)."""

    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE
    max_bytes: int | None = None


PREDICTION_LIMITS = ImageLimits(max_bytes=MAX_PREDICTION_BYTES)
BATCH_LIMITS = ImageLimits(max_bytes=MAX_BATCH_BYTES)
TRAINING_LIMITS = ImageLimits(max_side=MAX_TRAINING_SIDE, max_bytes=MAX_TRAINING_BYTES)
