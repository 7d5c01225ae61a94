"""One job of hostile, malformed and unusual images on real components, next to good photos.

A redis-server process, moto's S3 server and one Celery worker process run the job. The worker reads S3
through the fault proxy of tests.support.s3proxy, which stalls every GET of one object past the worker's
fetch timeout. The job must finish with the documented error code for each bad image, scores for each
readable one, and the same worker processes alive at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from producer import Client, Settings
from producer.constants import DEFAULT_IMAGE_EXTENSIONS, ERROR_CODES, STATE_SUCCEEDED
from tests.support.corpus import STALL_KEY_MARKER, CorpusCase, hostile_corpus
from tests.support.s3proxy import S3FaultProxy
from tests.support.servers import RedisServer, S3Server
from tests.support.worker import start_worker

# The whole module, worker start included, runs inside the first test's timeout.
pytestmark = pytest.mark.timeout(100)

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
TOP_K = 3
FETCH_TIMEOUT_S = 2.0
MAX_IMAGE_BYTES = 1024 * 1024
# Longer than one fetch timeout, so each GET attempt of the stalled object times out.
STALL_S = FETCH_TIMEOUT_S + 2.0
JOB_WAIT_S = 80.0
# Manifest entries are filtered by extension too, so the unsupported formats' own suffixes are added.
EXTENSIONS = (*DEFAULT_IMAGE_EXTENSIONS, ".svg", ".pdf", ".eps", ".heic")
CASES = hostile_corpus(MAX_IMAGE_BYTES)


def upload_inputs(client: Client, bucket: str) -> list[str]:
    """Upload the corpus and the photos, write a manifest of every URI, and return the manifest's URI."""
    s3 = client.storage.client
    uris = []
    for case in CASES:
        s3.put_object(Bucket=bucket, Key=f"hostile/{case.key}", Body=case.data)
        uris.append(f"s3://{bucket}/hostile/{case.key}")
    for photo in PHOTOS:
        s3.put_object(Bucket=bucket, Key=f"photos/{photo}", Body=(DATA / photo).read_bytes())
        uris.append(f"s3://{bucket}/photos/{photo}")
    manifest = "\n".join(uris) + "\n"
    s3.put_object(Bucket=bucket, Key="manifests/hostile.txt", Body=manifest.encode())
    return uris


def worker_pids(parent_pid: int) -> tuple[int, list[int]]:
    return parent_pid, sorted(child.pid for child in psutil.Process(parent_pid).children())


