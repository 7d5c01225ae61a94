"""Limits on the work one image may cause: JPEG scan count, header-sized pixel budget, float conversions."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.support.corpus import encode, noise_image
from workers.images import MAX_JPEG_SCANS, ImageError, PixelBudget, decode_image, image_pixels, to_rgb

MAX_PIXELS = 89_478_485


def progressive_jpeg_with_scans(extra_scans: int) -> bytes:
    """Return a progressive JPEG whose last scan is repeated `extra_scans` more times."""
    data = encode(noise_image((64, 48)), "JPEG", quality=90, progressive=True)
    last_scan = data.rindex(b"\xff\xda")
    body, end = data[last_scan:-2], data[-2:]
    return data[:-2] + body * extra_scans + end


def test_normal_progressive_jpeg_scans() -> None:
    data = encode(noise_image((64, 48)), "JPEG", quality=90, progressive=True)
    assert 1 < data.count(b"\xff\xda") <= MAX_JPEG_SCANS


def test_repeated_scans_rejected() -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(progressive_jpeg_with_scans(MAX_JPEG_SCANS), max_pixels=MAX_PIXELS)
    assert caught.value.code == "decode_error"
    assert "scans" in caught.value.message


def test_scans_at_limit_decode() -> None:
    data = progressive_jpeg_with_scans(0)
    extra = MAX_JPEG_SCANS - data.count(b"\xff\xda")
    image = decode_image(progressive_jpeg_with_scans(extra), max_pixels=MAX_PIXELS)
    assert image.size == (64, 48)


def test_image_pixels_from_header() -> None:
    assert image_pixels(encode(noise_image((40, 30)), "PNG")) == 1200


def test_image_pixels_gif_logical_screen() -> None:
    frame = encode(Image.new("P", (1, 1)), "GIF")
    # Bytes 6-9 of a GIF hold the logical screen's width and height (little-endian 16-bit).
    huge_screen = frame[:6] + (9400).to_bytes(2, "little") * 2 + frame[10:]
    assert image_pixels(huge_screen) == 9400 * 9400


def test_image_pixels_unreadable() -> None:
    assert image_pixels(b"not an image") == 0


def test_budget_blocks_until_released() -> None:
    budget = PixelBudget(100)
    second_started = threading.Event()

    def second() -> None:
        with budget.reserve(60):
            second_started.set()

    with budget.reserve(60):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        assert not second_started.is_set()
    thread.join(timeout=5)
    assert second_started.is_set()


def test_budget_admits_what_fits() -> None:
    budget = PixelBudget(100)
    with budget.reserve(40), budget.reserve(60):
        assert budget.in_use_pixels == 100
    assert budget.in_use_pixels == 0


def test_oversized_image_runs_alone() -> None:
    budget = PixelBudget(100)
    with budget.reserve(10_000):
        assert budget.in_use_pixels == 100


def test_budget_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        PixelBudget(0)


def test_float_image_values_scaled() -> None:
    values = np.array([[0.0, 2.0, 4.0, np.nan, np.inf, -np.inf]], dtype=np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(values, mode="F")))
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 0, 255, 0]


def test_float_image_unit_range() -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(values, mode="F")))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]
