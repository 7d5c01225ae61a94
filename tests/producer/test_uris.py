"""Tests for producer.uris, and for the URI checks a submit makes: schemes, allowed buckets, key lengths.

The submit tests use a real redis-server and moto's S3 server, with no worker, so anything enqueued stays
in the queue where the tests can count it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from botocore.client import BaseClient

from producer import Client
from producer.constants import JOB_KEY
from producer.errors import ClipfleetError, InvalidJobSpec
from producer.uris import (
    MAX_S3_KEY_BYTES,
    S3Uri,
    check_bucket_allowed,
    parse_location,
    parse_s3_uri,
    shorten,
    uri_scheme,
)
from tests.conftest import TEST_QUEUE as QUEUE

# Keys that an unquoting, normalising or path-cleaning step would change.
EXACT_KEYS = [
    "a b.jpg",
    "a+b.jpg",
    "a%2Bb.jpg",
    "100%.jpg",
    "caf\u00e9/\u65e5\u672c.jpg",
    "cafe\u0301.jpg",
    "\U0001f431/\U0001f600 smile.jpg",
    "/a.jpg",
    "//b.jpg",
    "a//b.jpg",
    "a/./b.jpg",
    "a/../b.jpg",
    "a?b#c.jpg",
    "line\u2028separator.jpg",
]

OTHER_SCHEMES = [
    "http://example.com/a.jpg",
    "https://example.com/photos/",
    "file:///etc/passwd",
    "ftp://example.com/a.jpg",
    "gs://bucket/a.jpg",
    "HTTP://example.com/a.jpg",
]


def key_of_bytes(size_bytes: int) -> str:
    """Return a key of exactly `size_bytes` UTF-8 bytes, mostly two-byte characters, ending in `.jpg`."""
    body_bytes = size_bytes - len("long/.jpg")
    return "long/" + "\u00e9" * (body_bytes // 2) + "x" * (body_bytes % 2) + ".jpg"


# --- parse_s3_uri ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", EXACT_KEYS)
def test_s3_key_kept_exact(key: str) -> None:
    assert parse_s3_uri(f"s3://photos/{key}").key == key


@pytest.mark.parametrize("key", EXACT_KEYS)
def test_s3_uri_string_round_trips(key: str) -> None:
    uri = f"s3://photos/{key}"

    assert str(parse_s3_uri(uri)) == uri


def test_s3_leading_slash_is_part_of_key() -> None:
    assert parse_s3_uri("s3://photos//a.jpg") == S3Uri("photos", "/a.jpg")


def test_s3_bucket_without_key() -> None:
    assert parse_s3_uri("s3://photos") == S3Uri("photos", "")


def test_s3_key_at_max_bytes_accepted() -> None:
    key = key_of_bytes(MAX_S3_KEY_BYTES)

    assert parse_s3_uri(f"s3://photos/{key}").key == key


def test_s3_key_over_max_bytes_rejected() -> None:
    key = key_of_bytes(MAX_S3_KEY_BYTES + 1)

    with pytest.raises(ValueError, match=f"has {MAX_S3_KEY_BYTES + 1} UTF-8 bytes; S3 keys have at most 1024"):
        parse_s3_uri(f"s3://photos/{key}")


def test_s3_key_limit_counts_bytes_not_characters() -> None:
    key = "\u00e9" * 513  # 513 characters, 1,026 UTF-8 bytes

    with pytest.raises(ValueError, match="has 1026 UTF-8 bytes"):
        parse_s3_uri(f"s3://photos/{key}")


def test_s3_long_key_message_is_shortened() -> None:
    key = "k" * 5000

    with pytest.raises(ValueError) as caught:
        parse_s3_uri(f"s3://photos/{key}")

    assert len(str(caught.value)) < 400
    assert "(5012 characters)" in str(caught.value)


def test_s3_key_with_lone_surrogate_rejected() -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        parse_s3_uri("s3://photos/bad\udcffname.jpg")


@pytest.mark.parametrize("value", OTHER_SCHEMES)
def test_s3_parse_rejects_other_scheme(value: str) -> None:
    with pytest.raises(ValueError, match="is not an S3 URI: expected s3://bucket/key"):
        parse_s3_uri(value)


def test_s3_parse_upper_case_scheme_hint() -> None:
    with pytest.raises(ValueError, match="in lower case"):
        parse_s3_uri("S3://photos/a.jpg")


def test_s3_invalid_bucket_named() -> None:
    with pytest.raises(ValueError, match="invalid bucket name 'Bad_Bucket'"):
        parse_s3_uri("s3://Bad_Bucket/a.jpg")


# --- parse_location and uri_scheme ----------------------------------------------------------------


@pytest.mark.parametrize("value", OTHER_SCHEMES)
def test_location_rejects_other_scheme(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_location(value)

    assert repr(value) in str(caught.value)
    assert "only s3:// and local paths" in str(caught.value)


def test_location_file_scheme_fix_named() -> None:
    with pytest.raises(ValueError, match="write the local path without 'file://'"):
        parse_location("file:///data/photos")


@pytest.mark.parametrize("value", ["S3://photos/in/", "s3:/photos/in/", "S3:/x"])
def test_location_misspelt_s3_scheme(value: str) -> None:
    with pytest.raises(ValueError, match="write the scheme as 's3://' in lower case with two slashes"):
        parse_location(value)


def test_location_s3_parsed() -> None:
    assert parse_location("s3://photos//in/") == S3Uri("photos", "/in/")


def test_location_relative_path_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert parse_location("photos") == tmp_path / "photos"


def test_location_colon_in_relative_path_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert parse_location("shots:2026/a.jpg") == tmp_path / "shots:2026" / "a.jpg"


@pytest.mark.parametrize("value", ["", "   "])
def test_location_empty_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="empty location"):
        parse_location(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://example.com/a.jpg", "http"),
        ("file:///etc/passwd", "file"),
        ("s3://photos/a.jpg", "s3"),
        ("S3:/photos", "S3"),
        ("/data/a.jpg", None),
        ("photos/a.jpg", None),
        ("shots:2026/a.jpg", None),
        ("1http://example.com", None),
    ],
)
def test_uri_scheme(value: str, expected: str | None) -> None:
    assert uri_scheme(value) == expected


# --- check_bucket_allowed and shorten -------------------------------------------------------------


def test_bucket_allowed_when_listed() -> None:
    check_bucket_allowed(S3Uri("photos", "a.jpg"), ["photos", "results"])


def test_every_bucket_allowed_when_empty() -> None:
    check_bucket_allowed(S3Uri("photos", "a.jpg"), [])


def test_bucket_outside_allowed_named() -> None:
    with pytest.raises(ValueError) as caught:
        check_bucket_allowed(S3Uri("private", "a.jpg"), ["results", "photos"])

    message = str(caught.value)
    assert "bucket 'private' of 's3://private/a.jpg'" in message
    assert "CLIPFLEET_ALLOWED_BUCKETS=['photos', 'results']" in message


def test_shorten_keeps_short_value() -> None:
    assert shorten("s3://photos/a b.jpg") == "'s3://photos/a b.jpg'"


def test_shorten_cuts_long_value() -> None:
    shown = shorten("x" * 500)

    assert shown == repr("x" * 120) + "... (500 characters)"


# --- submit ---------------------------------------------------------------------------------------


def nothing_enqueued(redis_client: redis.Redis) -> bool:
    return redis_client.llen(QUEUE) == 0 and redis_client.keys(JOB_KEY.format(job_id="*")) == []


@pytest.mark.parametrize("source", OTHER_SCHEMES)
def test_submit_rejects_source_scheme(
    make_client: Callable[..., Client], redis_client: redis.Redis, make_bucket: Callable[[], str], source: str
) -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        make_client().submit(source=source, labels=["cat"], output=f"s3://{make_bucket()}/out/")

    assert repr(source) in str(caught.value)
    assert "only s3://" in str(caught.value)
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize("output", OTHER_SCHEMES)
def test_submit_rejects_output_scheme(
    make_client: Callable[..., Client], redis_client: redis.Redis, make_bucket: Callable[[], str], output: str
) -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        make_client().submit(source=f"s3://{make_bucket()}/in/", labels=["cat"], output=output)

    assert repr(output) in str(caught.value)
    assert "output" in str(caught.value)
    assert nothing_enqueued(redis_client)


def manifest_text(name: str, uris: list[str]) -> str:
    """Return a manifest listing `uris` in the format that `name`'s suffix selects."""
    if name.endswith(".jsonl"):
        return "".join(json.dumps({"uri": uri}, ensure_ascii=False) + "\n" for uri in uris)
    if name.endswith(".csv"):
        return "uri\n" + "".join(f'"{uri}"\n' for uri in uris)
    return "".join(uri + "\n" for uri in uris)


