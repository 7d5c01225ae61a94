"""Photo-like benchmark JPEGs, the benchmark's label sets, and a description of the machine."""

from __future__ import annotations

import datetime
import io
import os
import platform
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"
PHOTO_NAMES = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")
MIN_CROP_FRACTION = 0.6
MIN_LONG_SIDE_PX = 300
MAX_LONG_SIDE_PX = 1000
NOISE_SIGMA = 4.0  # in 8-bit levels; it gives the JPEGs a photo-like entropy instead of smooth upscaled areas
MIN_QUALITY = 75
MAX_QUALITY = 95

LABEL_WORDS = (
    "cat", "dog", "rocket", "coffee", "astronaut", "bicycle", "mountain", "river", "bridge", "castle",
    "forest", "beach", "guitar", "piano", "lamp", "chair", "clock", "kettle", "tractor", "canoe",
    "owl", "tiger", "zebra", "parrot", "lizard", "tulip", "cactus", "volcano", "glacier", "desert",
    "harbor", "lighthouse", "train", "airplane", "helmet", "umbrella", "sandwich", "pizza", "violin", "camera",
)  # fmt: skip


def generate_photos(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Return `count` `(name, jpeg_bytes)` pairs derived from the test photos; equal seeds give equal bytes.

    Each image is a random crop (at least 60% of each side) of one photo, resized with BICUBIC to a long side
    of 300-1000 px, flipped at random, with Gaussian noise (sigma 4) and JPEG quality 75-95.
    """
    sources = [Image.open(PHOTOS_DIR / name).convert("RGB") for name in PHOTO_NAMES]
    rng = np.random.default_rng(seed)
    return [(f"img-{index:05d}.jpg", _derive_photo(sources[index % len(sources)], rng)) for index in range(count)]


def _derive_photo(source: Image.Image, rng: np.random.Generator) -> bytes:
    width, height = source.size
    crop_width = int(width * rng.uniform(MIN_CROP_FRACTION, 1.0))
    crop_height = int(height * rng.uniform(MIN_CROP_FRACTION, 1.0))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    image = source.crop((left, top, left + crop_width, top + crop_height))

    long_side_px = int(rng.integers(MIN_LONG_SIDE_PX, MAX_LONG_SIDE_PX + 1))
    scale = long_side_px / max(crop_width, crop_height)
    size = (max(1, round(crop_width * scale)), max(1, round(crop_height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, NOISE_SIGMA, size=pixels.shape).astype(np.float32)
    noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG", quality=int(rng.integers(MIN_QUALITY, MAX_QUALITY + 1)))
    return buffer.getvalue()


def describe_photos(photos: list[tuple[str, bytes]]) -> str:
    """Return one line with the count, mean size and size range of the photos."""
    sizes_kb = [len(data) / 1024 for _, data in photos]
    dimensions = [Image.open(io.BytesIO(data)).size for _, data in photos]
    long_sides = [max(size) for size in dimensions]
    short_sides = [min(size) for size in dimensions]
    return (
        f"{len(photos)} JPEGs, mean {np.mean(sizes_kb):.0f} KB ({min(sizes_kb):.0f}-{max(sizes_kb):.0f} KB), "
        f"long side {min(long_sides)}-{max(long_sides)} px, short side {min(short_sides)}-{max(short_sides)} px"
    )


def make_labels(count: int) -> list[str]:
    """Return `count` distinct labels: the words of LABEL_WORDS, then the words followed by a number."""
    labels = []
    for index in range(count):
        word = LABEL_WORDS[index % len(LABEL_WORDS)]
        round_number = index // len(LABEL_WORDS)
        labels.append(word if round_number == 0 else f"{word} {round_number}")
    return labels


def machine_info() -> dict[str, object]:
    """Return the CPU model and flags that matter for bfloat16, core count, library versions and the UTC date."""
    import torch
    import transformers

    cpu_model = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "x86_64"):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
