"""Image decoding shared by training, validation and scoring: one way to turn bytes into RGB.

EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit
RGB; animated images give their first frame. Size limits are the cloud's (data.md), checked from
the header before any pixel is decoded; decompression bombs are refused as too large, and every
decoder failure becomes this image's `ImageError`. Scoring asks for the size the model needs, so a
16,000 x 16,000 JPEG is decoded at a reduced scale instead of in full.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from models.data.formats import MAX_SIDE, ImageLimits
from models.errors import ErrorCode, ImageError

# We check dimensions ourselves before decoding; Pillow's own bomb guard would fire first
# for legitimate 16,000 x 16,000 images.
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE + 1


Size = tuple[int, int]
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")
_ROWS = 1024  # rows converted at a time from 16-bit or float: bounded temporary memory


def _open(data: bytes | str | Path) -> Image.Image:
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except UnidentifiedImageError:
        raise ImageError(ErrorCode.NOT_AN_IMAGE, "not a readable image (JPEG, PNG, GIF, BMP, WEBP, TIFF, ...)") from None
    except Image.DecompressionBombError:
        raise ImageError(ErrorCode.TOO_LARGE, f"the image header declares over {2 * Image.MAX_IMAGE_PIXELS:,} "
                         f"pixels; at most {MAX_SIDE}x{MAX_SIDE} is allowed") from None
    except FileNotFoundError:
        raise ImageError(ErrorCode.MISSING, f"file not found: {data}") from None
    except OSError as exc:
        raise ImageError(ErrorCode.UNREADABLE, f"cannot read image: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (a header a decoder trips over: struct, index, zero-size ...)
        raise ImageError(ErrorCode.UNREADABLE, f"image header is corrupt ({type(exc).__name__}: {exc})") from None


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width < limits.min_side or height < limits.min_side:
        raise ImageError(ErrorCode.TOO_SMALL, f"image is {width}x{height} pixels; at least "
                         f"{limits.min_side}x{limits.min_side} is required")
    if width > limits.max_side or height > limits.max_side:
        raise ImageError(ErrorCode.TOO_LARGE, f"image is {width}x{height} pixels; at most {limits.max_side} per "
                         "side is allowed")


def check_bytes(size: int, limits: ImageLimits) -> None:
    if limits.max_bytes is not None and size > limits.max_bytes:
        raise ImageError(ErrorCode.TOO_LARGE, f"image file is {size / 1e6:.1f} MB; at most "
                         f"{limits.max_bytes / 2**20:.0f} MB is allowed")


def _orientation(img: Image.Image) -> int:
    try:  # PNG's getexif() reads the whole file to find an eXIf chunk after the pixels
        return img.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001
        raise ImageError(ErrorCode.UNREADABLE, f"image data is corrupt or truncated: {exc}") from None


def image_size(path: bytes | str | Path) -> Size:
    """(width, height) read from the file header, after EXIF orientation; no full decode."""
    with _open(path) as img:
        width, height = img.size
        orientation = _orientation(img)
    return (height, width) if orientation in _ROTATED else (width, height)


def to_rgb(img: Image.Image, size: Size | None = None) -> Image.Image:
    """8-bit RGB of any Pillow mode; first frame of animations; EXIF orientation applied; resized down to
    `size` (width, height) when given, at the point where that is cheapest (before the RGB expansion)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    if img.mode in _HIGH_DEPTH:
        img = _high_depth_to_gray(img)
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if size is not None and img.size != size and img.mode in ("1", "L", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "P"):
        img = (img.convert("RGB") if img.mode in ("1", "P", "CMYK", "YCbCr") else img).resize(
            size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_gray(img: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 0..255 by their type's range (not stretched), as 8-bit gray, a block
    of rows at a time in integer (or float32) arithmetic: a few MB of temporary memory whatever the size."""
    array = np.asarray(img)
    gray = np.empty(array.shape, dtype=np.uint8)
    if img.mode == "F":
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        span = (high - low) or 1.0
    for top in range(0, array.shape[0], _ROWS):
        rows = array[top:top + _ROWS]
        if img.mode == "F":
            block = np.nan_to_num((rows.astype(np.float32) - low) * np.float32(255.0 / span))
            gray[top:top + _ROWS] = np.clip(np.rint(block), 0, 255)
        else:  # x / 257 rounded: (255 x + 32767) // 65535, exact in 32 bits for x in [0, 65535]
            block = np.clip(rows, 0, 65535).astype(np.uint32)
            gray[top:top + _ROWS] = (block * 255 + 32767) // 65535
    return Image.fromarray(gray, mode="L")


def _checked_source(data: bytes | str | Path, limits: ImageLimits) -> None:
    if isinstance(data, (bytes, bytearray)):
        check_bytes(len(data), limits)
    elif limits.max_bytes is not None:
        try:
            check_bytes(Path(data).stat().st_size, limits)
        except FileNotFoundError:
            raise ImageError(ErrorCode.MISSING, f"file not found: {data}") from None


def decode(data: bytes | str | Path, limits: ImageLimits = ImageLimits(), size: Size | None = None) -> Image.Image:
    """Bytes or a path → 8-bit RGB PIL image, within `limits` (ImageError otherwise). With `size` (width,
    height after EXIF orientation), an image larger than that is made that size while decoding: a JPEG is
    decoded at a reduced scale (DCT scaling) and everything is resized before it is expanded to RGB."""
    _checked_source(data, limits)
    img = _open(data)
    check_size(*img.size, limits)
    try:
        if size is not None and img.format == "JPEG":
            rotated = _orientation(img) in _ROTATED
            img.draft("RGB", (size[1], size[0]) if rotated else size)  # the smallest scale still >= size
        img.load()
        return to_rgb(img, size if size is not None and _smaller(size, img.size) else None)
    except ImageError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001  (any decoder failure is this image's, never the caller's)
        raise ImageError(ErrorCode.UNREADABLE, f"image data is corrupt or truncated: {exc}") from None


def _smaller(size: Size, actual: Size) -> bool:
    return size[0] * size[1] < actual[0] * actual[1]


def probe(data: bytes, limits: ImageLimits = ImageLimits()) -> Size:
    """(width, height) of encoded image bytes, checked against `limits` without decoding the pixels."""
    check_bytes(len(data), limits)
    width, height = image_size(data)
    check_size(width, height, limits)
    return width, height


@dataclass(frozen=True)
class Probed:
    """Encoded image bytes whose header has been read and checked (`probe`): what scoring carries inward, so that
    no later step reads the header again."""

    data: bytes
    width: int
    height: int

    @classmethod
    def of(cls, data: bytes, limits: ImageLimits = ImageLimits()) -> Probed:
        return cls(data, *probe(data, limits))

    @property
    def size(self) -> Size:
        return self.width, self.height


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 [3, H, W] tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def shrink(pixels: torch.Tensor, size: Size | None) -> torch.Tensor:
    """A uint8 [3, H, W] image resized (antialiased) down to `size` (width, height) when it is larger."""
    if size is None or not _smaller(size, (pixels.shape[-1], pixels.shape[-2])):
        return pixels
    from torchvision.transforms.v2 import functional as F

    return F.resize(pixels, [size[1], size[0]], antialias=True)


_JPEG = b"\xff\xd8\xff"


def decode_tensor(data: bytes, limits: ImageLimits = ImageLimits(), device: torch.device | str = "cpu",
                  size: Size | None = None) -> torch.Tensor:
    """Bytes → uint8 [3, H, W] on `device`, no larger than `size` when given (see `decode`). On a GPU, JPEGs
    are decoded there (nvJPEG, EXIF orientation applied) after the same size checks; anything else goes
    through `decode`."""
    device = torch.device(device)
    if device.type == "cuda" and bytes(data[:3]) == _JPEG:
        check_bytes(len(data), limits)
        with _open(data) as img:  # the header only: reject sizes before decoding anything
            check_size(*img.size, limits)
            gray_or_cmyk = img.mode not in ("RGB", "L")
        if not gray_or_cmyk:
            try:
                pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                     device=device, apply_exif_orientation=True)
                return shrink(pixels, size)
            except RuntimeError:
                pass  # a JPEG variant nvJPEG does not take: Pillow below
    return to_tensor(decode(data, limits, size)).to(device, non_blocking=True)
