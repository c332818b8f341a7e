"""Image decoding shared by training, validation and scoring: one way to turn bytes into RGB.

EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit
RGB; animated images give their first frame. Size limits are the cloud's (data.md).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from models.data.formats import MAX_SIDE, ImageLimits
from models.errors import ImageError

# We check dimensions ourselves before decoding; Pillow's own bomb guard would fire first
# for legitimate 16,000 x 16,000 images.
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE + 1


def _open(data: bytes | str | Path) -> Image.Image:
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a readable image (JPEG, PNG, GIF, BMP, WEBP, TIFF, ...)") from None
    except FileNotFoundError:
        raise ImageError("missing", f"file not found: {data}") from None
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read image: {exc}") from None


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width < limits.min_side or height < limits.min_side:
        raise ImageError(
            "too_small", f"image is {width}x{height} pixels; at least {limits.min_side}x{limits.min_side} is required"
        )
    if width > limits.max_side or height > limits.max_side:
        raise ImageError(
            "too_large", f"image is {width}x{height} pixels; at most {limits.max_side} per side is allowed"
        )


def check_bytes(size: int, limits: ImageLimits) -> None:
    if limits.max_bytes is not None and size > limits.max_bytes:
        raise ImageError(
            "too_large",
            f"image file is {size / 1e6:.1f} MB; at most {limits.max_bytes / 2**20:.0f} MB is allowed",
        )


def image_size(path: bytes | str | Path) -> tuple[int, int]:
    """(width, height) read from the file header, after EXIF orientation; no full decode."""
    with _open(path) as img:
        width, height = img.size
        try:  # PNG's getexif() reads the whole file to find an eXIf chunk after the pixels
            orientation = img.getexif().get(0x0112, 1)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError("unreadable", f"image data is corrupt or truncated: {exc}") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode; first frame of animations; EXIF orientation applied."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 0..255 by their type's range (not stretched)."""
    array = np.asarray(img)
    if img.mode == "F":
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = (array - low) / (high - low or 1.0) * 255.0
    else:
        scaled = array.astype(np.float64) / 257.0
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def decode(data: bytes | str | Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes or a path → 8-bit RGB PIL image, within `limits` (ImageError otherwise)."""
    if isinstance(data, (bytes, bytearray)):
        check_bytes(len(data), limits)
    elif limits.max_bytes is not None:
        try:
            check_bytes(Path(data).stat().st_size, limits)
        except FileNotFoundError:
            raise ImageError("missing", f"file not found: {data}") from None
    img = _open(data)
    check_size(*img.size, limits)
    try:
        img.load()
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("unreadable", f"image data is corrupt or truncated: {exc}") from None


def probe(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(width, height) of encoded image bytes, checked against `limits` without decoding the pixels."""
    check_bytes(len(data), limits)
    width, height = image_size(data)
    check_size(width, height, limits)
    return width, height


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 [3, H, W] tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


_JPEG = b"\xff\xd8\xff"


def decode_tensor(data: bytes, limits: ImageLimits = ImageLimits(), device: torch.device | str = "cpu") -> torch.Tensor:
    """Bytes → uint8 [3, H, W] on `device`. On a GPU, JPEGs are decoded there (nvJPEG, EXIF
    orientation applied) after the same size checks; anything else goes through `decode`."""
    device = torch.device(device)
    if device.type == "cuda" and bytes(data[:3]) == _JPEG:
        check_bytes(len(data), limits)
        with _open(data) as img:  # the header only: reject sizes before decoding anything
            check_size(*img.size, limits)
            gray_or_cmyk = img.mode not in ("RGB", "L")
        if not gray_or_cmyk:
            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   device=device, apply_exif_orientation=True)
            except RuntimeError:
                pass  # a JPEG variant nvJPEG does not take: Pillow below
    return to_tensor(decode(data, limits)).to(device, non_blocking=True)
