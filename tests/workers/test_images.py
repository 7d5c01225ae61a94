"""Tests for workers.images.decode_image on images built in memory and on the committed photos."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.images import ALLOWED_FORMATS, ImageError, decode_image, to_rgb

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PHOTO_SIZES = {
    "chelsea.jpg": (451, 300),
    "coffee.jpg": (600, 400),
    "astronaut.jpg": (512, 512),
    "rocket.jpg": (640, 427),
}
MAX_PIXELS = 50_000_000
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
ORIENTATION_TAG = 0x0112


# --- helpers that build image files -------------------------------------------------------------


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    return decode_image(data, max_pixels=max_pixels)


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[xy[1], xy[0]])


def row_image(mode: str, values: list) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def float_row_tiff(values: list[float]) -> bytes:
    return encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")


def int32_row_tiff(values: list[int]) -> bytes:
    return encode(Image.fromarray(np.array([values], dtype=np.int32)), "TIFF")


def palette_image(mode: str, indices: list) -> Image.Image:
    image = row_image(mode, indices)
    image.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 * 3 - 9), "RGB")
    return image


def with_associated_alpha(tiff: bytes) -> bytes:
    """Rewrite the ExtraSamples tag of a little-endian TIFF to 1 (premultiplied alpha).

    Pillow 13 always writes 2 (unassociated alpha) and has no option for 1.
    """
    patched = bytearray(tiff)
    ifd_offset = struct.unpack_from("<I", patched, 4)[0]
    entry_count = struct.unpack_from("<H", patched, ifd_offset)[0]
    for index in range(entry_count):
        entry_offset = ifd_offset + 2 + 12 * index
        tag = struct.unpack_from("<H", patched, entry_offset)[0]
        if tag == 338:
            struct.pack_into("<H", patched, entry_offset + 8, 1)
            return bytes(patched)
    raise LookupError("the TIFF has no ExtraSamples tag")


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + payload)
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)


def bilevel_png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def zero_rows_deflated(width: int, height: int) -> bytes:
    # One filter byte plus width / 8 bytes per row of a 1-bit image, compressed in slices.
    rows_per_slice = 1000
    row_slice = b"\x00" * ((1 + (width + 7) // 8) * rows_per_slice)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row_slice) for _ in range(height // rows_per_slice)]
    parts.append(compressor.flush())
    return b"".join(parts)


def noise_image(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def solid_frames(colours: list[tuple[int, int, int]]) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), colour) for colour in colours]


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A PNG whose 30000x30000 1-bit pixels deflate to about 110 KB."""
    return bilevel_png(30000, 30000, zero_rows_deflated(30000, 30000))


# --- mode conversion -------------------------------------------------------------------------------

# (case id, builder of the file, mode Pillow opens it in, pixel, expected RGB, tolerance)
ModeCase = tuple[str, Callable[[], bytes], str, tuple[int, int], tuple[int, int, int], int]


def _p_transparent() -> bytes:
    return encode(palette_image("P", [0, 1]), "PNG", transparency=0)


def _pa() -> bytes:
    return encode(palette_image("PA", [(0, 0), (1, 255)]), "TIFF")


def _la() -> bytes:
    return encode(row_image("LA", [(0, 0), (0, 255), (0, 128)]), "PNG")


def _rgba() -> bytes:
    return encode(row_image("RGBA", [(255, 0, 0, 128), (0, 0, 255, 0), (0, 0, 255, 255)]), "PNG")


def _la_premultiplied() -> bytes:
    return with_associated_alpha(encode(row_image("LA", [(64, 128), (0, 0)]), "TIFF"))


def _rgba_premultiplied() -> bytes:
    return with_associated_alpha(encode(row_image("RGBA", [(128, 0, 0, 128)]), "TIFF"))


def _sixteen_bit(image_format: str, mode: str) -> Callable[[], bytes]:
    return lambda: encode(row_image(mode, [0, 32896, 65535, 386]), image_format)


def _sixteen_bit_keyed() -> bytes:
    return encode(row_image("I;16", [1000, 32896]), "PNG", transparency=1000)


