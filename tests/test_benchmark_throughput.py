"""The throughput benchmark's quick mode runs end to end and reports finite, positive figures.

The speed goals are not asserted: shared CI machines are too noisy for them, so people check them on full runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from workers.model import usable_cpus
from workers.preprocess import DRAFT_MEAN_ABS_DIFF_LEVELS

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180
QUICK_IMAGES = 8


@pytest.fixture(scope="module")
def quick_result() -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick"],
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


def test_quick_run_measures_bare_tower(quick_result: dict[str, Any]) -> None:
    assert positive_finite(quick_result["a"]["float32"])
    assert positive_finite(quick_result["a"]["best"])


def test_quick_run_classifies_every_image(quick_result: dict[str, Any]) -> None:
    assert quick_result["images"] == QUICK_IMAGES
    assert len(quick_result["labels"]) == 2
    for count in quick_result["labels"]:
        row = quick_result["b"][str(count)]
        assert row["state"] == "succeeded", count
        assert row["succeeded"] == QUICK_IMAGES, count
        assert row["failed"] == 0, count


def test_quick_run_end_to_end_figures(quick_result: dict[str, Any]) -> None:
    for count in quick_result["labels"]:
        row = quick_result["b"][str(count)]
        assert positive_finite(row["images_per_s"]), (count, row["images_per_s"])
        assert positive_finite(row["peak_rss_main_mb"]), (count, row["peak_rss_main_mb"])
        assert positive_finite(row["peak_rss_pool_mb"]), (count, row["peak_rss_pool_mb"])
        assert positive_finite(row["moto_cpu_percent"]), (count, row["moto_cpu_percent"])
        assert positive_finite(row["a_bracket"]), (count, row["a_bracket"])
        assert positive_finite(row["worker_cpu_ms_per_image"]), (count, row["worker_cpu_ms_per_image"])
        assert row["batches"] >= 1, count
        assert "model" in row["stages_s"], row["stages_s"]


def test_quick_run_measures_pipeline(quick_result: dict[str, Any]) -> None:
    for count in quick_result["labels"]:
        assert positive_finite(quick_result["c"][str(count)]["images_per_s"]), count


def test_quick_run_reports_ratios(quick_result: dict[str, Any]) -> None:
    for count in quick_result["labels"]:
        assert positive_finite(quick_result["ratios"]["b_over_a"][str(count)]), count
        assert positive_finite(quick_result["ratios"]["b_over_c"][str(count)]), count
    # The tiny checkpoint's speed tells nothing about the goals, so quick mode does not judge them.
    verdicts = {goal["verdict"].split(":")[0] for goal in quick_result["goals"]}
    assert verdicts <= {"not judged", "no goal"}


def test_quick_run_cpu_bound(quick_result: dict[str, Any]) -> None:
    client_ms = quick_result["b"]["s3_client_cpu_ms_per_image"]
    assert positive_finite(client_ms)
    cores = usable_cpus()
    for count in quick_result["labels"]:
        row = quick_result["b"][str(count)]
        assert positive_finite(row["a_one_thread"])
        model_ms = min(1000.0 / row["a_one_thread"], 1000.0 * cores / row["a_bracket"])
        other_ms = row["moto_cpu_ms_per_image"] + client_ms + quick_result["decode"]["draft_on"]["ms"]
        bound = quick_result["ratios"]["b_over_a_bound"][str(count)]
        assert positive_finite(bound)
        assert bound == pytest.approx(1000.0 * cores / (model_ms + other_ms) / row["a_bracket"], rel=1e-9)


def test_quick_run_reports_precision(quick_result: dict[str, Any]) -> None:
    for count in quick_result["labels"]:
        row = quick_result["precision"][str(count)]
        assert 0.0 <= row["max_abs_diff"] <= 1.0, row
        assert 0.0 <= row["top1_agreement"] <= 1.0, row


def test_quick_run_compares_decoders(quick_result: dict[str, Any]) -> None:
    decode = quick_result["decode"]
    assert positive_finite(decode["reference_ms"])
    assert decode["draft_off"]["max_abs_diff"] == 0.0
    assert decode["draft_on"]["mean_abs_diff"] <= DRAFT_MEAN_ABS_DIFF_LEVELS


@pytest.mark.parametrize("option", ["--images=0", "--labels=10,,50", "--batch-sizes=0", "--seconds=-1", "--task-batch-size=abc"])
def test_invalid_option_rejected(option: str) -> None:
    completed = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick", option], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert option.split("=")[0] in completed.stderr
