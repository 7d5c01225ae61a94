"""Whole jobs on real components: a redis-server process, moto's S3 server over HTTP, a Celery worker process."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from transformers import pipeline

from producer import Client
from producer.constants import PROMPT_CACHE_KEY
from producer.embedded import ManagedProcess
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parent / "data"
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
TEMPLATE = "a photo of a {}."
WAIT_S = 180


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def generated_images() -> dict[str, bytes]:
    """One image per decoding path: grey, grey with alpha, palette with transparency, 16-bit, CMYK, animated."""
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    palette = Image.fromarray(gradient).convert("P")
    palette.info["transparency"] = 0
    frames = [Image.new("RGB", (40, 30), color) for color in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    deep = Image.fromarray((gradient.astype(np.uint16) * 257)).convert("I;16")
    return {
        "modes/grey.png": encode(Image.fromarray(gradient), "PNG"),
        "modes/grey-alpha.png": encode(Image.fromarray(gradient).convert("LA"), "PNG"),
        "modes/palette.png": encode(palette, "PNG"),
        "modes/deep.png": encode(deep, "PNG"),
        "modes/cmyk.jpg": encode(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), "JPEG"),
        "modes/animated.gif": animated.getvalue(),
    }


# Keys whose names are hard to keep byte-exact, each holding a real photograph.
SPECIAL_KEYS = {
    "a b+c.jpg": "chelsea.jpg",
    "100%.jpg": "coffee.jpg",
    "%2B plus.jpg": "rocket.jpg",
    "café/猫.JPG": "astronaut.jpg",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """A private Redis, moto's S3 server and one worker process, shared by this module's jobs."""
    # Scores equal transformers' pipeline within 1e-4 only in float32 and with JPEGs decoded at full size.
    exact = {"CLIPFLEET_DTYPE": "float32", "CLIPFLEET_JPEG_DRAFT": "false"}
    with worker_stack(tmp_path_factory.mktemp("worker-logs"), tiny_clip_dir, exact) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    return stack_client(stack, tiny_clip_dir)


@pytest.fixture(scope="module")
def buckets(client: Client) -> dict[str, str]:
    """An input bucket with photos, generated images, a corrupt image, a marker and a text file."""
    s3 = client.storage.client
    names = {"input": "clipfleet-e2e-input", "output": "clipfleet-e2e-output"}
    for name in names.values():
        s3.create_bucket(Bucket=name)
    for key, photo in SPECIAL_KEYS.items():
        s3.put_object(Bucket=names["input"], Key=f"in/{key}", Body=(DATA / photo).read_bytes())
    for key, body in generated_images().items():
        s3.put_object(Bucket=names["input"], Key=f"in/{key}", Body=body)
    s3.put_object(Bucket=names["input"], Key="in/corrupt.jpg", Body=b"\xff\xd8\xff\xe0 this is not a JPEG")
    s3.put_object(Bucket=names["input"], Key="in/empty-folder/", Body=b"")
    s3.put_object(Bucket=names["input"], Key="in/notes.txt", Body=b"not an image")
    return names


@pytest.fixture(scope="module")
def prefix_job(client: Client, buckets: dict[str, str]) -> dict[str, Any]:
    job = client.submit(
        source=f"s3://{buckets['input']}/in/",
        labels=LABELS,
        templates=[TEMPLATE],
        output=f"s3://{buckets['output']}/results/",
        batch_size=4,
        top_k=3,
    )
    status = job.wait(timeout_s=WAIT_S, progress=False)
    return {"job": job, "status": status, "rows": list(job.results())}


def expected_uris(bucket: str) -> list[str]:
    keys = list(SPECIAL_KEYS) + list(generated_images()) + ["corrupt.jpg"]
    return sorted(f"s3://{bucket}/in/{key}" for key in keys)


def test_prefix_job_succeeds(prefix_job: dict[str, Any]) -> None:
    status = prefix_job["status"]
    assert status.state == "succeeded"
    assert status.total == 11
    assert status.failed == 1
    assert status.skipped == 1


def test_every_input_once(prefix_job: dict[str, Any], buckets: dict[str, str]) -> None:
    uris = [row["uri"] for row in prefix_job["rows"]]
    assert sorted(uris) == expected_uris(buckets["input"])
    assert len(uris) == len(set(uris))


def test_rows_in_listing_order(prefix_job: dict[str, Any]) -> None:
    uris = [row["uri"] for row in prefix_job["rows"]]
    assert uris == sorted(uris)


def test_good_rows_have_sorted_top_k(prefix_job: dict[str, Any]) -> None:
    good = [row for row in prefix_job["rows"] if row["error"] is None]
    assert len(good) == 10
    for row in good:
        scores = [item["score"] for item in row["top_k"]]
        assert len(row["top_k"]) == 3
        assert scores == sorted(scores, reverse=True)
        assert row["label"] == row["top_k"][0]["label"]
        assert row["score"] == row["top_k"][0]["score"]
        assert row["label"] in LABELS


def test_corrupt_image_gets_error_row(prefix_job: dict[str, Any], buckets: dict[str, str]) -> None:
    rows = {row["uri"]: row for row in prefix_job["rows"]}
    corrupt = rows[f"s3://{buckets['input']}/in/corrupt.jpg"]
    assert corrupt["error"]["code"] == "decode_error"
    assert corrupt["label"] is None
    assert corrupt["score"] is None
    assert corrupt["top_k"] == []


def test_shards_named_by_batch(prefix_job: dict[str, Any], client: Client, buckets: dict[str, str]) -> None:
    job = prefix_job["job"]
    keys = [item["Key"] for item in client.storage.client.list_objects_v2(Bucket=buckets["output"], Prefix=f"results/{job.id}/")["Contents"]]
    names = sorted(key.rsplit("/", 1)[1] for key in keys)
    assert names == ["_SUCCESS.json", "part-000000.jsonl", "part-000001.jsonl", "part-000002.jsonl"]


def test_success_marker_summary(prefix_job: dict[str, Any], client: Client, buckets: dict[str, str]) -> None:
    job = prefix_job["job"]
    body = client.storage.client.get_object(Bucket=buckets["output"], Key=f"results/{job.id}/_SUCCESS.json")["Body"].read()
    summary = json.loads(body)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (11, 10, 1)
    assert summary["labels"] == LABELS
    assert summary["templates"] == [TEMPLATE]
    assert summary["started_at"] <= summary["finished_at"]


def test_worker_scores_match_pipeline(prefix_job: dict[str, Any], buckets: dict[str, str], tiny_clip_dir: Path) -> None:
    reference = pipeline("zero-shot-image-classification", model=str(tiny_clip_dir), device="cpu")
    rows = {row["uri"]: row for row in prefix_job["rows"]}
    for key, photo in SPECIAL_KEYS.items():
        row = rows[f"s3://{buckets['input']}/in/{key}"]
        ours = {item["label"]: item["score"] for item in row["top_k"]}
        expected = {item["label"]: item["score"] for item in reference(Image.open(DATA / photo), candidate_labels=LABELS, hypothesis_template=TEMPLATE)}
        for label, value in ours.items():
            assert abs(value - expected[label]) < 1e-4, (key, label)


def test_prompt_embeddings_shared_in_redis(prefix_job: dict[str, Any], stack: dict[str, Any]) -> None:
    client = redis.Redis.from_url(stack["redis_url"])
    keys = client.keys(PROMPT_CACHE_KEY.format(digest="*"))
    shapes = {client.hget(key, "shape") for key in keys}
    assert f"{len(LABELS)},16".encode() in shapes


def test_manifest_job_with_missing_key(client: Client, buckets: dict[str, str]) -> None:
    bucket = buckets["input"]
    lines = ["uri,group", f"s3://{bucket}/in/a b+c.jpg,x", f"s3://{bucket}/in/missing.jpg,y", f"s3://{bucket}/in/100%.jpg,x"]
    client.storage.client.put_object(Bucket=bucket, Key="manifests/m.csv", Body="\n".join(lines).encode())
    job = client.submit(source=f"s3://{bucket}/manifests/m.csv", labels=LABELS, output=f"s3://{buckets['output']}/manifest-results/")
    status = job.wait(timeout_s=WAIT_S, progress=False)
    rows = list(job.results())
    assert status.state == "succeeded"
    assert [row["uri"] for row in rows] == [line.split(",")[0] for line in lines[1:]]
    assert rows[1]["error"]["code"] == "not_found"
    assert rows[0]["error"] is None


def test_cancelled_job_drops_batches(client: Client, buckets: dict[str, str], stack: dict[str, Any]) -> None:
    worker: ManagedProcess = stack["worker"]
    job = client.submit(source=f"s3://{buckets['input']}/in/", labels=LABELS, output=f"s3://{buckets['output']}/cancelled/", batch_size=1)
    assert job.cancel()
    status = job.wait(timeout_s=WAIT_S, progress=False)
    assert status.state == "cancelled"
    assert worker.running()
    assert not job.cancel()


def test_unloadable_model_fails_job(client: Client, buckets: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    job = client.submit(source=f"s3://{buckets['input']}/in/", labels=LABELS, output=f"s3://{buckets['output']}/bad-model/", model=str(missing))
    status = job.wait(timeout_s=WAIT_S, progress=False)
    assert status.state == "failed"
    assert str(missing) in status.error
    assert "does not exist" in status.error