def _rgb_keyed() -> bytes:
    return encode(row_image("RGB", [RED, BLUE]), "PNG", transparency=RED)


def _l_keyed() -> bytes:
    return encode(row_image("L", [10, 50]), "PNG", transparency=10)


def _cmyk_jpeg() -> bytes:
    image = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    image.paste((0, 255, 255, 0), (16, 0, 32, 16))
    return encode(image, "JPEG", quality=95)


MODE_CASES: list[ModeCase] = [
    ("P-transparent-is-white", _p_transparent, "P", (0, 0), WHITE, 0),
    ("P-opaque-entry", _p_transparent, "P", (1, 0), GREEN, 0),
    ("P-no-transparency", lambda: encode(palette_image("P", [0]), "PNG"), "P", (0, 0), RED, 0),
    ("PA-transparent-is-white", _pa, "PA", (0, 0), WHITE, 0),
    ("PA-opaque", _pa, "PA", (1, 0), GREEN, 0),
    ("LA-transparent-is-white", _la, "LA", (0, 0), WHITE, 0),
    ("LA-opaque", _la, "LA", (1, 0), (0, 0, 0), 0),
    ("LA-half", _la, "LA", (2, 0), (127, 127, 127), 1),
    ("RGBA-half-red", _rgba, "RGBA", (0, 0), (255, 127, 127), 1),
    ("RGBA-transparent-is-white", _rgba, "RGBA", (1, 0), WHITE, 0),
    ("RGBA-opaque", _rgba, "RGBA", (2, 0), BLUE, 0),
    ("La-half", _la_premultiplied, "La", (0, 0), (191, 191, 191), 0),
    ("La-transparent-is-white", _la_premultiplied, "La", (1, 0), WHITE, 0),
    ("RGBa-half-red", _rgba_premultiplied, "RGBA", (0, 0), (255, 127, 127), 1),
    ("I16-zero", _sixteen_bit("PNG", "I;16"), "I;16", (0, 0), (0, 0, 0), 0),
    ("I16-mid-scaled-not-clamped", _sixteen_bit("PNG", "I;16"), "I;16", (1, 0), (128, 128, 128), 0),
    ("I16-max", _sixteen_bit("PNG", "I;16"), "I;16", (2, 0), (255, 255, 255), 0),
    ("I16-rounds", _sixteen_bit("PNG", "I;16"), "I;16", (3, 0), (2, 2, 2), 0),
    ("I16-transparent-key-is-white", _sixteen_bit_keyed, "I;16", (0, 0), WHITE, 0),
    ("I16-keyed-opaque", _sixteen_bit_keyed, "I;16", (1, 0), (128, 128, 128), 0),
    ("I16B-mid", _sixteen_bit("TIFF", "I;16B"), "I;16B", (1, 0), (128, 128, 128), 0),
    ("I16B-max", _sixteen_bit("TIFF", "I;16B"), "I;16B", (2, 0), (255, 255, 255), 0),
    ("I-in-16-bit-range", lambda: int32_row_tiff([0, 32896, 65535]), "I", (1, 0), (128, 128, 128), 0),
    ("I-stretch-min", lambda: int32_row_tiff([-1000, 0, 1000]), "I", (0, 0), (0, 0, 0), 0),
    ("I-stretch-mid", lambda: int32_row_tiff([-1000, 0, 1000]), "I", (1, 0), (128, 128, 128), 0),
    ("I-stretch-max", lambda: int32_row_tiff([-1000, 0, 1000]), "I", (2, 0), WHITE, 0),
    ("I-constant-high-clips", lambda: int32_row_tiff([100000, 100000]), "I", (0, 0), WHITE, 0),
    ("I-constant-negative-clips", lambda: int32_row_tiff([-5, -5]), "I", (0, 0), (0, 0, 0), 0),
    ("F-unit-quarter", lambda: float_row_tiff([0.0, 0.25, 1.0]), "F", (1, 0), (64, 64, 64), 0),
    ("F-unit-one", lambda: float_row_tiff([0.0, 0.25, 1.0]), "F", (2, 0), WHITE, 0),
    ("F-stretch-mid", lambda: float_row_tiff([-1.0, 0.0, 3.0]), "F", (1, 0), (64, 64, 64), 0),
    ("F-stretch-max", lambda: float_row_tiff([-1.0, 0.0, 3.0]), "F", (2, 0), WHITE, 0),
    ("F-nan-is-black", lambda: float_row_tiff([float("nan"), 0.5, 1.0]), "F", (0, 0), (0, 0, 0), 0),
    ("F-inf-is-white", lambda: float_row_tiff([float("inf"), 0.5, 0.0]), "F", (0, 0), WHITE, 0),
    ("F-inf-keeps-unit-rule", lambda: float_row_tiff([float("inf"), 0.5, 0.0]), "F", (1, 0), (128,) * 3, 0),
    ("RGB-transparent-key-is-white", _rgb_keyed, "RGB", (0, 0), WHITE, 0),
    ("RGB-keyed-opaque", _rgb_keyed, "RGB", (1, 0), BLUE, 0),
    ("L-transparent-key-is-white", _l_keyed, "L", (0, 0), WHITE, 0),
    ("L-keyed-opaque", _l_keyed, "L", (1, 0), (50, 50, 50), 0),
    ("CMYK-jpeg-white", _cmyk_jpeg, "CMYK", (8, 8), WHITE, 4),
    ("CMYK-jpeg-red", _cmyk_jpeg, "CMYK", (24, 8), RED, 8),
    ("L", lambda: encode(Image.new("L", (2, 2), 77), "PNG"), "L", (1, 1), (77, 77, 77), 0),
    ("1-black", lambda: encode(row_image("1", [0, 1]), "PNG"), "1", (0, 0), (0, 0, 0), 0),
    ("1-white", lambda: encode(row_image("1", [0, 1]), "PNG"), "1", (1, 0), WHITE, 0),
    ("YCbCr-red", lambda: encode(Image.new("YCbCr", (2, 2), (76, 85, 255)), "TIFF"), "YCbCr", (0, 0), RED, 2),
    ("LAB-white", lambda: encode(Image.new("LAB", (2, 2), (255, 128, 128)), "TIFF"), "LAB", (0, 0), WHITE, 2),
    ("LAB-mid-grey", lambda: encode(Image.new("LAB", (2, 2), (128, 128, 128)), "TIFF"), "LAB", (0, 0), (119,) * 3, 2),
]
MODE_IDS = [case[0] for case in MODE_CASES]
MODE_PARAMETERS = pytest.mark.parametrize(
    ("case_id", "build", "source_mode", "xy", "expected", "tolerance"), MODE_CASES, ids=MODE_IDS
)


