"""Tests for workers.preprocess.ImagePreprocessor against transformers' CLIPImageProcessorPil, and for draft decoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.models.clip.image_processing_clip import CLIPImageProcessor as TorchvisionCLIPImageProcessor

from tests.support.corpus import encode, exif_with_orientation
from workers.images import decode_image
from workers.preprocess import (
    DRAFT_MEAN_ABS_DIFF_LEVELS,
    DRAFT_P99_ABS_DIFF_LEVELS,
    NORMALIZE_TOLERANCE,
    ImagePreprocessor,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")
MAX_PIXELS = 50_000_000
# The bound the pipeline needs, in normalised units, on the full path (resize_and_crop, then normalize).
EXACT_TOLERANCE = 1e-5

# (width, height) of noise images: odd and even, portrait and landscape, upscaled, and at the aspect limit.
EXACT_SIZES = [
    (1, 1),
    (7, 3),
    (3, 500),
    (50, 70),
    (223, 224),
    (224, 224),
    (225, 300),
    (300, 225),
    (451, 300),
    (640, 427),
    (1000, 999),
    (4000, 1000),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def noise(size: tuple[int, int], seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def processor_output(processor, image: Image.Image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"][0]


def fast_output(preprocessor: ImagePreprocessor, image: Image.Image, device: str = "cpu") -> np.ndarray:
    pixels = torch.from_numpy(preprocessor.resize_and_crop(image)).unsqueeze(0).to(device)
    return preprocessor.normalize(pixels)[0].cpu().numpy()


def max_difference(processor, image: Image.Image) -> float:
    preprocessor = ImagePreprocessor.from_processor(processor)
    return float(np.abs(fast_output(preprocessor, image) - processor_output(processor, image)).max())


@pytest.fixture(scope="module")
def clip_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil()


@pytest.fixture(scope="module")
def checkpoint_processor(tiny_clip_dir: Path) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil.from_pretrained(str(tiny_clip_dir))


@pytest.fixture(scope="module", params=["default", "checkpoint"])
def processor(request):
    return request.getfixturevalue(f"{'clip' if request.param == 'default' else 'checkpoint'}_processor")


# --- exactness against the processor ---------------------------------------------------------


@pytest.mark.parametrize("size", EXACT_SIZES, ids=[f"{w}x{h}" for w, h in EXACT_SIZES])
def test_exact_noise_image(processor, size):
    assert max_difference(processor, noise(size)) <= EXACT_TOLERANCE


@pytest.mark.parametrize("name", PHOTOS)
def test_exact_photo(processor, name):
    image = decode_image((DATA_DIR / name).read_bytes(), max_pixels=MAX_PIXELS)
    assert max_difference(processor, image) <= EXACT_TOLERANCE


def test_exact_after_aspect_crop(clip_processor):
    # decode_image crops 5000x1000 to its centred 4000x1000.
    image = decode_image(encode(noise((5000, 1000)), "PNG"), max_pixels=MAX_PIXELS)
    assert max_difference(clip_processor, image) <= EXACT_TOLERANCE


@pytest.mark.parametrize("size", [(1, 1), (224, 224), (451, 300), (300, 451)], ids=["1x1", "224", "451x300", "300x451"])
def test_resize_and_crop_equals_processor_pixels(clip_processor, size):
    """The uint8 output, rescaled as the processor does, is bit-exact, not merely within tolerance."""
    image = noise(size)
    pixels = ImagePreprocessor.from_processor(clip_processor).resize_and_crop(image)
    unnormalised = clip_processor(images=image, do_normalize=False, do_rescale=False, return_tensors="np")
    assert np.array_equal(pixels, unnormalised["pixel_values"][0])


def test_resize_and_crop_array_layout(clip_processor):
    pixels = ImagePreprocessor.from_processor(clip_processor).resize_and_crop(noise((451, 300)))
    assert pixels.dtype == np.uint8
    assert pixels.shape == (3, 224, 224)
    assert pixels.flags.c_contiguous


# Configurations that from_processor accepts, with image sizes that exercise their padding and resize rules.
SUPPORTED_CONFIGS = {
    "crop-larger-than-resize": {"crop_size": {"height": 256, "width": 300}},
    "odd-crop-padding": {"size": {"shortest_edge": 100}, "crop_size": {"height": 151, "width": 123}},
    "height-width-resize-no-crop": {"size": {"height": 100, "width": 300}, "do_center_crop": False},
    "int-size-shortest-edge": {"size": 200, "default_to_square": False},
    "no-resize": {"do_resize": False},
    "no-normalize": {"do_normalize": False},
    "no-rescale": {"do_rescale": False},
    "small-std": {"image_std": [0.001, 0.002, 0.003]},
    "scalar-mean-std": {"image_mean": 0.5, "image_std": 0.5},
    "bilinear": {"resample": Image.Resampling.BILINEAR},
    "nearest": {"resample": Image.Resampling.NEAREST},
    "lanczos": {"resample": Image.Resampling.LANCZOS},
}
CONFIG_SIZES = [(1, 1), (50, 70), (80, 41), (451, 300)]


@pytest.mark.parametrize("name", sorted(SUPPORTED_CONFIGS))
@pytest.mark.parametrize("size", CONFIG_SIZES, ids=[f"{w}x{h}" for w, h in CONFIG_SIZES])
def test_exact_supported_config(name, size):
    processor = CLIPImageProcessorPil(**SUPPORTED_CONFIGS[name])
    assert max_difference(processor, noise(size)) <= EXACT_TOLERANCE


@pytest.mark.parametrize(
    ("mode", "fill"),
    [("L", 90), ("RGBA", (200, 10, 10, 100)), ("LA", (60, 0)), ("P", 3)],
    ids=["L", "RGBA", "LA", "P"],
)
def test_exact_non_rgb_input(clip_processor, mode, fill):
    image = Image.new(mode, (300, 200), fill)
    image.paste(Image.new(mode, (100, 100)), (50, 50))
    assert max_difference(clip_processor, image) <= EXACT_TOLERANCE


def test_exact_rgb_with_transparency_key(clip_processor):
    image = noise((300, 200))
    image.info["transparency"] = tuple(int(v) for v in np.asarray(image)[0, 0])
    assert max_difference(clip_processor, image) <= EXACT_TOLERANCE


# --- normalize -----------------------------------------------------------------------------------


def every_level_image() -> Image.Image:
    """Return a 16x16 RGB image that contains every 8-bit value once in each channel, in different orders."""
    levels = np.arange(256, dtype=np.uint8)
    channels = [levels, levels[::-1], np.roll(levels, 85)]
    return Image.fromarray(np.stack([channel.reshape(16, 16) for channel in channels], axis=-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "config",
    [{}, {"image_std": [0.001, 0.002, 0.003]}, {"do_rescale": False}, {"do_normalize": False}],
    ids=["clip", "small-std", "no-rescale", "no-normalize"],
)
def test_normalize_every_level(device, config):
    """normalize() stays within NORMALIZE_TOLERANCE of the processor for all 256 values of each channel."""
    processor = CLIPImageProcessorPil(do_resize=False, crop_size={"height": 16, "width": 16}, **config)
    preprocessor = ImagePreprocessor.from_processor(processor)
    image = every_level_image()
    difference = np.abs(fast_output(preprocessor, image, device) - processor_output(processor, image)).max()
    assert difference <= NORMALIZE_TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_keeps_device_and_shape(clip_processor, device):
    pixels = torch.zeros((2, 3, 224, 224), dtype=torch.uint8, device=device)
    result = ImagePreprocessor.from_processor(clip_processor).normalize(pixels)
    assert result.dtype == torch.float32
    assert result.device.type == device
    assert tuple(result.shape) == (2, 3, 224, 224)


def test_normalize_batch_matches_single(clip_processor):
    preprocessor = ImagePreprocessor.from_processor(clip_processor)
    arrays = [preprocessor.resize_and_crop(noise(size, seed)) for seed, size in enumerate([(300, 200), (224, 500)])]
    batch = preprocessor.normalize(torch.from_numpy(np.stack(arrays)))
    single = preprocessor.normalize(torch.from_numpy(arrays[1]).unsqueeze(0))
    assert torch.equal(batch[1], single[0])


@pytest.mark.parametrize(
    "pixels",
    [torch.zeros((1, 3, 4, 4), dtype=torch.float32), torch.zeros((3, 4, 4), dtype=torch.uint8),
     torch.zeros((1, 4, 4, 4), dtype=torch.uint8)],
    ids=["float32", "three-dims", "four-channels"],
)
def test_normalize_rejects_input(clip_processor, pixels):
    with pytest.raises(ValueError, match="uint8"):
        ImagePreprocessor.from_processor(clip_processor).normalize(pixels)


# --- configuration ---------------------------------------------------------------------------------


def test_clip_output_size(clip_processor):
    assert ImagePreprocessor.from_processor(clip_processor).output_size == (224, 224)


@pytest.mark.parametrize(
    ("config", "expected"),
    [({}, 224), ({"size": {"height": 100, "width": 300}}, 300), ({"do_resize": False}, None)],
    ids=["shortest-edge", "height-width", "no-resize"],
)
def test_draft_size(config, expected):
    assert ImagePreprocessor.from_processor(CLIPImageProcessorPil(**config)).draft_size == expected


class ResizeOverridingProcessor(CLIPImageProcessorPil):
    def resize(self, image, size, resample=None, **kwargs):
        return super().resize(image, size, resample=resample, **kwargs)


# (case id, processor builder, text the message must contain)
UNSUPPORTED = [
    ("longest-edge", lambda: CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 300}), "size="),
    ("max-height-width", lambda: CLIPImageProcessorPil(size={"max_height": 224, "max_width": 300}), "size="),
    ("pad", lambda: CLIPImageProcessorPil(do_pad=True, pad_size={"height": 300, "width": 300}), "do_pad"),
    ("no-rescale-no-normalize", lambda: CLIPImageProcessorPil(do_rescale=False, do_normalize=False), "do_rescale"),
    ("zero-std", lambda: CLIPImageProcessorPil(image_std=[0.0, 1.0, 1.0]), "image_std"),
    ("two-means", lambda: CLIPImageProcessorPil(image_mean=[0.5, 0.5]), "image_mean"),
    ("no-crop-varying-shape", lambda: CLIPImageProcessorPil(do_center_crop=False), "do_center_crop"),
    ("unknown-resample", lambda: CLIPImageProcessorPil(resample=99), "resample"),
    # Built without __init__, which needs torchvision, an optional dependency.
    ("torchvision-backend", lambda: object.__new__(TorchvisionCLIPImageProcessor), "PilBackend"),
    ("resample-none", lambda: CLIPImageProcessorPil(resample=None), "resample"),
    ("overridden-resize", ResizeOverridingProcessor, "PilBackend.resize"),
    ("not-a-processor", object, "PilBackend"),
]


@pytest.mark.parametrize(("case_id", "build", "field"), UNSUPPORTED, ids=[case[0] for case in UNSUPPORTED])
def test_unsupported_config_rejected(case_id, build, field):
    with pytest.raises(ValueError, match=field):
        ImagePreprocessor.from_processor(build())


def test_rejects_non_image(clip_processor):
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        ImagePreprocessor.from_processor(clip_processor).resize_and_crop(np.zeros((4, 4, 3), dtype=np.uint8))


def test_rejects_non_rgb_without_conversion():
    preprocessor = ImagePreprocessor.from_processor(CLIPImageProcessorPil(do_convert_rgb=False))
    with pytest.raises(ValueError, match="mode 'L'"):
        preprocessor.resize_and_crop(Image.new("L", (10, 10)))


def test_rejects_malformed_draft_box(clip_processor):
    image = noise((300, 200))
    image.info.update({"clipfleet_full_size": (600, 400), "clipfleet_draft_box": (0, 0, 301, 200)})
    with pytest.raises(ValueError, match="clipfleet_draft_box"):
        ImagePreprocessor.from_processor(clip_processor).resize_and_crop(image)


# --- draft decoding --------------------------------------------------------------------------------


def photo_like_jpeg(index: int, seed: int = 1234) -> bytes:
    """Return a JPEG made from a random crop of a test photo, scaled to a 300-1000 px short side, with mild noise."""
    rng = np.random.default_rng(seed + index)
    with Image.open(DATA_DIR / PHOTOS[index % len(PHOTOS)]) as photo:
        source = photo.convert("RGB")
    crop_width = int(source.width * rng.uniform(0.5, 1.0))
    crop_height = int(source.height * rng.uniform(0.5, 1.0))
    left = int(rng.integers(0, source.width - crop_width + 1))
    top = int(rng.integers(0, source.height - crop_height + 1))
    crop = source.crop((left, top, left + crop_width, top + crop_height))

    scale = int(rng.integers(300, 1001)) / min(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    resized = np.asarray(crop.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = np.clip(resized + rng.normal(0.0, 3.0, resized.shape), 0, 255).round().astype(np.uint8)
    return encode(Image.fromarray(noisy), "JPEG", quality=int(rng.integers(75, 96)))


def draft_differences(preprocessor: ImagePreprocessor, data: bytes) -> np.ndarray:
    """Return |draft - full| of resize_and_crop's output, in 0-255 levels."""
    full = preprocessor.resize_and_crop(decode_image(data, max_pixels=MAX_PIXELS))
    drafted = preprocessor.resize_and_crop(decode_image(data, max_pixels=MAX_PIXELS, draft_size=preprocessor.draft_size))
    return np.abs(full.astype(np.int16) - drafted.astype(np.int16))


