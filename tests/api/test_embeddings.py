"""Embeddings from a live `clipfleet serve` process and a real worker process, through the official openai SDK.

Each embedding must equal the one that workers.classify computes in this test process from the same tiny
checkpoint, within 1e-5, for texts, s3:// images and data URI images, in float and base64 encoding.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import openai
import pytest
from PIL import Image

from producer.fleet import short_model_name
from tests.support.api_server import start_api_server, wait_for_model
from tests.support.servers import AWS_TEST_ENVIRONMENT
from tests.support.worker import worker_stack
from workers.classify import encode_images, encode_prompts
from workers.model import LoadedModel, load_model

DATA = Path(__file__).resolve().parents[1] / "data"
BUCKET = "clipfleet-api-images"
TOLERANCE = 1e-5
TEXTS = ["a photo of a cat", "a rocket on the launch pad", "coffee"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    """A private Redis, moto's S3 server, one worker process in float32 and one API server."""
    exact = {"CLIPFLEET_DTYPE": "float32", "CLIPFLEET_JPEG_DRAFT": "false", "CLIPFLEET_DEVICE": "cpu"}
    log_dir = tmp_path_factory.mktemp("api-e2e-logs")
    with worker_stack(log_dir, tiny_clip_dir, exact) as running:
        server = start_api_server(log_dir, running["redis_url"], running["s3"].endpoint_url)
        try:
            wait_for_model(server, str(tiny_clip_dir))
            yield {**running, "server": server}
        finally:
            server.stop()