@MODE_PARAMETERS
def test_mode_source_opens_in_mode(case_id, build, source_mode, xy, expected, tolerance):
    assert Image.open(io.BytesIO(build())).mode == source_mode


@MODE_PARAMETERS
def test_mode_decodes_to_rgb(case_id, build, source_mode, xy, expected, tolerance):
    assert decode(build()).mode == "RGB"


@MODE_PARAMETERS
def test_mode_pixel_value(case_id, build, source_mode, xy, expected, tolerance):
    actual = np.array(pixel(decode(build()), xy))
    difference = np.abs(actual - np.array(expected)).max()
    assert difference <= tolerance, f"decoded pixel {tuple(actual)}, expected {expected} ±{tolerance}"


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("HSV", (1, 1), (0, 255, 255)), RED),
        (row_image("I;16L", [32896]), (128, 128, 128)),
        (row_image("I;16N", [65535]), WHITE),
        (row_image("La", [(64, 128)]), (191, 191, 191)),
        (row_image("RGBa", [(100, 0, 50, 200)]), (155, 55, 105)),
    ],
    ids=["HSV", "I;16L", "I;16N", "La", "RGBa"],
)
def test_to_rgb_in_memory_modes(image, expected):
    assert pixel(to_rgb(image), (0, 0)) == expected


def test_result_is_detached_from_file():
    result = decode(encode(Image.new("RGB", (4, 4), RED), "PNG"))
    assert getattr(result, "fp", None) is None


# --- orientation, frames, formats ----------------------------------------------------------------

