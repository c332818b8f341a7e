"""Image decoding (models/images.py) and the scoring side's base64 / per-row errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from models.data.formats import ImageLimits
from models.data.images import decode, image_size
from models.errors import ImageError
from serving.contract import decode_base64, row_error

ORIENTATION = 0x0112


def png_bytes(img: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def noise(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    """Incompressible pixels, so byte sizes and truncation are meaningful."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rotated_source(width: int = 80, height: int = 60) -> Image.Image:
    """Green image with a red 12x12 block in the stored top-left corner, EXIF Orientation=6."""
    img = Image.new("RGB", (width, height), (0, 200, 0))
    img.paste((255, 0, 0), (0, 0, 12, 12))
    return img


def with_orientation_6(img: Image.Image) -> Image.Image.Exif:
    exif = img.getexif()
    exif[ORIENTATION] = 6
    return exif


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_is_applied_on_decode(tmp_path, fmt):
    img = rotated_source()
    path = tmp_path / f"rotated.{fmt.lower()}"
    img.save(path, format=fmt, exif=with_orientation_6(img), **({"quality": 95} if fmt == "JPEG" else {}))

    out = decode(path)

    # Orientation 6: the stored image is shown turned 90 degrees clockwise, so its width and
    # height swap and the stored top-left corner is shown at the top right.
    assert out.mode == "RGB"
    assert out.size == (60, 80)
    red, green = np.array([255, 0, 0]), np.array([0, 200, 0])
    pixels = np.asarray(out).astype(int)
    assert np.abs(pixels[3, 60 - 4] - red).max() < 40, "marker should be at the top right"
    assert np.abs(pixels[3, 3] - green).max() < 40, "top left should be background"
    assert np.abs(pixels[80 - 4, 60 - 4] - green).max() < 40


def test_exif_orientation_is_applied_to_decoded_bytes_too():
    img = rotated_source()
    out = decode(png_bytes(img, exif=with_orientation_6(img)))
    assert out.size == (60, 80)


def test_image_size_reports_the_size_after_exif_orientation(tmp_path):
    img = rotated_source()
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=with_orientation_6(img))
    assert image_size(path) == (60, 80)
    plain = tmp_path / "plain.jpg"
    img.save(plain)
    assert image_size(plain) == (80, 60)


# ---------------------------------------------------------------- modes → 8-bit RGB


def test_grayscale_image_decodes_to_rgb_with_equal_channels():
    gray = Image.fromarray(np.tile(np.arange(0, 240, 3, dtype=np.uint8), (60, 1)), mode="L")
    out = decode(png_bytes(gray))
    pixels = np.asarray(out)
    assert out.mode == "RGB" and out.size == (80, 60)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert (pixels[..., 0] == np.asarray(gray)).all()


def test_rgba_transparent_pixels_are_composited_on_white():
    img = Image.new("RGBA", (80, 60), (0, 0, 0, 0))  # fully transparent black
    img.paste((255, 0, 0, 255), (0, 0, 40, 60))  # opaque red left half
    img.paste((0, 0, 255, 128), (40, 0, 60, 60))  # half-transparent blue
    pixels = np.asarray(decode(png_bytes(img))).astype(int)
    assert tuple(pixels[30, 10]) == (255, 0, 0)
    assert tuple(pixels[30, 70]) == (255, 255, 255), "transparent must become white, not black"
    r, g, b = pixels[30, 50]
    assert 120 <= r <= 135 and 120 <= g <= 135 and b == 255


def test_palette_image_with_transparency_is_composited_on_white():
    img = Image.new("P", (80, 60), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # 0 = black, 1 = red
    img.paste(1, (0, 0, 40, 60))
    out = decode(png_bytes(img, transparency=0))
    pixels = np.asarray(out)
    assert out.mode == "RGB"
    assert tuple(pixels[30, 10]) == (255, 0, 0)
    assert tuple(pixels[30, 70]) == (255, 255, 255)


def test_16_bit_png_is_scaled_to_8_bit_not_clipped():
    values = np.zeros((60, 80), dtype=np.uint16)
    values[:, 20:40] = 128 * 257
    values[:, 40:60] = 1000
    values[:, 60:] = 65535
    source = Image.fromarray(values)
    assert source.mode.startswith("I;16")
    data = png_bytes(source)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # still 16-bit when read back

    pixels = np.asarray(decode(data))
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    assert tuple(pixels[0, 30]) == (128, 128, 128)
    assert tuple(pixels[0, 50]) == (4, 4, 4)  # 1000 / 257, not 255
    assert tuple(pixels[0, 70]) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 60), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3

    out = decode(path)
    assert out.mode == "RGB" and out.size == (80, 60)
    assert tuple(np.asarray(out)[30, 40]) == (255, 0, 0)


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(path)  # red in CMYK
    out = decode(path)
    r, g, b = np.asarray(out)[30, 40].astype(int)
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


