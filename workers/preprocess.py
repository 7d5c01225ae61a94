"""Reproduce a CLIP image processor in two faster steps: uint8 resize and crop, then batched normalisation.

``transformers.CLIPImageProcessorPil`` (transformers 5.25) turns each image into float32
``[3, H, W]`` in one call. :class:`ImagePreprocessor` splits that work. :meth:`~ImagePreprocessor.resize_and_crop`
runs in the fetch threads and keeps uint8 pixels, which are a quarter of the size and skip the
float conversion there. :meth:`~ImagePreprocessor.normalize` runs once per batch on the model's device.
Together they give the processor's output within :data:`NORMALIZE_TOLERANCE`. A JPEG decoded with
draft (``workers.images.decode_image`` with ``draft_size=ImagePreprocessor.draft_size``) is faster
to decode but gives slightly different pixels, bounded for photographs by
:data:`DRAFT_MEAN_ABS_DIFF_LEVELS` and :data:`DRAFT_P99_ABS_DIFF_LEVELS`.

Supported processor configurations, checked by :meth:`ImagePreprocessor.from_processor`, which
raises ``ValueError`` for anything else so that the caller can run the processor itself:

- the class is ``transformers.image_processing_backends.PilBackend`` or a subclass that overrides
  none of the methods used for preprocessing (``CLIPImageProcessorPil`` overrides only ``__init__``).
  The torchvision backend (``CLIPImageProcessor`` in transformers 5) resizes with torch, which
  this module does not reproduce;
- ``do_resize`` off, or ``size`` as ``{"shortest_edge"}`` or ``{"height", "width"}``.
  ``longest_edge``, ``max_height``/``max_width`` and ``min_pixels``/``max_pixels`` are rejected;
- ``resample`` one of Pillow's filters (the processor itself rejects ``None`` when it resizes);
- ``do_center_crop`` with ``crop_size`` ``{"height", "width"}``. Without the crop the output
  shape must still be fixed, so ``size`` must then be ``{"height", "width"}``;
- ``do_rescale`` and ``do_normalize`` in any combination except both off (the processor then
  returns uint8, not float32). ``image_mean`` and ``image_std`` are one number or three, and every
  ``image_std`` value is finite and non-zero;
- ``do_pad`` off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import get_size_dict
from transformers.image_transforms import convert_to_rgb

from workers.images import DRAFT_BOX_INFO_KEY, FULL_SIZE_INFO_KEY

logger = logging.getLogger(__name__)

# Maximum absolute difference, in normalised units, between normalize() and the processor's float32
# output for the same uint8 pixels. normalize() uses one multiply and one add per value when that
# form stays within this bound for all 256 values of each channel. Otherwise it looks up the
# processor's own values in a table, which is exact but was 5.5 times slower for a batch of 32 on
# one core of a 2-core x86-64 machine. For the OpenAI CLIP mean and std the multiply-add form
# differs by at most 4.8e-7.
NORMALIZE_TOLERANCE = 1e-6

# Bounds on how far draft decoding (decode_image with draft_size=ImagePreprocessor.draft_size) moves
# one image's resize_and_crop output from that of a full decode, in 0-255 levels, for CLIP's
# 224 px input: the mean absolute difference over the output, and its 99th percentile. They were
# measured with transformers 5.25 and Pillow 13 on photo-like JPEGs: crops of the photos in
# tests/data resized to a 300-1000 px short side, with Gaussian noise of sigma 3 levels, at JPEG
# quality 75-95. Over 58 drafted images the largest mean was 1.49 (median 0.49) and the largest
# 99th percentile 12 (median 3). astronaut.jpg gave 1.27 and 11. tests/workers/test_preprocess.py asserts the
# bounds on 24 such images and the four photos.
# NOTE: these bound photographs. Images with sharp edges or fine patterns (text, line art, noise)
# differ more, because libjpeg's DCT scaling filters differently from Pillow's resize.
DRAFT_MEAN_ABS_DIFF_LEVELS = 2.0
DRAFT_P99_ABS_DIFF_LEVELS = 16.0

# The PilBackend methods that CLIPImageProcessorPil.__call__ runs for a PIL image. A subclass that
# overrides any of them may compute different pixels.
_PREPROCESSING_METHODS = (
    "__call__",
    "preprocess",
    "_merge_and_standardize_kwargs",
    "_standardize_kwargs",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "_prepare_images_structure",
    "fetch_images",
    "process_image",
    "convert_to_rgb",
    "_preprocess",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
)
_PIL_FILTERS = frozenset(int(resampling) for resampling in Image.Resampling)


class ImagePreprocessor:
    """Resize, crop and normalise images as a ``PilBackend`` image processor does, in two steps.

    Build it with :meth:`from_processor`. :meth:`resize_and_crop` is safe to call from several
    threads at once. :meth:`normalize` caches constants per device and is meant to be called from
    one thread. Concurrent first calls on a new device would build the same constants twice,
    which is harmless.

    Attributes:
        output_size: ``(height, width)`` of every array that :meth:`resize_and_crop` returns.
        draft_size: the short side, in pixels, that a decoded image must keep so that draft
            decoding (``workers.images.decode_image(draft_size=...)``) changes the resize input
            only by libjpeg's own scaling. It is ``None`` when the processor does not resize,
            because any draft would then change the output's scale.
    """

    def __init__(
        self,
        *,
        shortest_edge: int | None,
        resize_size: tuple[int, int] | None,
        crop_size: tuple[int, int] | None,
        resample: Image.Resampling,
        convert_rgb: bool,
        normalized_values: np.ndarray,
        scale: np.ndarray,
        offset: np.ndarray,
    ) -> None:
        """Store a checked configuration. Use :meth:`from_processor`, which checks and derives the arguments.

        ``shortest_edge`` or ``resize_size`` (``(height, width)``) selects the resize, or neither
        for none. ``normalized_values`` is float32 ``[3, 256]``, the processor's output for each
        uint8 value of each channel. ``scale`` and ``offset`` are float32 ``[3]``, the multiply-add
        form of the same mapping.
        """
        self._shortest_edge = shortest_edge
        self._resize_size = resize_size
        self._crop_size = crop_size
        self._resample = resample
        self._convert_rgb = convert_rgb
        self._normalized_values = normalized_values
        self._scale = scale
        self._offset = offset
        self._use_multiply_add = _multiply_add_error(normalized_values, scale, offset) <= NORMALIZE_TOLERANCE
        self._device_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        self.output_size: tuple[int, int] = _output_size(resize_size, crop_size)
        self.draft_size: int | None = _draft_size(shortest_edge, resize_size)

    @classmethod
    def from_processor(cls, processor: Any) -> ImagePreprocessor:
        """Build a preprocessor that reproduces ``processor``, a transformers ``PilBackend`` image processor.

        The module docstring lists the supported configurations.

        Raises:
            ValueError: ``processor`` has a class or setting that this module does not reproduce
                exactly. The message names the field and its value.
        """
        _check_processor_class(processor)
        if getattr(processor, "do_pad", None):
            raise ValueError(f"do_pad={processor.do_pad!r} is not supported: padding to pad_size is not reproduced")

        shortest_edge, resize_size = _read_resize(processor)
        crop_size = _read_crop(processor)
        if crop_size is None and resize_size is None:
            raise ValueError(
                f"do_center_crop={processor.do_center_crop!r} with do_resize={processor.do_resize!r} and "
                f"size={_size_text(processor.size)} gives outputs of varying shapes, which cannot be stacked"
            )
        normalized_values, scale, offset = _read_normalization(processor)
        return cls(
            shortest_edge=shortest_edge,
            resize_size=resize_size,
            crop_size=crop_size,
            resample=_read_resample(processor),
            convert_rgb=bool(getattr(processor, "do_convert_rgb", None)),
            normalized_values=normalized_values,
            scale=scale,
            offset=offset,
        )

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        """Return uint8 ``[3, height, width]`` (``output_size``), contiguous: the processor's pixels before rescaling.

        The steps and their rounding are the processor's: RGB conversion (transparency on white)
        when ``do_convert_rgb`` is set, Pillow's resize with the processor's filter and its output
        size rules, and a centre crop whose top-left corner is ``((h - crop_h) // 2, (w - crop_w) // 2)``.
        Along a side shorter than the crop, the image is placed at offset ``ceil((crop - side) / 2)``
        and the rest is filled with 0, as ``transformers.image_transforms.center_crop`` does.

        For a JPEG that ``decode_image`` reduced with draft, the resized size comes from the full
        size recorded in ``image.info``, and the resize reads the recorded box of the reduced image.
        The output then samples the same places as for a full decode (see
        ``workers.images.FULL_SIZE_INFO_KEY``).

        Raises:
            TypeError: ``image`` is not a ``PIL.Image.Image``.
            ValueError: ``do_convert_rgb`` is off and the image is not in mode ``"RGB"``, or the
                draft entries of ``image.info`` are malformed.
        """
        rgb = self._to_rgb(image)
        full_size, draft_box = _draft_geometry(image)
        resized_size = self._resized_size(full_size)
        if resized_size is not None and (resized_size != rgb.size or draft_box is not None):
            rgb = rgb.resize(resized_size, resample=self._resample, box=draft_box)
        pixels = np.asarray(rgb)
        if self._crop_size is None:
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))
        return _center_crop(pixels, self._crop_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return float32 ``[batch, 3, H, W]`` on ``pixels``' device: the processor's output for these uint8 pixels.

        ``pixels`` is uint8 ``[batch, 3, H, W]``, as stacked from :meth:`resize_and_crop`. The result
        differs from the processor's float32 output by at most :data:`NORMALIZE_TOLERANCE`.

        Raises:
            ValueError: ``pixels`` is not uint8 or not ``[batch, 3, H, W]``.
        """
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"pixels must be uint8 [batch, 3, H, W], got {pixels.dtype} {list(pixels.shape)}; "
                "stack the arrays from resize_and_crop"
            )
        first, second = self._constants_for(pixels.device)
        if self._use_multiply_add:
            return pixels.to(torch.float32).mul_(first).add_(second)
        return first[pixels.to(torch.int64) + second]

    def _to_rgb(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        # The processor composites on white exactly when the image has an alpha band or a
        # transparency key. An RGB image without a key converts to itself, so it is used as is.
        if image.mode == "RGB" and (not self._convert_rgb or image.info.get("transparency") is None):
            return image
        if not self._convert_rgb:
            raise ValueError(
                f"the image is in mode {image.mode!r}, but do_convert_rgb is off, so only 'RGB' images "
                "are supported; convert it first, for example with workers.images.to_rgb"
            )
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """Return the ``(width, height)`` that the processor resizes to, or ``None`` without a resize."""
        if self._resize_size is not None:
            height, width = self._resize_size
            return width, height
        if self._shortest_edge is None:
            return None
        # transformers.image_transforms.get_resize_output_image_size with default_to_square=False:
        # the short side becomes shortest_edge and the long side is truncated, not rounded.
        width, height = size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self._shortest_edge, int(self._shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def _constants_for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        constants = self._device_constants.get(device)
        if constants is not None:
            return constants
        if self._use_multiply_add:
            constants = (
                torch.from_numpy(self._scale).to(device).view(1, 3, 1, 1),
                torch.from_numpy(self._offset).to(device).view(1, 3, 1, 1),
            )
        else:
            # Channel c's values start at index 256 * c of the flattened table.
            channel_starts = torch.arange(3, dtype=torch.int64).mul_(256).view(1, 3, 1, 1)
            constants = (
                torch.from_numpy(self._normalized_values.reshape(-1)).to(device),
                channel_starts.to(device),
            )
        self._device_constants[device] = constants
        return constants


def _draft_geometry(image: Image.Image) -> tuple[tuple[int, int], tuple[float, float, float, float] | None]:
    """Return the size that a full decode would have, and the region to resize, ``None`` for all of it.

    For a JPEG that ``decode_image`` reduced with draft these come from ``image.info``, so the
    resized size and crop offsets are those of the full decode.
    """
    full_size = image.info.get(FULL_SIZE_INFO_KEY)
    draft_box = image.info.get(DRAFT_BOX_INFO_KEY)
    if full_size is None and draft_box is None:
        return image.size, None
    if not _is_size(full_size) or not _is_box(draft_box, image.size):
        raise ValueError(
            f"image.info[{FULL_SIZE_INFO_KEY!r}]={full_size!r} and image.info[{DRAFT_BOX_INFO_KEY!r}]={draft_box!r} "
            f"must be a (width, height) and a (left, top, right, bottom) inside the {image.size} image, "
            "as workers.images.decode_image sets them"
        )
    return full_size, draft_box


def _is_size(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in value)
    )


def _is_box(value: Any, size: tuple[int, int]) -> bool:
    if not (isinstance(value, tuple) and len(value) == 4 and all(isinstance(edge, (int, float)) for edge in value)):
        return False
    left, top, right, bottom = value
    return 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]


