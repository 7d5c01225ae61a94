"""The Files API of a live `clipfleet serve` process, through the official openai SDK, with S3 and local folders."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from botocore.client import BaseClient
from openai import OpenAI

from tests.support.api_server import ApiServer

MAX_FILE_BYTES = 4096
REQUEST_LINE = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}


@pytest.fixture(scope="module")
def s3_files_server(start_api: Callable[..., ApiServer], s3_client: BaseClient) -> ApiServer:
    bucket = "files-api-tests"
    s3_client.create_bucket(Bucket=bucket)
    return start_api(CLIPFLEET_API_FILES_URI=f"s3://{bucket}/uploads/", CLIPFLEET_API_MAX_FILE_BYTES=str(MAX_FILE_BYTES))


@pytest.fixture
def api(s3_files_server: ApiServer, make_openai: Callable[..., OpenAI]) -> OpenAI:
    return make_openai(s3_files_server)


def jsonl(*lines: dict[str, object]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_upload_retrieve_and_download(api: OpenAI, s3_client: BaseClient) -> None:
    content = jsonl(REQUEST_LINE, {**REQUEST_LINE, "custom_id": "b"})
    uploaded = api.files.create(file=("requests.jsonl", content), purpose="batch")

    assert uploaded.id.startswith("file-")
    assert uploaded.object == "file"
    assert uploaded.bytes == len(content)
    assert uploaded.filename == "requests.jsonl"
    assert uploaded.purpose == "batch"
    assert uploaded.status == "processed"
    assert api.files.retrieve(uploaded.id).model_dump() == uploaded.model_dump()
    assert api.files.content(uploaded.id).content == content
    stored = s3_client.get_object(Bucket="files-api-tests", Key=f"uploads/files/{uploaded.id}")["Body"].read()
    assert stored == content


def test_list_newest_first_with_paging(api: OpenAI) -> None:
    ids = [api.files.create(file=(f"f{index}.jsonl", jsonl(REQUEST_LINE)), purpose="batch").id for index in range(3)]

    listed = [item.id for item in api.files.list(purpose="batch").data]
    first_page = api.files.list(limit=2)
    after = api.files.list(after=ids[2], limit=1)

    assert listed[:3] == ids[::-1]
    assert [item.id for item in first_page.data] == ids[:0:-1]
    assert first_page.has_more is True
    assert [item.id for item in after.data] == [ids[1]]
    assert api.files.list(purpose="batch_output").data == []


def test_delete_removes_file(api: OpenAI) -> None:
    file_id = api.files.create(file=("gone.jsonl", jsonl(REQUEST_LINE)), purpose="batch").id

    deleted = api.files.delete(file_id)

    assert deleted.id == file_id
    assert deleted.deleted is True
    assert file_id not in [item.id for item in api.files.list().data]
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(file_id)


@pytest.mark.parametrize("file_id", ["file-doesnotexist", "not-a-file-id"])
def test_unknown_id_is_404(api: OpenAI, file_id: str) -> None:
    for call in (api.files.retrieve, api.files.content, api.files.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            call(file_id)
        assert caught.value.body["code"] == "file_not_found"  # type: ignore[index]


def test_other_purpose_is_rejected(api: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.files.create(file=("a.jsonl", jsonl(REQUEST_LINE)), purpose="fine-tune")

    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    assert "'fine-tune'" in caught.value.message


def test_too_large_upload_is_413(api: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        api.files.create(file=("big.jsonl", b"x" * (MAX_FILE_BYTES + 1)), purpose="batch")

    assert caught.value.status_code == 413
    assert "CLIPFLEET_API_MAX_FILE_BYTES" in caught.value.message


def test_too_large_chunked_upload_is_413(s3_files_server: ApiServer) -> None:
    """An upload without Content-Length passes the body limit of the middleware and is measured when spooled."""
    boundary = "clipfleetboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"y" * (MAX_FILE_BYTES + 100) + f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> object:
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    request = urllib.request.Request(
        s3_files_server.base_url + "/files", data=chunks(), method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Transfer-Encoding": "chunked"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)

    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error"]["code"] == "file_too_large"


def test_local_folder_keeps_content(start_api: Callable[..., ApiServer], make_openai: Callable[..., OpenAI], tmp_path: Path) -> None:
    api = make_openai(start_api(CLIPFLEET_API_FILES_URI=str(tmp_path / "files")))
    content = jsonl(REQUEST_LINE)

    uploaded = api.files.create(file=("local.jsonl", content), purpose="batch")

    assert (tmp_path / "files" / "files" / uploaded.id).read_bytes() == content
    assert api.files.content(uploaded.id).content == content


def test_unset_folder_is_503(start_api: Callable[..., ApiServer], make_openai: Callable[..., OpenAI]) -> None:
    api = make_openai(start_api())

    with pytest.raises(openai.InternalServerError) as caught:
        api.files.list()

    assert caught.value.status_code == 503
    assert "CLIPFLEET_API_FILES_URI" in caught.value.message