DRAFT_CASES = [f"photo-{name}" for name in PHOTOS] + [f"generated-{index}" for index in range(24)]


def draft_case_data(case: str) -> bytes:
    if case.startswith("photo-"):
        return (DATA_DIR / case.removeprefix("photo-")).read_bytes()
    return photo_like_jpeg(int(case.removeprefix("generated-")))


@pytest.mark.parametrize("case", DRAFT_CASES)
def test_draft_tolerance_mean(clip_processor, case):
    differences = draft_differences(ImagePreprocessor.from_processor(clip_processor), draft_case_data(case))
    assert float(differences.mean()) <= DRAFT_MEAN_ABS_DIFF_LEVELS


@pytest.mark.parametrize("case", DRAFT_CASES)
def test_draft_tolerance_p99(clip_processor, case):
    differences = draft_differences(ImagePreprocessor.from_processor(clip_processor), draft_case_data(case))
    assert float(np.percentile(differences, 99)) <= DRAFT_P99_ABS_DIFF_LEVELS


def test_draft_tolerance_cases_are_drafted():
    """Most generated cases have a short side of at least 448 px, so the tolerance tests above reduce them."""
    drafted = 0
    for case in DRAFT_CASES:
        data = draft_case_data(case)
        if decode_image(data, max_pixels=MAX_PIXELS, draft_size=224).size != decode_image(data, max_pixels=MAX_PIXELS).size:
            drafted += 1
    assert drafted >= 15


