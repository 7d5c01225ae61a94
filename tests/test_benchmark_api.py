"""The API benchmark's quick mode answers every request through a live server and worker, and reports its figures.

Speed is not asserted: on shared machines the tiny checkpoint's timings mean nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
QUICK_REQUESTS = 64
QUICK_CLIENTS = 8


@pytest.fixture(scope="module")
def quick_result() -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "benchmarks/api.py", "--quick", "--clients", str(QUICK_CLIENTS)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def test_quick_load_answers_every_request(quick_result: dict[str, Any]) -> None:
    api = quick_result["api"]
    assert api["failed"] == 0, api["first_failures"]
    assert api["succeeded"] == QUICK_REQUESTS
    assert 0 < api["p50_ms"] <= api["p99_ms"]
    assert math.isfinite(quick_result["ratio_api_to_bare"])
    assert quick_result["ratio_api_to_bare"] > 0


def test_quick_worker_batches_concurrent_requests(quick_result: dict[str, Any]) -> None:
    calls = quick_result["worker_embed_calls"]
    # The calls of the load phase answered its requests, and with 8 clients at least one call answered several.
    assert calls["calls"] >= 1
    assert round(calls["mean_requests_per_call"] * calls["calls"]) == QUICK_REQUESTS
    assert calls["max_requests_per_call"] > 1


def test_quick_single_client_answered(quick_result: dict[str, Any]) -> None:
    single = quick_result["api_one_client"]
    assert single["failed"] == 0, single["first_failures"]
    assert single["succeeded"] == 20


def test_quick_batch_job_classifies_every_image(quick_result: dict[str, Any]) -> None:
    job = quick_result["job"]
    assert job["state"] == "succeeded"
    assert job["succeeded"] == quick_result["images"]


def test_percentile_uses_nearest_rank() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.api import percentile

    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))
