"""Decode untrusted image bytes into RGB Pillow images for CLIP preprocessing.

Contract of :func:`decode_image`:

- Pillow parses the bytes only with the plugins in :data:`ALLOWED_FORMATS`.
- The pixel limit is checked from the header, before any pixel data is decoded.
- The result is a fully loaded ``PIL.Image.Image`` in mode ``"RGB"``, upright (EXIF orientation
  applied), and contains the first frame of animated or multi-page files.
- An image whose long side is more than :data:`MAX_ASPECT_RATIO` times its short side is cropped
  to its centred ``MAX_ASPECT_RATIO:1`` region (see :func:`crop_to_aspect_ratio`).
- With ``draft_size``, a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale (libjpeg's DCT
  scaling) at which both its sides stay at least ``draft_size`` pixels, so its pixels differ
  slightly from a full decode. The pixel limit still applies to the size in the header, and the
  orientation and the aspect-ratio crop are applied to the reduced image, whose ``info`` then
  contains :data:`FULL_SIZE_INFO_KEY` and :data:`DRAFT_BOX_INFO_KEY`. Other formats ignore
  ``draft_size``.
- Every per-image failure raises :class:`ImageError`, whose ``code`` is a key of
  ``producer.constants.ERROR_CODES``. Pillow exceptions never escape. ``MemoryError`` does,
  because it signals a worker short of memory rather than a bad image.

The module keeps no state between calls, so concurrent calls from several threads are safe.
ICC profiles are ignored, so pixels are used as stored, as ``transformers.image_utils.load_image``
also does.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from producer.constants import ERROR_CODES

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

MAX_PIXELS_SETTING = "CLIPFLEET_MAX_IMAGE_PIXELS"

# CLIP's image processors scale the short side to the input size (224 px for ViT-B/32) and then keep
# only the centred square. For a 5000x1 image that scaling first builds a 1,120,000x224 image, which
# took CLIPImageProcessorPil 7.6 s and 2.4 GB (transformers 5.25, Pillow 13, a 2-core x86-64 machine).
# Cropping the long side to 4 times the short side before the processor bounds that cost, and the
# square that the processor keeps lies inside the cropped region.
MAX_ASPECT_RATIO = 4

# image.info keys of a JPEG that decode_image reduced with draft. FULL_SIZE_INFO_KEY is the
# (width, height) that a full decode would have returned, and DRAFT_BOX_INFO_KEY the float
# (left, top, right, bottom) region of the reduced image that covers the same pixels. Resizing
# that region to a size computed from the full size samples the same places as resizing the full
# decode (workers.preprocess.ImagePreprocessor.resize_and_crop does so).
FULL_SIZE_INFO_KEY = "clipfleet_full_size"
DRAFT_BOX_INFO_KEY = "clipfleet_draft_box"
# EXIF orientations that swap width and height (transpose, transverse and the 90 degree rotations).
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_PREMULTIPLIED_ALPHA_MODES = ("La", "RGBa")

# ISO base media file brands (the "ftyp" box) of still-image formats the workers reject.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary header)"),
    (b"8BPS", "PSD"),
    (b"SIMPLE  =", "FITS"),
)
_UTF8_BOM = b"\xef\xbb\xbf"
_JPEG_START = b"\xff\xd8\xff"
_JPEG_START_OF_SCAN = b"\xff\xda"
# libjpeg decodes every scan of a progressive JPEG, so a small file that repeats its last scan thousands of
# times costs minutes of CPU (2,000 copies took 16.8 s for 4000x4000 pixels). Encoders write about 10 scans
# (libjpeg-turbo's default progressive script has 10); 100 leaves ample room. In entropy-coded data every
# 0xFF byte is followed by 0x00, so the two-byte start-of-scan marker appears only as a marker.
MAX_JPEG_SCANS = 100
_TEXT_PREFIX_BYTES = 1024


class ImageError(Exception):
    """A failure that belongs to one image, from reading or decoding it, reported in its result row.

    ``code`` is a key of ``producer.constants.ERROR_CODES``, and ``message`` explains the failure.
    The exception pickles, so it can cross process boundaries.

    Raises:
        ValueError: ``code`` is not a key of ``ERROR_CODES``.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"invalid image error code {code!r}, expected one of {sorted(ERROR_CODES)}")
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode ``data`` into a fully loaded, upright ``"RGB"`` image.

    ``max_pixels`` caps ``width * height`` and is checked from the header before pixels are
    decoded. Pillow's own decompression-bomb check, which reads the global
    ``PIL.Image.MAX_IMAGE_PIXELS``, still runs inside ``Image.open``. Its error, raised above
    twice that global (about 179 million pixels by default), is reported as ``too_many_pixels``
    whatever ``max_pixels`` is. Its warning, issued above the global itself, is reported the
    same way where warning filters turn it into an exception, and is only emitted otherwise.

    ``draft_size``, when given, lets a JPEG decode at 1/2, 1/4 or 1/8 scale, the smallest at which
    both sides stay at least ``draft_size`` pixels, through Pillow's ``draft``. A JPEG whose short
    side is under ``2 * draft_size`` decodes at full size. Callers pass the smallest side that
    their later resize needs (see ``workers.preprocess.ImagePreprocessor.draft_size``).

    Raises:
        ImageError: ``decode_error`` for empty, truncated, corrupt or unrecognised data,
            ``unsupported_format`` for a recognised format outside :data:`ALLOWED_FORMATS`
            (SVG/XML, PDF, PostScript/EPS, HEIC/HEIF, AVIF, PSD, FITS), and
            ``too_many_pixels`` when the image is larger than ``max_pixels``.
        ValueError: ``max_pixels`` is not a positive integer, or ``draft_size`` is neither
            ``None`` nor a positive integer.
        MemoryError: the worker ran out of memory.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if draft_size is not None and (
        isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size < 1
    ):
        raise ValueError(f"draft_size must be None or a positive integer, got {draft_size!r}")
    if not data:
        raise ImageError("decode_error", "the image data is empty (0 bytes)")

    if data.startswith(_JPEG_START):
        _check_jpeg_scans(data)

    detected_format = detect_unsupported_format(data)
    if detected_format is not None:
        raise ImageError(
            "unsupported_format",
            f"the data is a {detected_format} file, which the workers do not decode. "
            f"Convert it to one of {', '.join(ALLOWED_FORMATS)}",
        )

    try:
        return _decode_first_frame(data, max_pixels, draft_size)
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            "too_many_pixels",
            f"Pillow rejected the image as a possible decompression bomb: {e} Pillow's limit is "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}, and the limit from "
            f"{MAX_PIXELS_SETTING} is {max_pixels}",
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(
            "decode_error",
            f"the data ({len(data)} bytes) is not a readable {', '.join(ALLOWED_FORMATS)} image",
        ) from e
    except Exception as e:
        # Pillow's plugins raise many exception types on malformed input (OSError, SyntaxError,
        # ValueError, struct.error, EOFError, IndexError, KeyError and others), so the catch is broad.
        raise ImageError("decode_error", f"failed to decode the image: {type(e).__name__}: {e}") from e