def _check_processor_class(processor: Any) -> None:
    processor_class = type(processor)
    if not isinstance(processor, PilBackend):
        raise ValueError(
            f"image processor class {processor_class.__name__} is not a transformers PilBackend "
            "(for CLIP, load CLIPImageProcessorPil), so its resize is not reproduced"
        )
    for name in _PREPROCESSING_METHODS:
        if getattr(processor_class, name) is not getattr(PilBackend, name):
            raise ValueError(
                f"image processor class {processor_class.__name__} overrides PilBackend.{name}, "
                "so its output is not reproduced"
            )


def _read_resize(processor: Any) -> tuple[int | None, tuple[int, int] | None]:
    """Return ``(shortest_edge, (height, width))``, one of them set, or both ``None`` without a resize."""
    if not getattr(processor, "do_resize", None):
        return None, None
    # The processor standardises size with the same call, so an int follows default_to_square.
    size = get_size_dict(processor.size, default_to_square=getattr(processor, "default_to_square", True))
    if set(size) == {"shortest_edge"}:
        return _positive_int("size['shortest_edge']", size["shortest_edge"]), None
    if set(size) == {"height", "width"}:
        return None, (_positive_int("size['height']", size["height"]), _positive_int("size['width']", size["width"]))
    raise ValueError(
        f"size={_size_text(processor.size)} is not supported; supported sizes are "
        "{'shortest_edge': n} and {'height': h, 'width': w}"
    )


