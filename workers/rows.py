"""Result rows of classified images, from image and label embeddings and the job's scoring options.

Single-label jobs (the default) score with CLIP's softmax over the labels. Multi-label jobs report the raw
cosine similarity of the image and each label embedding, so every label is judged on its own. In both modes
`JobSpec.threshold`, when set, drops the `top_k` entries that score below it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from producer.spec import JobSpec
from workers.classify import score, top_k_rows

logger = logging.getLogger(__name__)


def build_result_rows(
    uris: Sequence[str],
    image_embeddings: torch.Tensor,
    label_embeddings: torch.Tensor,
    spec: JobSpec,
    logit_scale: float,
) -> list[dict[str, Any]]:
    """Return one result row `{"uri", "label", "score", "top_k", "error": None}` per image, in `uris` order.

    `image_embeddings` `[images, dim]` and `label_embeddings` `[labels, dim]`, in `spec.label_names` order,
    are L2-normalised float32 tensors on one device. `logit_scale` is the model's `logit_scale.exp()`, used
    by single-label jobs only. `top_k` contains at most `spec.top_k` entries, highest score first, and only
    those scoring at least `spec.threshold` when it is set. `label` and `score` are its first entry, or
    None when no entry is left. Raises ValueError when `uris` and `image_embeddings` differ in length.
    """
    if len(uris) != image_embeddings.shape[0]:
        raise ValueError(f"{len(uris)} URIs for {image_embeddings.shape[0]} image embeddings; give one URI per image")
    if spec.multi_label:
        scores = cosine_similarities(image_embeddings, label_embeddings)
    else:
        scores = score(image_embeddings, label_embeddings, logit_scale)
    rows = []
    for uri, top in zip(uris, top_k_rows(scores, spec.label_names, spec.top_k)):
        passing = above_threshold(top, spec.threshold)
        best = passing[0] if passing else {"label": None, "score": None}
        rows.append({"uri": uri, "label": best["label"], "score": best["score"], "top_k": passing, "error": None})
    return rows


def cosine_similarities(image_embeddings: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
    """Return `[images, labels]` cosine similarities of L2-normalised embeddings, each in [-1, 1]."""
    return image_embeddings @ label_embeddings.T


def above_threshold(top: list[dict[str, Any]], threshold: float | None) -> list[dict[str, Any]]:
    """Return the entries of `top` whose score is at least `threshold`, or all of them when it is None."""
    if threshold is None:
        return top
    return [entry for entry in top if entry["score"] >= threshold]