# Where the marker drawn at the stored top-left corner ends up once the orientation is applied,
# and whether width and height swap. Keys are values of the EXIF Orientation tag (0x0112).
ORIENTATION_CASES = {
    1: ("top-left", False),
    2: ("top-right", False),
    3: ("bottom-right", False),
    4: ("bottom-left", False),
    5: ("top-left", True),
    6: ("top-right", True),
    7: ("bottom-right", True),
    8: ("bottom-left", True),
}


def red_corners(image: Image.Image) -> list[str]:
    width, height = image.size
    corners = {
        "top-left": (4, 4),
        "top-right": (width - 5, 4),
        "bottom-left": (4, height - 5),
        "bottom-right": (width - 5, height - 5),
    }
    return [name for name, xy in corners.items() if pixel(image, xy)[0] > 200 and pixel(image, xy)[2] < 60]


def oriented_jpeg(orientation: int) -> bytes:
    image = Image.new("RGB", (48, 24), BLUE)
    image.paste(RED, (0, 0, 16, 16))
    return encode(image, "JPEG", quality=95, exif=exif_with_orientation(orientation))


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_CASES))
def test_exif_orientation_size(orientation):
    _, swapped = ORIENTATION_CASES[orientation]
    expected_size = (24, 48) if swapped else (48, 24)
    assert decode(oriented_jpeg(orientation)).size == expected_size


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_CASES))
def test_exif_orientation_marker_corner(orientation):
    expected_corner, _ = ORIENTATION_CASES[orientation]
    assert red_corners(decode(oriented_jpeg(orientation))) == [expected_corner]


ANIMATIONS = {
    "gif": lambda: encode(solid_frames([RED, GREEN, BLUE])[0], "GIF", save_all=True,
                          append_images=solid_frames([GREEN, BLUE]), duration=100, loop=0),
    "webp": lambda: encode(solid_frames([RED, GREEN, BLUE])[0], "WEBP", save_all=True, lossless=True,
                           append_images=solid_frames([GREEN, BLUE]), duration=100),
    "tiff-pages": lambda: encode(solid_frames([RED])[0], "TIFF", save_all=True,
                                 append_images=solid_frames([GREEN, BLUE])),
}


@pytest.mark.parametrize("name", sorted(ANIMATIONS))
def test_animation_source_has_frames(name):
    assert Image.open(io.BytesIO(ANIMATIONS[name]())).n_frames == 3


@pytest.mark.parametrize("name", sorted(ANIMATIONS))
def test_animation_first_frame(name):
    assert pixel(decode(ANIMATIONS[name]()), (8, 8)) == RED


FORMAT_CASES = {
    "jpeg-baseline": (lambda: encode(Image.new("RGB", (32, 32), (200, 40, 90)), "JPEG", quality=95), 3),
    "jpeg-progressive": (
        lambda: encode(Image.new("RGB", (32, 32), (200, 40, 90)), "JPEG", quality=95, progressive=True), 3),
    "webp-lossy": (lambda: encode(Image.new("RGB", (32, 32), (200, 40, 90)), "WEBP", quality=90), 6),
    "webp-lossless": (lambda: encode(Image.new("RGB", (32, 32), (200, 40, 90)), "WEBP", lossless=True), 0),
    "bmp": (lambda: encode(Image.new("RGB", (32, 32), (200, 40, 90)), "BMP"), 0),
    "png": (lambda: encode(Image.new("RGB", (32, 32), (200, 40, 90)), "PNG"), 0),
    "tiff": (lambda: encode(Image.new("RGB", (32, 32), (200, 40, 90)), "TIFF"), 0),
}


def test_progressive_jpeg_is_progressive():
    build, _ = FORMAT_CASES["jpeg-progressive"]
    assert Image.open(io.BytesIO(build())).info.get("progressive") == 1


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_format_decodes_colour(name):
    build, tolerance = FORMAT_CASES[name]
    actual = np.array(pixel(decode(build()), (16, 16)))
    assert np.abs(actual - np.array((200, 40, 90))).max() <= tolerance


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_format_decodes_size(name):
    build, _ = FORMAT_CASES[name]
    assert decode(build()).size == (32, 32)


