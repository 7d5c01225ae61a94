"""A multi-label job with a threshold and a template set, on a redis-server, moto's S3 server and a worker process."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from producer import Client
from producer.formats import RESULT_SCHEMA
from producer.templates import TEMPLATE_SETS
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
LABELS = ["cat", "rocket", "coffee cup", "astronaut"]
WAIT_S = 180
# The worker's float32 cosines against the same model run by transformers directly.
TOLERANCE = 1e-4


def expected_cosines(model_dir: Path) -> dict[str, list[float]]:
    """Cosine similarity of each photo and each label, with the "photo" template set, in LABELS order."""
    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    processor = CLIPProcessor.from_pretrained(str(model_dir))
    labels = []
    with torch.inference_mode():
        for label in LABELS:
            prompts = [template.replace("{}", label) for template in TEMPLATE_SETS["photo"]]
            text = model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")).pooler_output
            mean = (text / text.norm(dim=-1, keepdim=True)).mean(dim=0)
            labels.append(mean / mean.norm())
        images = [Image.open(DATA / name).convert("RGB") for name in PHOTOS]
        image = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
    image = image / image.norm(dim=-1, keepdim=True)
    cosines = image @ torch.stack(labels).T
    return dict(zip(PHOTOS, cosines.tolist()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    exact = {"CLIPFLEET_DTYPE": "float32", "CLIPFLEET_JPEG_DRAFT": "false"}
    with worker_stack(tmp_path_factory.mktemp("worker-logs"), tiny_clip_dir, exact) as running:
        yield running


@pytest.fixture(scope="module")
def job(stack: dict[str, Any], tiny_clip_dir: Path) -> dict[str, Any]:
    """The finished job, its client, the threshold it ran with and the cosines expected per photo."""
    client = stack_client(stack, tiny_clip_dir)
    s3 = client.storage.client
    for bucket in ("scoring-input", "scoring-output"):
        s3.create_bucket(Bucket=bucket)
    for name in PHOTOS:
        s3.put_object(Bucket="scoring-input", Key=f"in/{name}", Body=(DATA / name).read_bytes())
    cosines = expected_cosines(tiny_clip_dir)
    best = sorted(max(values) for values in cosines.values())
    # Between the lowest and highest best cosine, so some photos keep a label and some do not.
    threshold = (best[0] + best[-1]) / 2
    submitted = client.submit(
        source="s3://scoring-input/in/", labels=LABELS, output="s3://scoring-output/results/", format="parquet",
        top_k=3, template_set="photo", multi_label=True, threshold=threshold,
    )
    status = submitted.wait(timeout_s=WAIT_S, progress=False)
    return {"client": client, "job": submitted, "status": status, "threshold": threshold, "cosines": cosines, "best": best}


def rows_by_photo(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["uri"].rsplit("/", 1)[1]: row for row in job["job"].results()}


def test_job_succeeds_without_errors(job: dict[str, Any]) -> None:
    status = job["status"]
    assert status.state == "succeeded"
    assert (status.succeeded, status.failed) == (len(PHOTOS), 0)


def test_threshold_splits_photos(job: dict[str, Any]) -> None:
    assert job["best"][-1] - job["best"][0] > 10 * TOLERANCE, "the photos' best cosines are too close to split"
    labelled = [row["label"] is not None for row in rows_by_photo(job).values()]
    assert True in labelled
    assert False in labelled


def test_rows_are_thresholded_cosines(job: dict[str, Any]) -> None:
    for name, row in rows_by_photo(job).items():
        expected = sorted(zip(job["cosines"][name], LABELS), reverse=True)[:3]
        kept = [(score, label) for score, label in expected if score >= job["threshold"]]
        assert [entry["label"] for entry in row["top_k"]] == [label for _, label in kept], name
        for entry, (score, _) in zip(row["top_k"], kept):
            assert entry["score"] == pytest.approx(score, abs=TOLERANCE), name
        assert row["error"] is None


def test_unlabelled_rows_have_nulls(job: dict[str, Any]) -> None:
    for name, row in rows_by_photo(job).items():
        if max(job["cosines"][name]) < job["threshold"]:
            assert (row["label"], row["score"], row["top_k"]) == (None, None, []), name


def test_parquet_shards_read_back(job: dict[str, Any]) -> None:
    client: Client = job["client"]
    s3 = client.storage.client
    listed = s3.list_objects_v2(Bucket="scoring-output", Prefix=f"results/{job['job'].id}/")["Contents"]
    shards = [item["Key"] for item in listed if item["Key"].endswith(".parquet")]
    assert shards
    rows = []
    for key in sorted(shards):
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket="scoring-output", Key=key)["Body"].read()))
        assert table.schema.equals(RESULT_SCHEMA, check_metadata=False)
        rows.extend(table.to_pylist())
    assert rows == list(job["job"].results())


def test_summary_names_options(job: dict[str, Any]) -> None:
    client: Client = job["client"]
    body = client.storage.client.get_object(Bucket="scoring-output", Key=f"results/{job['job'].id}/_SUCCESS.json")["Body"].read()
    summary = json.loads(body)
    assert summary["template_set"] == "photo"
    assert summary["templates"] == list(TEMPLATE_SETS["photo"])
    assert summary["multi_label"] is True
    assert summary["threshold"] == job["threshold"]


def test_redis_spec_has_expanded_templates(job: dict[str, Any]) -> None:
    client: Client = job["client"]
    spec = json.loads(client.store.fields(job["job"].id)["spec"])
    assert spec["templates"] == list(TEMPLATE_SETS["photo"])
