"""Range checks of a job's score threshold, which depends on whether its scores are probabilities or cosines."""

from __future__ import annotations

import math

# Softmax probabilities lie in [0, 1]; cosine similarities of unit vectors lie in [-1, 1].
PROBABILITY_RANGE = (0.0, 1.0)
COSINE_RANGE = (-1.0, 1.0)


def check_threshold(threshold: float | None, multi_label: bool) -> float | None:
    """Return `threshold` when it is None or inside the range of the job's scores.

    Raises ValueError naming the value and the range: 0 to 1 for softmax probabilities (the default), -1 to 1
    for the raw cosine similarities of a multi-label job.
    """
    if threshold is None:
        return None
    if not math.isfinite(threshold):
        raise ValueError(f"threshold {threshold!r} is not a finite number; give a number such as 0.5")
    low, high = COSINE_RANGE if multi_label else PROBABILITY_RANGE
    if low <= threshold <= high:
        return threshold
    if multi_label:
        raise ValueError(
            f"threshold {threshold!r} is outside -1 to 1: multi-label scores are cosine similarities, "
            "typically 0.15 to 0.35 for CLIP; give a threshold in that range"
        )
    hint = " or add --multi-label (multi_label=True) to threshold cosine similarities" if COSINE_RANGE[0] <= threshold <= COSINE_RANGE[1] else ""
    raise ValueError(
        f"threshold {threshold!r} is outside 0 to 1: scores are softmax probabilities over the labels; "
        f"give a threshold from 0 to 1{hint}"
    )