# --- rejected data -----------------------------------------------------------------------------


def _truncated(image_format: str) -> bytes:
    data = encode(noise_image((64, 64)), image_format)
    return data[: len(data) // 2]


DECODE_ERROR_CASES = {
    "zero-bytes": lambda: b"",
    "truncated-jpeg": lambda: _truncated("JPEG"),
    "truncated-png": lambda: _truncated("PNG"),
    "jpeg-header-only": lambda: encode(noise_image((64, 64)), "JPEG")[:200],
    "plain-text": lambda: b"this is not an image\n",
    "html": lambda: b"<!DOCTYPE html>\n<html><body><img src='cat.jpg'></body></html>",
    "binary-noise": lambda: bytes(range(256)) * 4,
    "mp4-ftyp": lambda: b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 32,
    "ico-outside-allow-list": lambda: encode(Image.new("RGB", (16, 16), RED), "ICO"),
    "jpeg2000-outside-allow-list": lambda: encode(Image.new("RGB", (16, 16), RED), "JPEG2000"),
}


@pytest.mark.parametrize("name", sorted(DECODE_ERROR_CASES))
def test_bad_data_is_decode_error(name):
    with pytest.raises(ImageError) as raised:
        decode(DECODE_ERROR_CASES[name]())
    assert raised.value.code == "decode_error"


def test_truncated_jpeg_keeps_cause():
    with pytest.raises(ImageError) as raised:
        decode(_truncated("JPEG"))
    assert isinstance(raised.value.__cause__, OSError)


def _heic_header() -> bytes:
    return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 32


UNSUPPORTED_CASES = {
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    "svg-bom-whitespace": (lambda: b"\xef\xbb\xbf \n\t<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    "xml-declaration": (lambda: b'<?xml version="1.0"?>\n<svg/>', "SVG/XML"),
    "pdf": (lambda: encode(Image.new("RGB", (16, 16), RED), "PDF"), "PDF"),
    "eps": (lambda: encode(Image.new("RGB", (16, 16), RED), "EPS"), "EPS"),
    "eps-dos-header": (lambda: b"\xc5\xd0\xd3\xc6" + b"\x00" * 60, "EPS"),
    "heic-ftyp": (_heic_header, "HEIC"),
    "heif-msf1-brand": (lambda: b"\x00\x00\x00\x14ftypmsf1\x00\x00\x00\x00mif1" + b"\x00" * 8, "HEIC/HEIF"),
    "avif": (lambda: encode(Image.new("RGB", (16, 16), RED), "AVIF"), "AVIF"),
    "psd": (lambda: b"8BPS\x00\x01" + b"\x00" * 60, "PSD"),
    "fits": (lambda: b"SIMPLE  =                    T" + b" " * 50, "FITS"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_CASES))
def test_unsupported_format_code(name):
    build, _ = UNSUPPORTED_CASES[name]
    with pytest.raises(ImageError) as raised:
        decode(build())
    assert raised.value.code == "unsupported_format"


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_CASES))
def test_unsupported_format_named(name):
    build, format_name = UNSUPPORTED_CASES[name]
    with pytest.raises(ImageError) as raised:
        decode(build())
    assert format_name in raised.value.message


# --- pixel limits -------------------------------------------------------------------------------


def test_bomb_is_small_file(bomb_png):
    assert len(bomb_png) < 200_000


def test_bomb_is_too_many_pixels(bomb_png):
    with pytest.raises(ImageError) as raised:
        decode(bomb_png, max_pixels=50_000_000)
    assert raised.value.code == "too_many_pixels"


def test_bomb_without_pillow_limit(bomb_png, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError) as raised:
        decode(bomb_png, max_pixels=50_000_000)
    assert raised.value.code == "too_many_pixels"


def test_bomb_message_without_pillow_limit(bomb_png, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError) as raised:
        decode(bomb_png, max_pixels=50_000_000)
    assert "30000x30000" in raised.value.message


def test_pillow_bomb_error_keeps_cause(bomb_png):
    with pytest.raises(ImageError) as raised:
        decode(bomb_png, max_pixels=10**12)
    assert isinstance(raised.value.__cause__, Image.DecompressionBombError)