def wave_pattern(size: tuple[int, int], period_px: float = 60.0) -> Image.Image:
    """Return smooth sine waves along x (red), y (green) and the diagonal (blue), on which a shifted sampling grid shows."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 100 * np.sin(2 * np.pi * x / period_px)
    green = 128 + 100 * np.sin(2 * np.pi * y / period_px)
    blue = 128 + 100 * np.sin(2 * np.pi * (x + y) / (1.5 * period_px))
    return Image.fromarray(np.stack([red, green, blue], axis=-1).round().astype(np.uint8))


@pytest.fixture(scope="module")
def waves_1001x503() -> Image.Image:
    return wave_pattern((1001, 503))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_orientation_keeps_sampling_grid(clip_processor, waves_1001x503, orientation):
    """With draft, each EXIF orientation samples the places of the full decode.

    The draft reduces 1001x503 to 501x252, whose last column and row cover one stored pixel instead of two.
    Measured mean differences are 0.47-0.48 levels. A region mapped to the wrong side moves the grid by
    one stored pixel and gives 3.8-7.4.
    """
    data = encode(waves_1001x503, "JPEG", quality=95, subsampling=0, exif=exif_with_orientation(orientation))
    differences = draft_differences(ImagePreprocessor.from_processor(clip_processor), data)
    assert float(differences.mean()) <= 1.0


@pytest.mark.parametrize("orientation", [1, 6])
def test_draft_aspect_crop_keeps_sampling_grid(clip_processor, orientation):
    """A 2403x451 JPEG is reduced to 1202x226, then cropped with the full decode's 4:1 region (measured 0.50-0.51)."""
    image = wave_pattern((2403, 451))
    data = encode(image, "JPEG", quality=95, subsampling=0, exif=exif_with_orientation(orientation))
    differences = draft_differences(ImagePreprocessor.from_processor(clip_processor), data)
    assert float(differences.mean()) <= 1.0


def test_draft_box_of_rounded_up_size():
    decoded = decode_image(encode(wave_pattern((1001, 503)), "JPEG"), max_pixels=MAX_PIXELS, draft_size=224)
    assert decoded.info["clipfleet_draft_box"] == (0.0, 0.0, 500.5, 251.5)


def test_draft_box_after_rotation():
    # Orientation 6 rotates 90 degrees clockwise, so the short last stored row becomes the first column.
    data = encode(wave_pattern((1001, 503)), "JPEG", exif=exif_with_orientation(6))
    decoded = decode_image(data, max_pixels=MAX_PIXELS, draft_size=224)
    assert decoded.info["clipfleet_draft_box"] == (0.5, 0.0, 252.0, 500.5)


def test_draft_ignored_without_resize():
    preprocessor = ImagePreprocessor.from_processor(CLIPImageProcessorPil(do_resize=False))
    data = io.BytesIO()
    noise((1000, 800)).save(data, "JPEG")
    assert decode_image(data.getvalue(), max_pixels=MAX_PIXELS, draft_size=preprocessor.draft_size).size == (1000, 800)
