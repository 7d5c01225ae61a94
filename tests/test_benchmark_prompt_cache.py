"""The prompt-cache benchmark's quick mode runs end to end and reports consistent, positive figures.

Speed is not asserted beyond the warm starts being faster than the cold one: shared machines are too noisy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from producer.templates import TEMPLATE_SETS

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180
QUICK_LABELS = 20
TINY_EMBEDDING_DIM = 16  # PROJECTION_DIM of tests.support.checkpoints


@pytest.fixture(scope="module")
def quick_result() -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "benchmarks/prompt_cache.py", "--quick"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_job_size(quick_result: dict[str, Any]) -> None:
    assert quick_result["labels"] == QUICK_LABELS
    assert quick_result["prompts"] == QUICK_LABELS * len(TEMPLATE_SETS["photo"])
    assert quick_result["shape"] == [QUICK_LABELS, TINY_EMBEDDING_DIM]


def test_quick_run_timings_positive(quick_result: dict[str, Any]) -> None:
    for name in ("cold_s", "cold_text_tower_s", "warm_redis_s", "warm_process_s", "model_load_s"):
        assert positive_finite(quick_result[name]), name


def test_quick_run_warm_faster_than_cold(quick_result: dict[str, Any]) -> None:
    assert quick_result["warm_redis_s"] < quick_result["cold_s"]
    assert quick_result["warm_process_s"] < quick_result["warm_redis_s"]


def test_quick_run_entry_bytes(quick_result: dict[str, Any]) -> None:
    assert quick_result["entry_data_bytes"] == QUICK_LABELS * TINY_EMBEDDING_DIM * 4
    assert quick_result["entry_memory_usage_bytes"] >= quick_result["entry_data_bytes"]


def test_quick_run_batch_sweep(quick_result: dict[str, Any]) -> None:
    assert sorted(quick_result["text_batch_sweep"]) == ["16", "8"]
    for size, rate in quick_result["text_batch_sweep"].items():
        assert positive_finite(rate), size