MANIFEST_NAMES = ["list.txt", "list.csv", "list.jsonl"]


def line_of(name: str, index: int) -> str:
    """Return how an error names the line of entry `index` (from 0) in a manifest from manifest_text."""
    header_lines = 1 if name.endswith(".csv") else 0
    return f"line {index + 1 + header_lines}"


@pytest.fixture(params=["local", "s3"])
def place_manifest(
    request: pytest.FixtureRequest, tmp_path: Path, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> Callable[[str, list[str]], str]:
    """A function that stores a manifest as a local file or an S3 object and returns its location."""

    def place(name: str, uris: list[str]) -> str:
        text = manifest_text(name, uris)
        if request.param == "local":
            path = tmp_path / name
            path.write_text(text, encoding="utf-8")
            return str(path)
        bucket = make_bucket()
        s3_client.put_object(Bucket=bucket, Key=f"manifests/{name}", Body=text.encode("utf-8"))
        return f"s3://{bucket}/manifests/{name}"

    return place


@pytest.mark.parametrize("name", MANIFEST_NAMES)
@pytest.mark.parametrize("entry", ["http://127.0.0.1:9/a.jpg", "https://example.com/a.jpg", "file:///etc/a.jpg"])
def test_submit_rejects_manifest_scheme(
    make_client: Callable[..., Client],
    redis_client: redis.Redis,
    place_manifest: Callable[[str, list[str]], str],
    make_bucket: Callable[[], str],
    name: str,
    entry: str,
) -> None:
    source = place_manifest(name, ["s3://photos/a.jpg", entry])

    with pytest.raises(ClipfleetError) as caught:
        make_client().submit(source=source, labels=["cat"], output=f"s3://{make_bucket()}/out/")

    assert line_of(name, 1) in str(caught.value)
    assert repr(entry) in str(caught.value)
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize("name", MANIFEST_NAMES)
def test_submit_rejects_manifest_bucket_before_enqueue(
    make_client: Callable[..., Client],
    redis_client: redis.Redis,
    s3_client: BaseClient,
    make_bucket: Callable[[], str],
    name: str,
) -> None:
    """The bad entry comes after three batches' worth of good ones, and still nothing is enqueued."""
    bucket = make_bucket()
    good = [f"s3://{bucket}/in/{index}.jpg" for index in range(3)]
    s3_client.put_object(Bucket=bucket, Key=f"manifests/{name}", Body=manifest_text(name, [*good, "s3://private/x.jpg"]).encode())
    client = make_client(allowed_buckets=bucket)

    with pytest.raises(ClipfleetError) as caught:
        client.submit(source=f"s3://{bucket}/manifests/{name}", labels=["cat"], output=f"s3://{bucket}/out/", batch_size=1)

    assert line_of(name, 3) in str(caught.value)
    assert "bucket 'private'" in str(caught.value)
    assert "CLIPFLEET_ALLOWED_BUCKETS" in str(caught.value)
    assert nothing_enqueued(redis_client)


def test_submit_accepts_manifest_in_allowed_buckets(
    make_client: Callable[..., Client], redis_client: redis.Redis, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket, other = make_bucket(), make_bucket()
    uris = [f"s3://{bucket}/in/a.jpg", f"s3://{other}/in/b.jpg"]
    s3_client.put_object(Bucket=bucket, Key="manifests/list.txt", Body=manifest_text("list.txt", uris).encode())
    client = make_client(allowed_buckets=f"{bucket},{other}")

    job = client.submit(source=f"s3://{bucket}/manifests/list.txt", labels=["cat"], output=f"s3://{bucket}/out/", batch_size=1)

    assert job.status().total == 2
    assert redis_client.llen(QUEUE) == 2


def test_submit_rejects_manifest_key_over_max_bytes(
    make_client: Callable[..., Client], redis_client: redis.Redis, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()
    uris = [f"s3://{bucket}/{key_of_bytes(MAX_S3_KEY_BYTES)}", f"s3://{bucket}/{key_of_bytes(MAX_S3_KEY_BYTES + 1)}"]
    s3_client.put_object(Bucket=bucket, Key="manifests/list.jsonl", Body=manifest_text("list.jsonl", uris).encode())

    with pytest.raises(ClipfleetError, match=r"line 2: the key of .* has 1025 UTF-8 bytes"):
        make_client().submit(source=f"s3://{bucket}/manifests/list.jsonl", labels=["cat"], output=f"s3://{bucket}/out/")

    assert nothing_enqueued(redis_client)