def _check_jpeg_scans(data: bytes) -> None:
    scans = data.count(_JPEG_START_OF_SCAN)
    if scans > MAX_JPEG_SCANS:
        raise ImageError(
            "decode_error",
            f"the JPEG has {scans} scans, above the limit of {MAX_JPEG_SCANS}; encoders write about 10, "
            "so the file is corrupt or crafted to exhaust the decoder",
        )


def image_pixels(data: bytes) -> int:
    """Return width × height from the image header, or 0 when the header cannot be read.

    It reads the header only, with the same allow-list as :func:`decode_image`, so callers can reserve
    memory for the decode before it starts. Animated GIFs report their logical screen, which every
    frame is drawn onto.
    """
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - decode_image reports the same data with its own error code
        return 0
    return max(width, 0) * max(height, 0)


class PixelBudget:
    """A limit on the pixels of the images that a worker process decodes at the same time.

    Decoding, converting and preprocessing an image takes memory in proportion to its pixels, whatever
    the file size. A 35-byte GIF with a 9400 x 9400 screen took the process to 1.6 GB, about 20 bytes per
    pixel at peak, most of it in the CLIP image processor. So a few small files with huge headers could
    exhaust the worker's memory when its fetch threads decode them together. :meth:`reserve` blocks until the image's
    pixels fit. An image larger than the whole budget waits until no other image is being decoded, then
    runs alone. Thread-safe.
    """

    def __init__(self, capacity_pixels: int) -> None:
        if capacity_pixels < 1:
            raise ValueError(f"capacity_pixels must be positive, got {capacity_pixels}")
        self.capacity_pixels = capacity_pixels
        self.in_use_pixels = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget (at most all of it) while the block runs."""
        amount = min(max(pixels, 0), self.capacity_pixels)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use_pixels + amount <= self.capacity_pixels)
            self.in_use_pixels += amount
        try:
            yield
        finally:
            with self._changed:
                self.in_use_pixels -= amount
                self._changed.notify_all()


def detect_unsupported_format(data: bytes) -> str | None:
    """Return the name of a known unsupported format that ``data`` starts with, or ``None``.

    Only magic bytes are read, so ``None`` does not mean that the data is a valid image.
    """
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name

    text_start = data[:_TEXT_PREFIX_BYTES]
    if text_start.startswith(_UTF8_BOM):
        text_start = text_start[len(_UTF8_BOM) :]
    if text_start.lstrip().lower().startswith((b"<svg", b"<?xml")):
        return "SVG/XML"

    return _detect_heif_family(data)


def _detect_heif_family(data: bytes) -> str | None:
    # An ISO base media file starts with a box: 4-byte big-endian size, "ftyp", the major brand,
    # a 4-byte minor version, then 4-byte compatible brands up to the end of the box.
    if len(data) < 12 or data[4:8] != b"ftyp":
        return None
    box_size_bytes = int.from_bytes(data[0:4], "big")
    brands_end = min(max(box_size_bytes, 16), len(data), 512)
    brands = {data[8:12]}
    brands.update(data[offset : offset + 4] for offset in range(16, brands_end - 3, 4))
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIC/HEIF"
    return None


def _decode_first_frame(data: bytes, max_pixels: int, draft_size: int | None) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
        _check_pixel_count(image.size, max_pixels)
        header_size = image.size
        draft_box = _request_jpeg_draft(image, draft_size) if draft_size is not None else None
        # A freshly opened file is at its first frame (or first TIFF page), and load()
        # decodes only that frame.
        image.load()
        if draft_box is not None and image.size != header_size:
            return _upright_drafted(image, header_size, draft_box)
        upright = ImageOps.exif_transpose(image)
        return to_rgb(crop_to_aspect_ratio(upright, MAX_ASPECT_RATIO))


def _request_jpeg_draft(image: Image.Image, draft_size: int) -> tuple[float, float, float, float] | None:
    """Request draft decoding and return the region of the reduced image that covers the stored image."""
    # Pillow 13's JpegImageFile.draft decodes at scale 1/s, with s the largest of 8, 4, 2 and 1 that
    # is at most min(width // draft_size, height // draft_size), so both sides stay >= draft_size.
    # The reduced size is rounded up, so its last row and column cover less than s pixels, and
    # the returned box (0, 0, width / s, height / s) is the part that covers the stored image.
    # Mode None keeps the decoder's colour mode, because draft changes it only when asked for "L"
    # or "YCbCr". So greyscale, CMYK and YCCK files go through the same colour conversion as
    # without draft (greyscale and CMYK are tested). MPO files (format "MPO") are JPEGs too.
    if image.format not in ("JPEG", "MPO"):
        return None
    requested = image.draft(None, (draft_size, draft_size))
    return None if requested is None else requested[1]


def _upright_drafted(
    image: Image.Image, header_size: tuple[int, int], draft_box: tuple[float, float, float, float]
) -> Image.Image:
    """Orient and crop an image that draft reduced, and record where the full decode's pixels lie in it.

    The aspect-ratio crop is computed on the full size, as without draft, and widened to whole
    pixels of the reduced image, so the recorded box lies inside the result.
    """
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    full_width, full_height = header_size
    if orientation in _TRANSPOSING_ORIENTATIONS:
        full_width, full_height = full_height, full_width
    region = _oriented_box(draft_box, image.size, orientation)
    upright = ImageOps.exif_transpose(image)

    kept_region = aspect_ratio_box((full_width, full_height), MAX_ASPECT_RATIO)
    x_scale = (region[2] - region[0]) / full_width
    y_scale = (region[3] - region[1]) / full_height
    kept_box = (
        region[0] + kept_region[0] * x_scale,
        region[1] + kept_region[1] * y_scale,
        region[0] + kept_region[2] * x_scale,
        region[1] + kept_region[3] * y_scale,
    )
    crop = (
        max(math.floor(kept_box[0]), 0),
        max(math.floor(kept_box[1]), 0),
        min(math.ceil(kept_box[2]), upright.width),
        min(math.ceil(kept_box[3]), upright.height),
    )
    if crop != (0, 0, *upright.size):
        upright = upright.crop(crop)

    result = to_rgb(upright)
    result.info[FULL_SIZE_INFO_KEY] = (kept_region[2] - kept_region[0], kept_region[3] - kept_region[1])
    result.info[DRAFT_BOX_INFO_KEY] = (
        max(kept_box[0] - crop[0], 0.0),
        max(kept_box[1] - crop[1], 0.0),
        min(kept_box[2] - crop[0], float(result.width)),
        min(kept_box[3] - crop[1], float(result.height)),
    )
    return result


def _oriented_box(
    box: tuple[float, float, float, float], size: tuple[int, int], orientation: int
) -> tuple[float, float, float, float]:
    """Return ``box`` of an image of ``size`` after ImageOps.exif_transpose applies ``orientation``."""
    left, top, right, bottom = box
    width, height = size
    boxes = {
        2: (width - right, top, width - left, bottom),  # mirror left to right
        3: (width - right, height - bottom, width - left, height - top),  # rotate 180 degrees
        4: (left, height - bottom, right, height - top),  # mirror top to bottom
        5: (top, left, bottom, right),  # transpose
        6: (height - bottom, left, height - top, right),  # rotate 90 degrees clockwise
        7: (height - bottom, width - right, height - top, width - left),  # transverse
        8: (top, width - right, bottom, width - left),  # rotate 90 degrees anticlockwise
    }
    return boxes.get(orientation, box)


def aspect_ratio_box(size: tuple[int, int], max_ratio: int) -> tuple[int, int, int, int]:
    """Return the ``(left, top, right, bottom)`` region that :func:`crop_to_aspect_ratio` keeps of an image of ``size``."""
    width, height = size
    if width > height * max_ratio:
        kept_width = height * max_ratio
        left = (width - kept_width) // 2
        return left, 0, left + kept_width, height
    if height > width * max_ratio:
        kept_height = width * max_ratio
        top = (height - kept_height) // 2
        return 0, top, width, top + kept_height
    return 0, 0, width, height


def crop_to_aspect_ratio(image: Image.Image, max_ratio: int) -> Image.Image:
    """Return the centred region of ``image`` whose long side is at most ``max_ratio`` times its short side.

    An image within the ratio is returned unchanged (the same object). When the excess is odd, the
    extra pixel is cut from the right or bottom edge. ``image.info`` (such as a transparency key) is kept.
    """
    box = aspect_ratio_box(image.size, max_ratio)
    if box == (0, 0, *image.size):
        return image
    return image.crop(box)


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError("decode_error", f"the image header declares an empty size {width}x{height}")
    pixel_count = width * height
    if pixel_count > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"the image is {width}x{height} = {pixel_count} pixels, above the limit of {max_pixels}. "
            f"Raise {MAX_PIXELS_SETTING} to accept larger images",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded Pillow image of any mode to a new ``"RGB"`` image.

    - Transparency (an alpha channel, a transparent palette entry or a transparent colour key)
      is composited on a white background, so transparent pixels become white.
    - 16-bit greyscale (``I;16*``) maps 0..65535 to 0..255 by dividing by 257 and rounding,
      and pixels equal to a transparent grey key become white.
    - ``I`` (32-bit signed) is treated as 16-bit when every value lies in 0..65535. Otherwise
      min..max is stretched linearly to 0..255, and a constant image is clipped to 0..255.
    - ``F`` (32-bit float): values in 0..1 are multiplied by 255. Otherwise min..max of the
      finite values is stretched to 0..255, and a constant image is clipped to 0..255. NaN
      becomes 0, +inf 255 and -inf 0.
    - Every other mode (``P``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) goes
      through Pillow's ``convert("RGB")``.

    Raises:
        ValueError: Pillow has no conversion from the image's mode to RGB.
    """
    mode = image.mode
    if mode in _PREMULTIPLIED_ALPHA_MODES:
        return _premultiplied_on_white(image)
    if mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(_sixteen_bit_on_white(image))
    if mode == "I":
        return _grey_to_rgb(_scale_int32(np.asarray(image)))
    if mode == "F":
        return _grey_to_rgb(_scale_float(np.asarray(image)))
    if image.has_transparency_data:
        return _alpha_on_white(image.convert("RGBA"))
    return image.convert("RGB")