# ---------------------------------------------------------------- errors with codes


def test_image_smaller_than_50x50_is_too_small():
    with pytest.raises(ImageError) as info:
        decode(png_bytes(Image.new("RGB", (49, 80))))
    assert info.value.code == "too_small"
    assert "49x80" in str(info.value)


def test_image_of_exactly_50x50_is_accepted():
    assert decode(png_bytes(Image.new("RGB", (50, 50)))).size == (50, 50)


def test_file_over_the_byte_limit_is_too_large(tmp_path):
    data = png_bytes(noise())
    assert len(data) > 10_000
    with pytest.raises(ImageError) as info:
        decode(data, ImageLimits(max_bytes=10_000))
    assert info.value.code == "too_large"
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        decode(path, ImageLimits(max_bytes=10_000))
    assert info.value.code == "too_large"
    assert decode(data, ImageLimits(max_bytes=len(data))).size == (80, 60)


def test_image_over_the_side_limit_is_too_large():
    with pytest.raises(ImageError) as info:
        decode(png_bytes(Image.new("RGB", (120, 60))), ImageLimits(max_side=100))
    assert info.value.code == "too_large"


def test_bytes_that_are_not_an_image_give_not_an_image():
    with pytest.raises(ImageError) as info:
        decode(b"this is plain text, not a picture" * 10)
    assert info.value.code == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_unreadable(tmp_path, fmt):
    buffer = io.BytesIO()
    noise().save(buffer, format=fmt)
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(ImageError) as info:
        decode(data)
    assert info.value.code == "unreadable"
    path = tmp_path / f"truncated.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        decode(path)
    assert info.value.code == "unreadable"


def test_image_size_of_a_truncated_png_is_an_image_error_not_a_crash(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(png_bytes(noise())[:500])
    with pytest.raises(ImageError) as info:
        image_size(path)
    assert info.value.code == "unreadable"


def test_missing_file_gives_missing(tmp_path):
    with pytest.raises(ImageError) as info:
        decode(tmp_path / "nope.png")
    assert info.value.code == "missing"
    with pytest.raises(ImageError) as info:
        decode(tmp_path / "nope.png", ImageLimits(max_bytes=1000))
    assert info.value.code == "missing"


# ---------------------------------------------------------------- base64 (scoring requests)


@pytest.fixture(scope="module")
def raw_png() -> bytes:
    return png_bytes(noise(seed=1))


def test_decode_base64_accepts_encodebytes_output_with_newlines(raw_png):
    text = base64.encodebytes(raw_png).decode("utf-8")
    assert "\n" in text.rstrip("\n")  # a newline every 76 characters
    assert decode_base64(text) == raw_png
    assert decode(decode_base64(text)).size == (80, 60)


def test_decode_base64_accepts_plain_b64encode_as_str_and_bytes(raw_png):
    assert decode_base64(base64.b64encode(raw_png).decode("ascii")) == raw_png
    assert decode_base64(base64.b64encode(raw_png)) == raw_png


def test_decode_base64_accepts_a_data_url_prefix(raw_png):
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw_png).decode()) == raw_png
    assert decode_base64("DATA:image/jpeg;base64," + base64.b64encode(raw_png).decode()) == raw_png


def test_decode_base64_accepts_the_url_safe_alphabet(raw_png):
    text = base64.urlsafe_b64encode(raw_png).decode()
    assert "-" in text or "_" in text  # the test data exercises the URL-safe characters
    assert decode_base64(text) == raw_png


@pytest.mark.parametrize("cut", [1, 2])
def test_decode_base64_accepts_missing_padding(cut):
    raw = bytes(range(3 * 20 + 3 - cut))  # 62 bytes → one "=", 61 bytes → "=="
    text = base64.b64encode(raw).decode()
    assert text.endswith("=" * cut)
    assert decode_base64(text.rstrip("=")) == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw


