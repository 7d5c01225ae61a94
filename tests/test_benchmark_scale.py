"""The scale benchmark's quick mode enqueues every task and reports plausible figures.

The goals (enqueue rate, peak RSS) are not asserted: they apply to 1,000,000 URIs, and shared CI machines
are too noisy for rates. People check them on full runs.
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
QUICK_URIS = 20_000
QUICK_KEYS = 2_000
BATCH_SIZE = 50  # not the product default, so the test checks that --batch-size reaches the submit
# A Python process that imported the producer takes more than 20 MB. Above 1 GB, the measurement or the
# producer is broken at this scale.
MIN_RSS_MB = 20.0
MAX_RSS_MB = 1000.0


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    json_path = tmp_path_factory.mktemp("scale") / "result.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--quick", "--formats", "txt,parquet,txt.gz",
         "--batch-size", str(BATCH_SIZE), "--json", str(json_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert json.loads(json_path.read_text()) == result
    return result


def positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_submission(row: dict[str, Any], images: int) -> None:
    expected_tasks = math.ceil(images / BATCH_SIZE)
    assert row["images"] == images, row
    assert row["listed"] == images, row
    assert row["tasks"] == expected_tasks, row
    assert row["expected_tasks"] == expected_tasks, row
    assert positive_finite(row["per_s"]), row
    assert positive_finite(row["per_s_wall"]), row
    assert positive_finite(row["cpu_s"]), row
    assert row["per_s"] >= row["per_s_wall"], row  # the enqueue time is part of the wall time
    assert 0 < row["enqueue_s"] <= row["wall_s"], row
    assert MIN_RSS_MB < row["peak_rss_mb"] < MAX_RSS_MB, row
    assert row["task_message_bytes"] > 0, row


def check_redis_memory(row: dict[str, Any]) -> None:
    # Each task contains BATCH_SIZE URIs of about 40 bytes, so it cannot take less Redis memory than that.
    assert row["redis_bytes_per_task"] >= BATCH_SIZE * 40, row
    # A Redis list entry adds tens of bytes to its message, and the job's own keys are small next to the tasks.
    assert row["redis_bytes_per_task"] < 2 * row["task_message_bytes"], row
    assert row["redis_bytes_per_image"] == pytest.approx(row["redis_used_memory_bytes"] / row["images"]), row


def test_quick_run_options(quick_result: dict[str, Any]) -> None:
    assert quick_result["quick"] is True
    assert quick_result["uris"] == QUICK_URIS
    assert quick_result["keys"] == QUICK_KEYS
    assert quick_result["batch_size"] == BATCH_SIZE
    assert quick_result["formats"] == ["txt", "parquet", "txt.gz"]


def test_quick_run_txt_manifest(quick_result: dict[str, Any]) -> None:
    row = quick_result["manifest"]["txt"]
    check_submission(row, QUICK_URIS)
    check_redis_memory(row)


def test_quick_run_other_formats(quick_result: dict[str, Any]) -> None:
    # The producer may not read these formats yet, and then the benchmark prints why it skipped them.
    for name in ("parquet", "txt.gz"):
        row = quick_result["manifest"][name]
        if "skipped" in row:
            assert row["skipped"].strip(), name
        else:
            check_submission(row, QUICK_URIS)


def test_quick_run_s3_listing(quick_result: dict[str, Any]) -> None:
    row = quick_result["listing"]
    check_submission(row, QUICK_KEYS)
    check_redis_memory(row)
    assert row["moto_cpu_s"] > 0, row


def test_quick_run_goals_not_judged(quick_result: dict[str, Any]) -> None:
    measured = [name for name, row in quick_result["manifest"].items() if "skipped" not in row]
    assert len(quick_result["goals"]) == 2 * len(measured)
    for goal in quick_result["goals"]:
        assert goal["verdict"].startswith("not judged"), goal


def test_quick_run_machine(quick_result: dict[str, Any]) -> None:
    assert quick_result["machine"]["cores"] >= 1
    assert quick_result["machine"]["python"] == ".".join(str(part) for part in sys.version_info[:3])


@pytest.mark.parametrize(
    "option",
    ["--uris=0", "--keys=-5", "--batch-size=0", "--batch-size=4097", "--formats=txt,xml", "--formats=txt,txt", "--timeout-s=0", "--uris=many"],
)
def test_invalid_option_rejected(option: str) -> None:
    completed = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--quick", option], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert option.split("=")[0] in completed.stderr
    assert "RESULT" not in completed.stdout