@pytest.fixture(scope="module")
def loaded(tiny_clip_dir: Path) -> LoadedModel:
    return load_model(str(tiny_clip_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def images(stack: dict[str, Any]) -> dict[str, bytes]:
    """PNG files uploaded to BUCKET under their names: one at the model's input size and one to be resized."""
    rng = np.random.default_rng(7)
    files = {
        "exact.png": png(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
        "wide.png": png(rng.integers(0, 256, (120, 300, 3), dtype=np.uint8)),
    }
    s3 = boto3.client("s3", endpoint_url=stack["s3"].endpoint_url, region_name=AWS_TEST_ENVIRONMENT["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket=BUCKET)
    for name, data in files.items():
        s3.put_object(Bucket=BUCKET, Key=name, Body=data)
    return files


@pytest.fixture
def client(stack: dict[str, Any], make_openai: Callable[..., openai.OpenAI]) -> openai.OpenAI:
    return make_openai(stack["server"], timeout_s=60.0)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def text_reference(loaded: LoadedModel, texts: list[str]) -> np.ndarray:
    return encode_prompts(loaded, texts).numpy()


def image_reference(loaded: LoadedModel, files: list[bytes]) -> np.ndarray:
    """Return the embeddings of PNG `files`, preprocessed by the checkpoint's own image processor."""
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]
    pixels = loaded.processor(images=pictures, return_tensors="np")["pixel_values"].astype(np.float32)
    return encode_images(loaded, pixels).numpy()


def text_tokens(loaded: LoadedModel, texts: list[str]) -> list[int]:
    return [len(ids) for ids in loaded.tokenizer(texts)["input_ids"]]


def image_tokens(loaded: LoadedModel) -> int:
    vision = loaded.model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def as_array(result: Any) -> np.ndarray:
    return np.array([item.embedding for item in result.data], dtype=np.float32)


def test_text_embeddings_float(client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path) -> None:
    result = client.embeddings.create(model=str(tiny_clip_dir), input=TEXTS, encoding_format="float")

    np.testing.assert_allclose(as_array(result), text_reference(loaded, TEXTS), atol=TOLERANCE, rtol=0)
    assert [item.index for item in result.data] == [0, 1, 2]
    assert {item.object for item in result.data} == {"embedding"}
    assert result.object == "list"
    assert result.model == str(tiny_clip_dir)
    assert result.usage.prompt_tokens == sum(text_tokens(loaded, TEXTS))
    assert result.usage.total_tokens == result.usage.prompt_tokens


def test_single_string_input(client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path) -> None:
    result = client.embeddings.create(model=str(tiny_clip_dir), input=TEXTS[0], encoding_format="float")

    assert len(result.data) == 1
    np.testing.assert_allclose(as_array(result)[0], text_reference(loaded, TEXTS[:1])[0], atol=TOLERANCE, rtol=0)


def test_sdk_default_base64_decoded(client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path) -> None:
    """The SDK asks for base64 unless told otherwise, and decodes it into floats."""
    result = client.embeddings.create(model=str(tiny_clip_dir), input=TEXTS)

    np.testing.assert_allclose(as_array(result), text_reference(loaded, TEXTS), atol=TOLERANCE, rtol=0)


def test_base64_is_little_endian_float32(client: openai.OpenAI, tiny_clip_dir: Path) -> None:
    as_floats = client.embeddings.create(model=str(tiny_clip_dir), input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model=str(tiny_clip_dir), input=TEXTS, encoding_format="base64")

    decoded = np.array([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in as_base64.data])
    assert all(isinstance(item.embedding, str) for item in as_base64.data)
    assert decoded.shape == as_array(as_floats).shape
    np.testing.assert_array_equal(decoded, as_array(as_floats))


def test_image_embeddings(
    client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path, images: dict[str, bytes]
) -> None:
    inputs = [f"s3://{BUCKET}/exact.png", data_uri(images["exact.png"]), f"s3://{BUCKET}/wide.png", data_uri(images["wide.png"]), TEXTS[0]]

    result = client.embeddings.create(model=str(tiny_clip_dir), input=inputs, encoding_format="float")

    vectors = as_array(result)
    expected_images = image_reference(loaded, [images["exact.png"], images["wide.png"]])
    np.testing.assert_allclose(vectors[0], expected_images[0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(vectors[1], expected_images[0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(vectors[2], expected_images[1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(vectors[3], expected_images[1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(vectors[4], text_reference(loaded, TEXTS[:1])[0], atol=TOLERANCE, rtol=0)
    assert result.usage.prompt_tokens == 4 * image_tokens(loaded) + text_tokens(loaded, TEXTS[:1])[0]


def test_image_embeddings_base64(
    client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path, images: dict[str, bytes]
) -> None:
    result = client.embeddings.create(model=str(tiny_clip_dir), input=[f"s3://{BUCKET}/exact.png"], encoding_format="base64")

    decoded = np.frombuffer(base64.b64decode(result.data[0].embedding), dtype="<f4")  # type: ignore[arg-type]
    np.testing.assert_allclose(decoded, image_reference(loaded, [images["exact.png"]])[0], atol=TOLERANCE, rtol=0)


def test_short_model_name(client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path) -> None:
    short = short_model_name(str(tiny_clip_dir))

    result = client.embeddings.create(model=short, input=TEXTS, encoding_format="float")

    assert result.model == short
    np.testing.assert_allclose(as_array(result), text_reference(loaded, TEXTS), atol=TOLERANCE, rtol=0)


def test_dimensions_of_model(client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path) -> None:
    dim = int(loaded.model.config.projection_dim)

    result = client.embeddings.create(model=str(tiny_clip_dir), input=TEXTS[0], dimensions=dim, encoding_format="float")
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=str(tiny_clip_dir), input=TEXTS[0], dimensions=dim + 1)

    assert len(result.data[0].embedding) == dim
    assert caught.value.code == "invalid_dimensions"
    assert f"set it to {dim}" in str(caught.value.body)


def test_missing_image_is_400(client: openai.OpenAI, tiny_clip_dir: Path, images: dict[str, bytes]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=str(tiny_clip_dir), input=[TEXTS[0], f"s3://{BUCKET}/missing.png"])

    error = caught.value
    assert error.status_code == 400
    assert error.code == "not_found"
    assert error.param == "input"
    assert isinstance(error.body, dict)
    assert "input[1]" in error.body["message"]


def test_corrupt_data_uri_image_is_400(client: openai.OpenAI, tiny_clip_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=str(tiny_clip_dir), input=[data_uri(b"not an image at all")])

    assert caught.value.code == "decode_error"
    assert caught.value.param == "input"


def test_models_list_worker(client: openai.OpenAI, tiny_clip_dir: Path) -> None:
    listed = client.models.list()
    by_id = client.models.retrieve(str(tiny_clip_dir))
    by_short_name = client.models.retrieve(short_model_name(str(tiny_clip_dir)))

    assert [item.id for item in listed.data] == [str(tiny_clip_dir)]
    assert listed.data[0].owned_by == "clipfleet"
    assert listed.data[0].created > 0
    assert by_id.id == str(tiny_clip_dir)
    assert by_short_name.id == str(tiny_clip_dir)


def test_concurrent_requests_answered(client: openai.OpenAI, loaded: LoadedModel, tiny_clip_dir: Path) -> None:
    texts = [f"a photo of thing number {index}" for index in range(16)]
    expected = text_reference(loaded, texts)

    def embed(text: str) -> np.ndarray:
        return as_array(client.embeddings.create(model=str(tiny_clip_dir), input=[text, TEXTS[0]], encoding_format="float"))

    with ThreadPoolExecutor(len(texts)) as pool:
        results = list(pool.map(embed, texts))

    for index, vectors in enumerate(results):
        np.testing.assert_allclose(vectors[0], expected[index], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(vectors[1], text_reference(loaded, TEXTS[:1])[0], atol=TOLERANCE, rtol=0)