def peak_rss_bytes(pid: int) -> int:
    """Return the peak resident set size of process ``pid``, read from VmHWM in /proc/PID/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"/proc/{pid}/status has no VmHWM line")


@pytest.fixture(scope="module")
def hostile_job(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """Run one job over the corpus and the photos, and return its status, rows, timing and worker processes."""
    log_dir = tmp_path_factory.mktemp("hostile-worker-logs")
    with RedisServer() as redis_server, S3Server() as s3, S3FaultProxy(s3.endpoint_url, seed=1) as proxy:
        proxy.add_rule("stall", method="GET", key_contains=STALL_KEY_MARKER, stall_s=STALL_S)
        client = Client(Settings(redis_url=redis_server.url, s3_endpoint_url=s3.endpoint_url, model=str(tiny_clip_dir)))
        for bucket in ("hostile-input", "hostile-output"):
            client.storage.client.create_bucket(Bucket=bucket)
        uris = upload_inputs(client, "hostile-input")

        extra_env = {
            "CLIPFLEET_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S),
            "CLIPFLEET_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        }
        worker = start_worker(log_dir, redis_server.url, tiny_clip_dir, proxy.endpoint_url, extra_env)
        try:
            pids_before = worker_pids(worker.process.pid)
            started = time.monotonic()
            job = client.submit(
                source="s3://hostile-input/manifests/hostile.txt",
                labels=LABELS,
                output="s3://hostile-output/results/",
                top_k=TOP_K,
                extensions=EXTENSIONS,
            )
            status = job.wait(timeout_s=JOB_WAIT_S, progress=False)
            job_s = time.monotonic() - started
            rows = list(job.results())
            alive = worker.running()
            pids_after = worker_pids(worker.process.pid) if alive else (None, [])
            pool_peak_rss_bytes = [peak_rss_bytes(pid) for pid in pids_after[1]]
        finally:
            worker.stop()
        yield {
            "status": status,
            "rows": rows,
            "uris": uris,
            "job_s": job_s,
            "worker_alive": alive,
            "pids_before": pids_before,
            "pids_after": pids_after,
            "pool_peak_rss_bytes": pool_peak_rss_bytes,
            "stalled_gets": [fault for fault in proxy.injected if fault.action == "stall"],
            "log_tail": worker.log_tail(60),
        }


def rows_by_uri(hostile_job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["uri"]: row for row in hostile_job["rows"]}


def case_uri(case: CorpusCase) -> str:
    return f"s3://hostile-input/hostile/{case.key}"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({case.key for case in CASES}) == len(CASES)


def test_corpus_codes_documented() -> None:
    codes = {case.expected_error for case in CASES if case.expected_error is not None}
    assert codes <= set(ERROR_CODES)


def test_job_succeeds(hostile_job: dict[str, Any]) -> None:
    assert hostile_job["status"].state == STATE_SUCCEEDED, hostile_job["log_tail"]


def test_job_counters(hostile_job: dict[str, Any]) -> None:
    failed = sum(1 for case in CASES if case.expected_error is not None)
    status = hostile_job["status"]
    assert (status.total, status.failed) == (len(CASES) + len(PHOTOS), failed)


def test_one_row_per_input(hostile_job: dict[str, Any]) -> None:
    uris = [row["uri"] for row in hostile_job["rows"]]
    assert sorted(uris) == sorted(hostile_job["uris"])
    assert len(uris) == len(set(uris))


def test_rejected_cases_error_codes(hostile_job: dict[str, Any]) -> None:
    rows = rows_by_uri(hostile_job)
    expected = {}
    actual = {}
    for case in CASES:
        if case.expected_error is None:
            continue
        row = rows.get(case_uri(case))
        expected[case.key] = case.expected_error
        actual[case.key] = row["error"]["code"] if row is not None and row["error"] is not None else None
    assert actual == expected


def test_rejected_rows_have_no_scores(hostile_job: dict[str, Any]) -> None:
    rows = rows_by_uri(hostile_job)
    for case in CASES:
        if case.expected_error is None:
            continue
        row = rows[case_uri(case)]
        assert (row["label"], row["score"], row["top_k"]) == (None, None, []), case.key
        assert row["error"]["message"], case.key


def check_scored_row(row: dict[str, Any]) -> list[str]:
    """Return what is wrong with a row that must carry scores, or an empty list."""
    problems = []
    if row["error"] is not None:
        problems.append(f"error {row['error']}")
        return problems
    scores = [item["score"] for item in row["top_k"]]
    if len(scores) != TOP_K:
        problems.append(f"{len(scores)} top_k entries")
    if scores != sorted(scores, reverse=True):
        problems.append(f"top_k scores not descending: {scores}")
    if not all(0.0 <= score <= 1.0 for score in scores):
        problems.append(f"score outside 0..1: {scores}")
    if row["label"] not in LABELS or row["label"] != row["top_k"][0]["label"]:
        problems.append(f"label {row['label']!r}")
    if row["score"] != scores[0]:
        problems.append(f"score {row['score']} is not the top score")
    return problems


def test_decodable_cases_scored(hostile_job: dict[str, Any]) -> None:
    rows = rows_by_uri(hostile_job)
    problems = {case.key: check_scored_row(rows[case_uri(case)]) for case in CASES if case.expected_error is None}
    assert {key: found for key, found in problems.items() if found} == {}


def test_photos_scored(hostile_job: dict[str, Any]) -> None:
    rows = rows_by_uri(hostile_job)
    problems = {photo: check_scored_row(rows[f"s3://hostile-input/photos/{photo}"]) for photo in PHOTOS}
    assert {key: found for key, found in problems.items() if found} == {}


def test_stalled_get_was_stalled(hostile_job: dict[str, Any]) -> None:
    """The fetch_timeout row comes from the proxy's stall, not from some other failure."""
    stalled = hostile_job["stalled_gets"]
    assert len(stalled) >= 1
    assert all(STALL_KEY_MARKER in fault.path for fault in stalled)


def test_worker_survived(hostile_job: dict[str, Any]) -> None:
    assert hostile_job["worker_alive"], hostile_job["log_tail"]


def test_worker_processes_unchanged(hostile_job: dict[str, Any]) -> None:
    parent_before, children_before = hostile_job["pids_before"]
    assert len(children_before) == 1
    assert hostile_job["pids_after"] == (parent_before, children_before)


def test_pool_memory_bounded(hostile_job: dict[str, Any]) -> None:
    assert hostile_job["pool_peak_rss_bytes"], "no pool process was found after the job"
    # Measured peaks of the pool process over this job: 2.25 GB. Without the pixel budget the three GIFs
    # with a 9400 x 9400 screen decode at once and the peak was 3.95 GB. Before decode_image cropped the
    # 1x5000 and 5000x1 images ahead of the CLIP processor, those alone took it to 5.4 GB.
    assert max(hostile_job["pool_peak_rss_bytes"]) < 3 * 1024**3


def test_job_finished_in_time(hostile_job: dict[str, Any]) -> None:
    # The stalled object bounds the job: CLIPFLEET_S3_MAX_ATTEMPTS (4) reads of FETCH_TIMEOUT_S each,
    # with backoff between them, measured at 8.7 s. The other images took under 15 s together.
    assert hostile_job["job_s"] < 60.0