def _alpha_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _premultiplied_on_white(image: Image.Image) -> Image.Image:
    # With colour c already multiplied by alpha a, "c over white" is c + (255 - a).
    # Keeping the stored values avoids rounding twice (unpremultiply, then composite).
    pixels = np.asarray(image).astype(np.int16)
    colour = pixels[..., :-1]
    alpha = pixels[..., -1:]
    composited = np.clip(colour + (255 - alpha), 0, 255).astype(np.uint8)
    if composited.shape[-1] == 1:
        return _grey_to_rgb(composited[..., 0])
    return Image.fromarray(composited)


def _sixteen_bit_on_white(image: Image.Image) -> np.ndarray:
    # A 16-bit PNG marks transparency with one grey value (tRNS chunk), stored in info["transparency"].
    values = np.asarray(image)
    grey = _scale_sixteen_bit(values)
    transparent_value = image.info.get("transparency")
    if isinstance(transparent_value, int):
        grey[values == transparent_value] = 255
    return grey


def _scale_sixteen_bit(values: np.ndarray) -> np.ndarray:
    # (v + 128) // 257 is v / 257 rounded to the nearest integer, so 65535 -> 255 and 32896 -> 128.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _scale_int32(values: np.ndarray) -> np.ndarray:
    low = int(values.min())
    high = int(values.max())
    if low >= 0 and high <= 65535:
        return _scale_sixteen_bit(values)
    # float64 keeps every int32 exact; float32 would round values above 2**24 by up to 1 in 10**7.
    return _stretch(values.astype(np.float64), low, high)


