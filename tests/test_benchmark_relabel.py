"""The relabel benchmark's quick mode runs its four jobs end to end and reports finite figures.

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
TIMEOUT_S = 180
QUICK_IMAGES = 8
JOBS = ("source", "full", "relabel", "relabel_same_labels")


@pytest.fixture(scope="module")
def quick_result() -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "benchmarks/relabel.py", "--quick"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


@pytest.mark.parametrize("name", JOBS)
def test_quick_job_classifies_every_image(quick_result: dict[str, Any], name: str) -> None:
    row = quick_result[name]
    assert row["state"] == "succeeded"
    assert row["succeeded"] == QUICK_IMAGES
    assert row["failed"] == 0
    assert math.isfinite(row["wall_s"])
    assert row["wall_s"] > 0


def test_quick_relabel_scores_close(quick_result: dict[str, Any]) -> None:
    # The tiny checkpoint's logit_scale is 14.3, so the float16 bound on a score is under 3% of it.
    assert 0 <= quick_result["max_abs_score_difference"] < 0.03


def test_quick_run_stores_embeddings(quick_result: dict[str, Any]) -> None:
    assert quick_result["stored_bytes"]["embeddings"] > 0
    assert quick_result["stored_bytes"]["shards"] > 0
    assert math.isfinite(quick_result["speedup_wall"])