def _read_crop(processor: Any) -> tuple[int, int] | None:
    if not getattr(processor, "do_center_crop", None):
        return None
    crop = get_size_dict(processor.crop_size, param_name="crop_size")
    if set(crop) != {"height", "width"}:
        raise ValueError(f"crop_size={_size_text(processor.crop_size)} is not supported; it must be {{'height', 'width'}}")
    return _positive_int("crop_size['height']", crop["height"]), _positive_int("crop_size['width']", crop["width"])


def _read_resample(processor: Any) -> Image.Resampling:
    resample = getattr(processor, "resample", None)
    if not getattr(processor, "do_resize", None):
        return Image.Resampling.NEAREST  # unused without a resize
    if isinstance(resample, bool) or not isinstance(resample, int) or int(resample) not in _PIL_FILTERS:
        raise ValueError(f"resample={resample!r} is not supported; it must be one of Pillow's filters {sorted(_PIL_FILTERS)}")
    return Image.Resampling(int(resample))


def _read_normalization(processor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the processor's float32 output for every uint8 value, ``[3, 256]``, and its multiply-add form."""
    do_rescale = bool(getattr(processor, "do_rescale", None))
    do_normalize = bool(getattr(processor, "do_normalize", None))
    if not do_rescale and not do_normalize:
        raise ValueError("do_rescale=False with do_normalize=False is not supported: the processor then returns uint8")

    rescale_factor = _finite("rescale_factor", processor.rescale_factor) if do_rescale else 1.0
    mean, std = np.zeros(3), np.ones(3)
    if do_normalize:
        mean = _per_channel("image_mean", processor.image_mean)
        std = _per_channel("image_std", processor.image_std)
        if np.any(std == 0):
            raise ValueError(f"image_std={processor.image_std!r} contains 0, which makes the processor divide by zero")

    # The table comes from the processor's own rescale and normalize, applied to an image whose
    # row is 0..255 in every channel, so it matches the processor's rounding by construction.
    values = np.tile(np.arange(256, dtype=np.uint8), (3, 1, 1))  # [3, 1, 256]
    table = values
    if do_rescale:
        table = processor.rescale(table, rescale_factor)
    if do_normalize:
        table = processor.normalize(table, processor.image_mean, processor.image_std)
    normalized_values = np.ascontiguousarray(table.reshape(3, 256), dtype=np.float32)

    scale = (rescale_factor / std).astype(np.float32)
    offset = (-mean / std).astype(np.float32)
    return normalized_values, scale, offset


def _multiply_add_error(normalized_values: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> float:
    # float32 multiply then add, each rounded, as normalize() computes them with separate torch ops.
    levels = np.arange(256, dtype=np.float32)
    computed = levels[None, :] * scale[:, None] + offset[:, None]
    return float(np.abs(computed - normalized_values).max())


def _per_channel(name: str, value: float | Sequence[float]) -> np.ndarray:
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    if len(values) != 3:
        raise ValueError(f"{name}={value!r} must be one number or three, one per RGB channel")
    return np.array([_finite(name, item) for item in values], dtype=np.float64)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def _size_text(size: Any) -> str:
    # SizeDict iterates over its non-None fields, so dict() shows only the keys that are set.
    try:
        return repr(dict(size))
    except (TypeError, ValueError):
        return repr(size)


def _output_size(resize_size: tuple[int, int] | None, crop_size: tuple[int, int] | None) -> tuple[int, int]:
    if crop_size is not None:
        return crop_size
    if resize_size is None:
        raise ValueError("a preprocessor needs a crop size or a fixed resize size to have a fixed output shape")
    return resize_size


def _draft_size(shortest_edge: int | None, resize_size: tuple[int, int] | None) -> int | None:
    if shortest_edge is not None:
        return shortest_edge
    if resize_size is not None:
        # The resize stretches each side to its own target, so both sides must keep the larger one.
        return max(resize_size)
    return None


def _center_crop(pixels: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """Crop ``[H, W, 3]`` uint8 pixels to ``[3, crop_h, crop_w]`` as transformers' center_crop does."""
    height, width = pixels.shape[:2]
    crop_height, crop_width = crop_size
    source_top, target_top, kept_height = _crop_span(height, crop_height)
    source_left, target_left, kept_width = _crop_span(width, crop_width)
    region = pixels[source_top : source_top + kept_height, source_left : source_left + kept_width].transpose(2, 0, 1)
    if kept_height == crop_height and kept_width == crop_width:
        return np.ascontiguousarray(region)
    cropped = np.zeros((3, crop_height, crop_width), dtype=np.uint8)
    cropped[:, target_top : target_top + kept_height, target_left : target_left + kept_width] = region
    return cropped


def _crop_span(side: int, crop: int) -> tuple[int, int, int]:
    """Return ``(source start, target start, length)`` of the kept pixels along one axis."""
    if side >= crop:
        return (side - crop) // 2, 0, crop
    # A short side is centred with its odd pixel of padding at the start: ceil((crop - side) / 2).
    return 0, (crop - side + 1) // 2, side