def test_pillow_bomb_warning_as_error():
    # 10000x10000 is above Pillow's default warning threshold (MAX_IMAGE_PIXELS = 89,478,485)
    # and below its error threshold (twice that).
    header_only = bilevel_png(10000, 10000, zlib.compress(b"\x00" * 1251))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as raised:
            decode(header_only, max_pixels=200_000_000)
    assert raised.value.code == "too_many_pixels"


def test_small_limit_rejects():
    with pytest.raises(ImageError) as raised:
        decode(encode(Image.new("RGB", (100, 80), RED), "PNG"), max_pixels=7999)
    assert raised.value.code == "too_many_pixels"


def test_small_limit_message_names_setting():
    with pytest.raises(ImageError) as raised:
        decode(encode(Image.new("RGB", (100, 80), RED), "PNG"), max_pixels=7999)
    assert "CLIPFLEET_MAX_IMAGE_PIXELS" in raised.value.message


def test_small_limit_message_names_size():
    with pytest.raises(ImageError) as raised:
        decode(encode(Image.new("RGB", (100, 80), RED), "PNG"), max_pixels=7999)
    assert "100x80" in raised.value.message


def test_limit_is_inclusive():
    assert decode(encode(Image.new("RGB", (100, 80), RED), "PNG"), max_pixels=8000).size == (100, 80)


@pytest.mark.parametrize("max_pixels", [0, -1, True, 1.5])
def test_invalid_max_pixels(max_pixels):
    with pytest.raises(ValueError):
        decode_image(b"\xff\xd8", max_pixels=max_pixels)


# --- the error type ----------------------------------------------------------------------------


def test_image_error_rejects_unknown_code():
    with pytest.raises(ValueError):
        ImageError("not_a_code", "message")


def test_image_error_pickles():
    restored = pickle.loads(pickle.dumps(ImageError("decode_error", "broken")))
    assert (restored.code, restored.message) == ("decode_error", "broken")


def test_allowed_formats():
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


# --- committed photographs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PHOTO_SIZES))
def test_photo_decodes_rgb(name):
    assert decode((DATA_DIR / name).read_bytes()).mode == "RGB"


@pytest.mark.parametrize("name", sorted(PHOTO_SIZES))
def test_photo_decodes_size(name):
    assert decode((DATA_DIR / name).read_bytes()).size == PHOTO_SIZES[name]


@pytest.mark.parametrize("name", sorted(PHOTO_SIZES))
def test_photo_file_is_small(name):
    assert (DATA_DIR / name).stat().st_size < 100_000


@pytest.mark.parametrize("name", sorted(PHOTO_SIZES))
def test_photo_png_copy_is_lossless(name):
    pixels = np.asarray(decode((DATA_DIR / name).read_bytes()))
    png_copy = encode(Image.fromarray(pixels), "PNG")
    np.testing.assert_array_equal(np.asarray(decode(png_copy)), pixels)


@pytest.mark.parametrize("name", sorted(PHOTO_SIZES))
def test_photo_matches_transformers_load_image(name):
    from transformers.image_utils import load_image

    path = DATA_DIR / name
    expected = np.asarray(load_image(str(path)))
    np.testing.assert_array_equal(np.asarray(decode(path.read_bytes())), expected)


def test_rotated_photo_matches_transformers_load_image(tmp_path):
    from transformers.image_utils import load_image

    path = tmp_path / "chelsea-rotated.jpg"
    with Image.open(DATA_DIR / "chelsea.jpg") as photo:
        photo.save(path, "JPEG", quality=90, exif=exif_with_orientation(6))
    expected = np.asarray(load_image(str(path)))
    np.testing.assert_array_equal(np.asarray(decode(path.read_bytes())), expected)


def test_concurrent_decodes_match_serial():
    payloads = [(DATA_DIR / name).read_bytes() for name in sorted(PHOTO_SIZES)] * 2
    serial = [np.asarray(decode(data)) for data in payloads]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = [np.asarray(image) for image in pool.map(decode, payloads)]
    assert all(np.array_equal(a, b) for a, b in zip(serial, concurrent))