@pytest.mark.parametrize("garbage", ["!!!not base64!!!", "abcde", "   ", "", "data:image/png;base64,"])
def test_decode_base64_rejects_garbage_with_invalid_base64(garbage):
    with pytest.raises(ImageError) as info:
        decode_base64(garbage)
    assert info.value.code == "invalid_base64"


def test_decode_base64_rejects_a_non_string():
    with pytest.raises(ImageError) as info:
        decode_base64(12345)
    assert info.value.code == "invalid_input"


def test_valid_base64_of_non_image_bytes_fails_at_decode_with_not_an_image():
    with pytest.raises(ImageError) as info:
        decode(decode_base64(base64.b64encode(b"hello world, not an image").decode()))
    assert info.value.code == "not_an_image"


def test_row_error_names_the_row_and_the_code():
    entry = row_error(3, ImageError("too_small", "image is 10x10 pixels"))
    assert entry == {"error": {"row": 3, "code": "too_small", "message": "image 3: image is 10x10 pixels"}}


def test_images_written_to_disk_and_bytes_decode_identically(tmp_path):
    img = noise()
    path = tmp_path / "same.png"
    img.save(path)
    assert np.array_equal(np.asarray(decode(path)), np.asarray(decode(path.read_bytes())))
    assert np.array_equal(np.asarray(decode(path)), np.asarray(img))


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels and holds almost nothing: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [30_000, 100_000])
def test_a_decompression_bomb_is_too_large_before_anything_is_decoded(side):
    from models.data.images import probe

    bomb = _bomb_png(side, side)
    assert len(bomb) < 100
    for check in (probe, decode, image_size):
        with pytest.raises(ImageError) as info:
            check(bomb)
        assert info.value.code == "too_large"


def test_training_validation_names_the_line_of_a_bomb(tmp_path):
    from models.data.checks import check_training_images
    from models.data.records import Record

    (tmp_path / "bomb.png").write_bytes(_bomb_png(30_000, 30_000))
    [problem] = check_training_images([Record(str(tmp_path / "bomb.png"), "a", "train.jsonl", 7)])
    assert problem.line == 7 and problem.field == "image_url" and "pixels" in problem.message


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_depth_images_convert_exactly_in_blocks_of_rows(mode):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (2500, 70)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    img = Image.fromarray(values)
    assert img.mode == mode
    from models.data.images import to_rgb

    gray = np.asarray(to_rgb(img))[..., 0]
    array = values.astype(np.float64)
    expected = (array - array.min()) / (array.max() - array.min()) * 255 if mode == "F" else array / 257
    assert np.array_equal(gray, np.clip(np.rint(expected), 0, 255).astype(np.uint8))


def test_a_large_jpeg_is_decoded_at_the_size_asked_for(tmp_path):
    big = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (2048, 8))[..., None].repeat(3, 2))  # 2048x2048
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    data = buffer.getvalue()
    small = decode(data, size=(300, 300))
    assert small.size == (300, 300)
    full = np.asarray(decode(data).resize((300, 300), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - full).mean() < 3  # the same picture, made smaller
    assert decode(data, size=(4000, 4000)).size == (2048, 2048)  # never enlarged


def test_size_asked_for_is_after_exif_orientation(tmp_path):
    img = rotated_source(400, 200)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", exif=with_orientation_6(img))
    decoded = decode(buffer.getvalue(), size=(100, 200))  # stored 400x200, shown 200x400
    assert decoded.size == (100, 200)
    red = np.asarray(decoded)[:6, -6:]  # the stored top-left corner is shown top-right
    assert red[..., 0].mean() > 150 and red[..., 1].mean() < 100


@pytest.mark.parametrize("payload", [
    b"\x89PNG\r\n\x1a\n" + b"\0" * 40,  # a PNG signature and a broken header
    b"GIF89a" + b"\xff" * 20,
    b"BM" + b"\0" * 60,
    b"\xff\xd8\xff\xe0" + b"\0" * 30,
])
def test_any_broken_header_is_this_image_s_error(payload):
    from models.data.images import probe

    with pytest.raises(ImageError) as info:
        probe(payload)
    assert info.value.code in ("not_an_image", "unreadable", "too_small")