def _scale_float(values: np.ndarray) -> np.ndarray:
    # One writable float32 copy, changed in place, so a large image costs about 9 bytes per pixel
    # (the copy, two masks and the uint8 result) instead of several float64 arrays.
    values = np.array(values, dtype=np.float32)
    positive_infinity = values == np.inf
    negative_infinity = values == -np.inf
    not_a_number = np.isnan(values)
    values[positive_infinity | negative_infinity] = np.nan
    if np.isnan(values).all():
        return np.where(positive_infinity, 255, 0).astype(np.uint8)

    low = float(np.nanmin(values))
    high = float(np.nanmax(values))
    if low >= 0.0 and high <= 1.0:
        np.nan_to_num(values, copy=False, nan=0.0)
        values *= 255.0
    else:
        np.nan_to_num(values, copy=False, nan=low)
        _stretch_in_place(values, low, high)
    np.rint(values, out=values)
    scaled = values.astype(np.uint8)
    scaled[positive_infinity] = 255
    scaled[negative_infinity] = 0
    scaled[not_a_number] = 0
    return scaled


def _stretch_in_place(values: np.ndarray, low: float, high: float) -> None:
    if high == low:
        np.clip(values, 0, 255, out=values)
        return
    values -= low
    values *= 255.0 / (high - low)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high == low:
        return np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8)).convert("RGB")
