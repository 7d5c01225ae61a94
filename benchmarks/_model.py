"""In-process measurements: the full-size random checkpoint, the bare image tower, precision, decode, the pipeline."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig

from tests.support.checkpoints import END_TOKEN_ID, START_TOKEN_ID, VOCAB_SIZE, save_tokenizer

logger = logging.getLogger(__name__)

SEED = 0
WARMUP_ITERATIONS = 3
MIN_TIMED_ITERATIONS = 3


def build_vit_b32(directory: Path) -> Path:
    """Save a ViT-B/32-sized CLIP checkpoint with seeded random weights, a tokenizer and image processor.

    The towers have CLIPConfig's default (ViT-B/32) sizes. The text config uses the byte-level test vocabulary
    and its special token ids, because the text tower pools at the first eos_token_id: with the default ids
    (49406, 49407), which lie outside that vocabulary, every prompt would pool the same position.
    """
    directory.mkdir(parents=True, exist_ok=True)
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, bos_token_id=START_TOKEN_ID, eos_token_id=END_TOKEN_ID, pad_token_id=END_TOKEN_ID
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIPModel(CLIPConfig(text_config=text_config.to_dict()))
    model.save_pretrained(str(directory))
    save_tokenizer(directory)
    CLIPImageProcessorPil().save_pretrained(str(directory))
    return directory


def reference_pixels(photos: list[tuple[str, bytes]], processor: Any) -> np.ndarray:
    """Return normalised float32 pixels `[len(photos), 3, 224, 224]` from Pillow decode and the HF processor."""
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in photos]
    return processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)


def forward_image_tower(loaded: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run the image tower as the worker does: float32 pixels in, image features out, under the loaded autocast."""
    from workers.classify import forward_image_tower as worker_forward

    features = worker_forward(loaded, pixel_values.to(loaded.device))
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)  # CUDA runs asynchronously; time the finished forward pass
    return features


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def images_per_second(loaded: Any, pixels: np.ndarray, batch_size: int, min_seconds: float, statistic: str = "median") -> float:
    """Time forward_image_tower on batches of `batch_size` for at least `min_seconds` after warm-up iterations.

    With `statistic="median"`, returns `batch_size` divided by the median iteration time, which bursts of
    load from other processes on a shared machine move less than they move the mean. With `"mean"`,
    returns images over total time, comparable with the mean rate of a job.
    """
    repeats = math.ceil(batch_size / len(pixels))
    batch = torch.from_numpy(np.concatenate([pixels] * repeats)[:batch_size].copy())
    for _ in range(WARMUP_ITERATIONS):
        forward_image_tower(loaded, batch)
    durations_s: list[float] = []
    while sum(durations_s) < min_seconds or len(durations_s) < MIN_TIMED_ITERATIONS:
        started = time.perf_counter()
        forward_image_tower(loaded, batch)
        durations_s.append(time.perf_counter() - started)
    if statistic == "mean":
        return batch_size * len(durations_s) / sum(durations_s)
    return batch_size / statistics.median(durations_s)


def compare_precision(fp32: Any, other: Any, pixels: np.ndarray, labels: list[str], template: str) -> dict[str, float]:
    """Return the max abs probability difference and top-1 agreement of `other` against `fp32`.

    Both models score through the worker's own functions (label_embeddings, encode_images, score).
    """
    from workers.classify import encode_images, label_embeddings, score

    prompts = {label: [template.format(label)] for label in labels}
    probabilities = []
    for loaded in (fp32, other):
        text = label_embeddings(loaded, prompts)  # [labels, dim]
        image = encode_images(loaded, pixels)  # [images, dim]
        probabilities.append(score(image, text, loaded.logit_scale))  # [images, labels]
    reference, candidate = probabilities
    agreement = (reference.argmax(dim=-1) == candidate.argmax(dim=-1)).float().mean().item()
    return {"max_abs_diff": float((reference - candidate).abs().max()), "top1_agreement": agreement}


def compare_decode(photos: list[tuple[str, bytes]], processor: Any, max_pixels: int) -> dict[str, Any]:
    """Time Pillow + CLIPImageProcessorPil against the worker's decode and resize_and_crop, with draft on and off.

    Pixel differences are in 8-bit levels, against the processor's resized and cropped output before
    rescaling and normalisation. Returns `{"error": message}` when the worker's preprocessing is not available.
    """
    def reference(data: bytes) -> np.ndarray:
        return processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="np")["pixel_values"][0]

    result: dict[str, Any] = {"reference_ms": _ms_per_image(photos, reference)}
    try:
        from workers.images import decode_image
        from workers.preprocess import ImagePreprocessor
    except ImportError as e:
        return {**result, "error": f"workers.preprocess is not available ({e}); the worker's path was not measured"}
    preprocessor = ImagePreprocessor.from_processor(processor)
    unnormalised = [_reference_uint8_levels(data, processor) for _, data in photos]
    for name, draft_size in (("draft_on", preprocessor.draft_size), ("draft_off", None)):
        try:
            def worker_path(data: bytes, draft_size: Any = draft_size) -> np.ndarray:
                image = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
                return np.asarray(preprocessor.resize_and_crop(image))
            outputs = [worker_path(data) for _, data in photos]
        except TypeError as e:
            return {**result, "error": f"decode_image does not take draft_size yet ({e})"}
        differences = [np.abs(out.astype(np.float32) - ref) for out, ref in zip(outputs, unnormalised)]
        result[name] = {
            "ms": _ms_per_image(photos, worker_path),
            "max_abs_diff": float(max(diff.max() for diff in differences)),
            "mean_abs_diff": float(np.mean([diff.mean() for diff in differences])),
        }
    return result


def _reference_uint8_levels(data: bytes, processor: Any) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    output = processor(images=image, return_tensors="np", do_rescale=False, do_normalize=False)
    return output["pixel_values"][0].astype(np.float32)  # [3, 224, 224] in 0-255


def _ms_per_image(photos: list[tuple[str, bytes]], function: Callable[[bytes], Any]) -> float:
    started = time.perf_counter()
    for _, data in photos:
        function(data)
    return 1000.0 * (time.perf_counter() - started) / len(photos)


def pipeline_rate(pipe: Any, paths: list[str], labels: list[str], template: str, batch_size: int) -> float:
    """Return images/s of a zero-shot-image-classification pipeline that reads and decodes the files itself."""
    started = time.perf_counter()
    outputs = pipe(paths, candidate_labels=labels, hypothesis_template=template, batch_size=batch_size)
    elapsed_s = time.perf_counter() - started
    if len(outputs) != len(paths):
        raise RuntimeError(f"pipeline returned {len(outputs)} results for {len(paths)} images")
    return len(paths) / elapsed_s
