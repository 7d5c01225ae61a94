"""Builders of image files for tests, and a corpus of hostile and malformed images with their expected outcomes.

Every builder returns the bytes of a file built in memory, and the same call always returns the same
bytes. :func:`hostile_corpus` lists the cases that the end-to-end test uploads and submits in one job.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
ORIENTATION_TAG = 0x0112  # EXIF Orientation
BOMB_SIDE_PX = 30000
# Part of the key of the corpus case whose GET the tests stall past the fetch timeout.
STALL_KEY_MARKER = "stalled-get"


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def row_image(mode: str, values: list) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def float_row_tiff(values: list[float]) -> bytes:
    return encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")


def int32_row_tiff(values: list[int]) -> bytes:
    return encode(Image.fromarray(np.array([values], dtype=np.int32)), "TIFF")


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


def bomb_png(side_px: int = BOMB_SIDE_PX) -> bytes:
    """Return a valid black 1-bit PNG of side_px x side_px pixels. At 30000 px the file is about 110 KB."""
    return bilevel_png(side_px, side_px, zero_rows_deflated(side_px, side_px))


def noise_image(size: tuple[int, int], seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def truncated_image(image_format: str) -> bytes:
    """Return the first half of a 64x64 noise image, cut in the middle of its pixel data."""
    data = encode(noise_image((64, 64)), image_format)
    return data[: len(data) // 2]


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def oriented_jpeg(orientation: int) -> bytes:
    """Return a 48x24 blue JPEG with a red 16x16 square at its stored top-left corner and the given orientation."""
    image = Image.new("RGB", (48, 24), BLUE)
    image.paste(RED, (0, 0, 16, 16))
    return encode(image, "JPEG", quality=95, exif=exif_with_orientation(orientation))


def solid_frames(colours: list[tuple[int, int, int]]) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), colour) for colour in colours]


def animated(image_format: str, **options) -> bytes:
    """Return a three-frame 16x16 animation (red, green, blue) or, for TIFF, a three-page file."""
    first, *rest = solid_frames([RED, GREEN, BLUE])
    return encode(first, image_format, save_all=True, append_images=rest, **options)


def giant_screen_gif(side_px: int) -> bytes:
    """Return a GIF of a few dozen bytes whose one-pixel frame sits on a side_px × side_px logical screen.

    Pillow draws every frame onto the whole screen, so decoding it allocates side_px² pixels.
    """
    frame = encode(Image.new("P", (1, 1)), "GIF")
    # Bytes 6-9 of a GIF hold the logical screen's width and height, little-endian 16-bit.
    return frame[:6] + side_px.to_bytes(2, "little") * 2 + frame[10:]


def heic_header() -> bytes:
    """Return the start of a HEIC file: an ISO base media "ftyp" box with the heic and mif1 brands."""
    return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 32


def cmyk_jpeg() -> bytes:
    """Return a 32x16 CMYK JPEG, white on the left half and red on the right half."""
    image = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    image.paste((0, 255, 255, 0), (16, 0, 32, 16))
    return encode(image, "JPEG", quality=95)


def gradient(size: tuple[int, int]) -> np.ndarray:
    """Return a uint8 array of shape [height, width] that rises from 0 at the left edge to 255 at the right."""
    width, height = size
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))


def larger_than(min_bytes: int) -> bytes:
    """Return a valid noise PNG of more than min_bytes bytes. Noise does not compress, so 3 bytes per pixel remain."""
    side_px = int((min_bytes / 3) ** 0.5) + 64
    return encode(noise_image((side_px, side_px)), "PNG", compress_level=1)


@dataclass(frozen=True)
class CorpusCase:
    """One object to upload: its key below the job's prefix, its bytes and the expected result.

    ``expected_error`` is a key of ``producer.constants.ERROR_CODES``, or ``None`` when the image must
    be classified.
    """

    key: str
    data: bytes
    expected_error: str | None


def _decodable_cases() -> list[CorpusCase]:
    grey = gradient((64, 48))
    palette = Image.fromarray(grey).convert("P")
    cases = [
        ("pixels-1x1.png", encode(Image.new("RGB", (1, 1), RED), "PNG")),
        ("pixels-1x5000.png", encode(Image.fromarray(gradient((1, 5000))), "PNG")),
        ("pixels-5000x1.png", encode(Image.fromarray(gradient((5000, 1))), "PNG")),
        ("grey-16bit.png", encode(Image.fromarray(grey.astype(np.uint16) * 257).convert("I;16"), "PNG")),
        ("grey-32bit-int.tif", int32_row_tiff([-1000, 0, 1000, 70000])),
        ("grey-32bit-float.tif", float_row_tiff([0.0, 0.25, 1.0, float("nan")])),
        ("cmyk.jpg", cmyk_jpeg()),
        ("palette-transparent.png", encode(palette, "PNG", transparency=0)),
        ("grey-alpha-LA.png", encode(Image.fromarray(grey).convert("LA"), "PNG")),
        ("colour-alpha-RGBA.png", encode(row_image("RGBA", [(255, 0, 0, 128), (0, 0, 255, 0)]), "PNG")),
        ("animated.gif", animated("GIF", duration=100, loop=0)),
        ("animated.webp", animated("WEBP", duration=100, lossless=True)),
        ("progressive.jpg", encode(noise_image((64, 48)), "JPEG", quality=90, progressive=True)),
        ("lossy.webp", encode(noise_image((64, 48)), "WEBP", quality=80)),
        ("plain.bmp", encode(noise_image((40, 30)), "BMP")),
        ("multipage.tif", animated("TIFF")),
        ("png-named.jpg", encode(noise_image((40, 30)), "PNG")),
    ]
    cases += [(f"orientation-{value}.jpg", oriented_jpeg(value)) for value in range(2, 9)]
    cases += [(f"giant-screen-{name}.gif", giant_screen_gif(9400)) for name in ("a", "b", "c")]
    return [CorpusCase(key, data, None) for key, data in cases]


def _rejected_cases(max_image_bytes: int) -> list[CorpusCase]:
    red = Image.new("RGB", (16, 16), RED)
    cases = [
        ("zero-bytes.jpg", b"", "decode_error"),
        ("truncated.jpg", truncated_image("JPEG"), "decode_error"),
        ("truncated.png", truncated_image("PNG"), "decode_error"),
        ("text-named.jpg", b"this is a plain text file, not an image\n", "decode_error"),
        ("html-named.jpg", b"<!DOCTYPE html>\n<html><body><img src='cat.jpg'></body></html>\n", "decode_error"),
        ("binary-noise.png", bytes(range(256)) * 16, "decode_error"),
        ("bomb-30000x30000.png", bomb_png(), "too_many_pixels"),
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "unsupported_format"),
        ("document.pdf", encode(red, "PDF"), "unsupported_format"),
        ("figure.eps", encode(red, "EPS"), "unsupported_format"),
        ("photo.heic", heic_header(), "unsupported_format"),
        ("too-large.png", larger_than(max_image_bytes), "too_large"),
        (f"{STALL_KEY_MARKER}.jpg", encode(red, "JPEG"), "fetch_timeout"),
    ]
    return [CorpusCase(key, data, code) for key, data, code in cases]


def hostile_corpus(max_image_bytes: int) -> list[CorpusCase]:
    """Return the hostile and malformed cases, sorted by key.

    ``max_image_bytes`` is the worker's CLIPFLEET_MAX_IMAGE_BYTES, which only the ``too-large.png`` case
    exceeds. The case whose key contains :data:`STALL_KEY_MARKER` is a valid image, and the test must
    stall its GET past the worker's fetch timeout for its ``fetch_timeout`` outcome.
    """
    cases = _decodable_cases() + _rejected_cases(max_image_bytes)
    return sorted(cases, key=lambda case: case.key)
