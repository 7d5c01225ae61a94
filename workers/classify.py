"""Zero-shot scoring: CLIP's image and text towers, cosine similarity, softmax over labels, top-k.

Scores are CLIP's own: L2-normalised embeddings, cosine similarity times `logit_scale.exp()`, softmax over
the labels. A label with several prompts uses the normalised mean of its normalised prompt embeddings.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from workers.model import LoadedModel

logger = logging.getLogger(__name__)

# Prompts per text tower pass. On a 2-core CPU with the ViT-B/32 text tower, batches of 16 or 32 length-sorted
# prompts encoded 76 prompts/s, against 62 for 64 and 54 for 256 (benchmarks/prompt_cache.py, docs/benchmarks.md).
# NOTE: not measured on a GPU, where larger batches may be faster.
TEXT_BATCH_SIZE = 32
MAX_TRUNCATION_WARNINGS = 20
# transformers stores a huge placeholder model_max_length when a tokenizer has no limit of its own.
_NO_LIMIT_TOKENS = 1_000_000


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected features, and 4.x returns the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalise(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(p=2, dim=-1, keepdim=True)


@torch.inference_mode()
def encode_prompts(loaded: LoadedModel, prompts: list[str]) -> torch.Tensor:
    """Return L2-normalised float32 text embeddings, `[len(prompts), dim]`, on the CPU.

    Prompts longer than the model's text context (77 tokens for OpenAI's CLIP checkpoints) are truncated,
    and each truncated prompt is logged as a warning.
    """
    warn_truncated_prompts(loaded, prompts)
    # Batches of prompts with similar token counts pad less. Padding changes a prompt's embedding by float
    # rounding only, because CLIP's text tower masks it and pools at the end token.
    order = _by_token_count(loaded, prompts)
    chunks = []
    for start in range(0, len(prompts), TEXT_BATCH_SIZE):
        batch = [prompts[index] for index in order[start : start + TEXT_BATCH_SIZE]]
        tokens = loaded.tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(loaded.device)
        features = _pooled(loaded.model.get_text_features(**tokens)).float()  # [chunk, dim]
        chunks.append(_normalise(features).cpu())
    encoded = torch.cat(chunks)  # [prompts, dim], in the order of `order`
    in_order = torch.empty_like(encoded)
    in_order[torch.tensor(order)] = encoded
    return in_order


def _by_token_count(loaded: LoadedModel, prompts: list[str]) -> list[int]:
    """Return the indices of `prompts` sorted by token count after truncation, ties in input order."""
    counts = [len(ids) for ids in loaded.tokenizer(prompts, truncation=True, verbose=False)["input_ids"]]
    return sorted(range(len(prompts)), key=counts.__getitem__)


def max_prompt_tokens(loaded: LoadedModel) -> int | None:
    """Return the most tokens the text tower reads: the tokenizer's and the position embeddings' smaller limit."""
    limits = []
    tokenizer_limit = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _NO_LIMIT_TOKENS:
        limits.append(tokenizer_limit)
    text_config = getattr(loaded.model.config, "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


def warn_truncated_prompts(loaded: LoadedModel, prompts: list[str]) -> list[tuple[str, int]]:
    """Log a warning for each prompt longer than `max_prompt_tokens`, and return `(prompt, token_count)` pairs.

    Counts include the start and end tokens. At most MAX_TRUNCATION_WARNINGS prompts are logged one by one.
    """
    max_tokens = max_prompt_tokens(loaded)
    if max_tokens is None or not prompts:
        return []
    counts = [len(ids) for ids in loaded.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
    long_prompts = [(prompt, count) for prompt, count in zip(prompts, counts) if count > max_tokens]
    for prompt, count in long_prompts[:MAX_TRUNCATION_WARNINGS]:
        quoted = prompt if len(prompt) <= 100 else prompt[:97] + "..."
        logger.warning("Prompt %r has %d tokens; it is truncated to the model's %d", quoted, count, max_tokens)
    if len(long_prompts) > MAX_TRUNCATION_WARNINGS:
        logger.warning("%d more prompts are truncated to %d tokens", len(long_prompts) - MAX_TRUNCATION_WARNINGS, max_tokens)
    return long_prompts


def label_embeddings(loaded: LoadedModel, prompts: dict[str, list[str]]) -> torch.Tensor:
    """Return one normalised embedding per label, `[labels, dim]` float32, in the order of `prompts`."""
    flat = [prompt for label_prompts in prompts.values() for prompt in label_prompts]
    encoded = encode_prompts(loaded, flat)  # [prompts, dim]
    rows = []
    start = 0
    for label_prompts in prompts.values():
        mean = encoded[start : start + len(label_prompts)].mean(dim=0)
        rows.append(mean / mean.norm(p=2))
        start += len(label_prompts)
    return torch.stack(rows)


@torch.inference_mode()
def forward_image_tower(loaded: LoadedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Return the image features, `[batch, dim]` float32 on the model's device, of normalised float32
    `pixel_values` `[batch, 3, H, W]` on that device, computed in the loaded dtype (autocast below float32)."""
    autocast = loaded.dtype != torch.float32
    with torch.autocast(loaded.device.type, dtype=loaded.dtype, enabled=autocast):
        features = _pooled(loaded.model.get_image_features(pixel_values=pixel_values))
    return features.float()


@torch.inference_mode()
def encode_images(loaded: LoadedModel, pixels: np.ndarray) -> torch.Tensor:
    """Return L2-normalised float32 image embeddings, `[batch, dim]`, on the CPU.

    `pixels` `[batch, 3, H, W]` is either uint8, resized and cropped by `loaded.preprocessor` and normalised
    here, or float32 that the image processor has already normalised.
    """
    tensor = torch.from_numpy(pixels).to(loaded.device)
    if tensor.dtype == torch.uint8:
        tensor = loaded.preprocessor.normalize(tensor)
    return _normalise(forward_image_tower(loaded, tensor)).cpu()


def score(image_embeddings: torch.Tensor, label_embeddings_: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Return softmax probabilities over labels, `[images, labels]`, from normalised embeddings."""
    logits = logit_scale * image_embeddings @ label_embeddings_.T  # [images, labels]
    return logits.softmax(dim=-1)


def top_k_rows(probabilities: torch.Tensor, labels: list[str], k: int) -> list[list[dict[str, Any]]]:
    """Return, per image, the `k` best labels with their scores, highest first.

    `probabilities` `[images, labels]` may contain any scores, such as the cosine similarities of multi-label jobs.
    """
    values, indices = probabilities.topk(min(k, len(labels)), dim=-1)
    return [
        [{"label": labels[i], "score": float(v)} for v, i in zip(row_values.tolist(), row_indices.tolist())]
        for row_values, row_indices in zip(values, indices)
    ]
