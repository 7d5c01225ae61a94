"""Tests for producer.sources: S3 prefixes on moto's S3 server, manifests and local folders."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from uuid import uuid4

import pytest
from botocore.client import BaseClient

from producer.constants import DEFAULT_IMAGE_EXTENSIONS
from producer.errors import InvalidJobSpec, SourceError
from producer.sources import MAX_LISTING_THREADS, ListingStats, ManifestError, iter_source, iter_sources
from producer.storage import Storage
from producer.uris import S3Uri, parse_s3_uri

MANY_KEYS = 2_500
UPLOAD_THREADS = 16
S3_LIST_PAGE_KEYS = 1_000  # ListObjectsV2 returns at most this many keys per page

# Keys that an encoding or normalisation step would change: URL escapes, `+`, spaces, composed and
# decomposed accents, CJK and an emoji outside the Basic Multilingual Plane.
ODD_KEYS = {
    "space": "odd/a b.jpg",
    "plus": "odd/a+b.jpg",
    "percent": "odd/100%.jpg",
    "escaped-plus": "odd/a%2Bb.jpg",
    "escaped-space": "odd/a%20b.jpg",
    "accent-composed": "odd/caf\u00e9.jpg",
    "accent-decomposed": "odd/cafe\u0301.jpg",
    "cjk": "odd/\u732b.jpg",
    "emoji": "odd/\U0001f431 cat.jpg",
}


def list_uris(source: str, storage: Storage, extensions=DEFAULT_IMAGE_EXTENSIONS, stats: ListingStats | None = None) -> list[str]:
    return list(iter_source(source, storage, extensions, stats))


def put_objects(s3_client: BaseClient, bucket: str, objects: dict[str, bytes]) -> None:
    def put(item: tuple[str, bytes]) -> None:
        s3_client.put_object(Bucket=bucket, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(put, objects.items()))


@pytest.fixture(scope="module")
def storage(s3_server) -> Storage:
    return Storage(endpoint_url=s3_server.endpoint_url)


@pytest.fixture(scope="module")
def many_keys_bucket(s3_client: BaseClient) -> tuple[str, list[str]]:
    """A bucket holding MANY_KEYS image keys under `many/`, uploaded once for the module."""
    bucket = f"many-keys-{uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    keys = [f"many/img-{index:05d}.jpg" for index in range(MANY_KEYS)]
    # moto's server logs every request at INFO. Capturing those 2,500 records made this upload take
    # about 12 s in place of 10 s on a 2-core machine.
    request_log = logging.getLogger("werkzeug")
    level = request_log.level
    request_log.setLevel(logging.WARNING)
    try:
        put_objects(s3_client, bucket, {key: b"x" for key in keys})
    finally:
        request_log.setLevel(level)
    return bucket, keys


@pytest.fixture(scope="module")
def odd_keys_bucket(s3_client: BaseClient) -> str:
    """A bucket holding ODD_KEYS, each with a body that contains the key's own UTF-8 bytes."""
    bucket = f"odd-keys-{uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    put_objects(s3_client, bucket, {key: body_of(key) for key in ODD_KEYS.values()})
    return bucket


def body_of(key: str) -> bytes:
    return b"\x00\xff" + key.encode("utf-8")


# --- S3 prefixes ----------------------------------------------------------------------------------


def test_many_keys_span_several_pages(s3_client: BaseClient, many_keys_bucket: tuple[str, list[str]]) -> None:
    bucket, _ = many_keys_bucket

    first_page = s3_client.list_objects_v2(Bucket=bucket, Prefix="many/")

    assert first_page["IsTruncated"] is True
    assert first_page["KeyCount"] == S3_LIST_PAGE_KEYS


def test_prefix_listed_completely_in_order(storage: Storage, many_keys_bucket: tuple[str, list[str]]) -> None:
    bucket, keys = many_keys_bucket

    uris = list_uris(f"s3://{bucket}/many/", storage)

    assert uris == [f"s3://{bucket}/{key}" for key in sorted(keys)]


def test_prefix_listing_counts_listed(storage: Storage, many_keys_bucket: tuple[str, list[str]]) -> None:
    bucket, _ = many_keys_bucket
    stats = ListingStats()

    list_uris(f"s3://{bucket}/many/", storage, stats=stats)

    assert stats.listed == MANY_KEYS


def test_prefix_without_slash_matches_key_start(storage: Storage, many_keys_bucket: tuple[str, list[str]]) -> None:
    bucket, _ = many_keys_bucket

    uris = list_uris(f"s3://{bucket}/many/img-0249", storage)

    assert uris == [f"s3://{bucket}/many/img-0249{digit}.jpg" for digit in range(10)]


@pytest.fixture
def mixed_bucket(s3_client: BaseClient, make_bucket: Callable[[], str]) -> str:
    bucket = make_bucket()
    put_objects(
        s3_client,
        bucket,
        {
            "photos/a.jpg": b"a",
            "photos/notes.txt": b"n",
            "photos/sub/": b"",
            "photos/sub/b.png": b"b",
            "photos/A.JPG": b"A",
            "photos/c.Png": b"c",
            "photos/d.jpg.bak": b"d",
            "photos/raw/e.heic": b"e",
        },
    )
    return bucket


def test_folder_marker_not_yielded(storage: Storage, mixed_bucket: str) -> None:
    uris = list_uris(f"s3://{mixed_bucket}/photos/", storage)

    assert f"s3://{mixed_bucket}/photos/sub/" not in uris


def test_non_images_counted_as_skipped(storage: Storage, mixed_bucket: str) -> None:
    stats = ListingStats()

    list_uris(f"s3://{mixed_bucket}/photos/", storage, stats=stats)

    assert stats.skipped == 3  # notes.txt, d.jpg.bak and raw/e.heic, but not the folder marker


def test_skipped_examples_name_keys(storage: Storage, mixed_bucket: str) -> None:
    stats = ListingStats()

    list_uris(f"s3://{mixed_bucket}/photos/", storage, stats=stats)

    assert stats.skipped_examples == [
        f"s3://{mixed_bucket}/photos/d.jpg.bak",
        f"s3://{mixed_bucket}/photos/notes.txt",
        f"s3://{mixed_bucket}/photos/raw/e.heic",
    ]


def test_extensions_match_any_case(storage: Storage, mixed_bucket: str) -> None:
    uris = list_uris(f"s3://{mixed_bucket}/photos/", storage)

    assert uris == [
        f"s3://{mixed_bucket}/photos/A.JPG",
        f"s3://{mixed_bucket}/photos/a.jpg",
        f"s3://{mixed_bucket}/photos/c.Png",
        f"s3://{mixed_bucket}/photos/sub/b.png",
    ]


def test_custom_extensions(storage: Storage, mixed_bucket: str) -> None:
    uris = list_uris(f"s3://{mixed_bucket}/photos/", storage, extensions=[".HEIC", ".txt"])

    assert uris == [f"s3://{mixed_bucket}/photos/notes.txt", f"s3://{mixed_bucket}/photos/raw/e.heic"]


def test_missing_bucket_raises_source_error(storage: Storage) -> None:
    with pytest.raises(SourceError, match="no-such-bucket-here"):
        list_uris("s3://no-such-bucket-here/photos/", storage)


# --- keys that must stay byte-exact ---------------------------------------------------------------


def test_odd_keys_listed_exactly(storage: Storage, odd_keys_bucket: str) -> None:
    uris = list_uris(f"s3://{odd_keys_bucket}/odd/", storage)

    assert uris == sorted(f"s3://{odd_keys_bucket}/{key}" for key in ODD_KEYS.values())


@pytest.mark.parametrize("key", list(ODD_KEYS.values()), ids=list(ODD_KEYS))
def test_odd_key_uri_is_exact(storage: Storage, odd_keys_bucket: str, key: str) -> None:
    uris = list_uris(f"s3://{odd_keys_bucket}/odd/", storage)

    assert f"s3://{odd_keys_bucket}/{key}" in uris


@pytest.mark.parametrize("key", list(ODD_KEYS.values()), ids=list(ODD_KEYS))
def test_odd_key_reads_back_uploaded_bytes(
    storage: Storage, s3_client: BaseClient, odd_keys_bucket: str, key: str
) -> None:
    uri = f"s3://{odd_keys_bucket}/{key}"
    assert uri in list_uris(f"s3://{odd_keys_bucket}/odd/", storage)
    parsed = parse_s3_uri(uri)

    body = s3_client.get_object(Bucket=parsed.bucket, Key=parsed.key)["Body"].read()

    assert body == body_of(key)


# --- manifests ------------------------------------------------------------------------------------

TXT_MANIFEST = "# images to classify\n\ns3://photos/a.jpg\n   \n  s3://photos/b c.jpg  \n# done\n  # indented comment\n"
TXT_EXPECTED = ["s3://photos/a.jpg", "s3://photos/b c.jpg"]

CSV_WITH_HEADER = "id,uri,label\n1,s3://photos/a.jpg,cat\n2,s3://photos/b c.jpg,dog\n\n3,,none\n"
CSV_WITHOUT_HEADER = "s3://photos/a.jpg,cat\ns3://photos/b c.jpg,dog\n"
CSV_EXPECTED = ["s3://photos/a.jpg", "s3://photos/b c.jpg"]

JSONL_MANIFEST = '{"uri": "s3://photos/a.jpg", "id": 1}\n\n{"uri": "s3://photos/b c.jpg"}\n'
JSONL_EXPECTED = ["s3://photos/a.jpg", "s3://photos/b c.jpg"]

MANIFEST_CASES = [
    pytest.param("list.txt", TXT_MANIFEST, TXT_EXPECTED, id="txt"),
    pytest.param("list.csv", CSV_WITH_HEADER, CSV_EXPECTED, id="csv-header"),
    pytest.param("list.csv", CSV_WITHOUT_HEADER, CSV_EXPECTED, id="csv-no-header"),
    pytest.param("list.csv", "\ufeffURI\ns3://photos/a.jpg\n", ["s3://photos/a.jpg"], id="csv-bom-upper-case-header"),
    pytest.param("list.jsonl", JSONL_MANIFEST, JSONL_EXPECTED, id="jsonl"),
    pytest.param("LIST.TXT", "s3://photos/a.jpg\n", ["s3://photos/a.jpg"], id="upper-case-suffix"),
]


@pytest.fixture(params=["local", "s3"])
def place_manifest(
    request: pytest.FixtureRequest, tmp_path: Path, s3_client: BaseClient, make_bucket: Callable[[], str]
) -> Callable[[str, str], str]:
    """A function that stores a manifest's text as a local file or an S3 object and returns its location."""

    def place(name: str, text: str) -> str:
        if request.param == "local":
            path = tmp_path / name
            path.write_text(text, encoding="utf-8")
            return str(path)
        bucket = make_bucket()
        s3_client.put_object(Bucket=bucket, Key=f"manifests/{name}", Body=text.encode("utf-8"))
        return f"s3://{bucket}/manifests/{name}"

    return place


@pytest.mark.parametrize(("name", "text", "expected"), MANIFEST_CASES)
def test_manifest_lists_uris(
    place_manifest: Callable[[str, str], str], storage: Storage, name: str, text: str, expected: list[str]
) -> None:
    source = place_manifest(name, text)

    assert list_uris(source, storage) == expected


def test_manifest_entries_filtered_by_extension(place_manifest: Callable[[str, str], str], storage: Storage) -> None:
    source = place_manifest("list.txt", "s3://photos/a.jpg\ns3://photos/readme.md\n")
    stats = ListingStats()

    uris = list_uris(source, storage, stats=stats)

    assert uris == ["s3://photos/a.jpg"]
    assert stats.skipped == 1


def test_jsonl_invalid_line_names_line(place_manifest: Callable[[str, str], str], storage: Storage) -> None:
    source = place_manifest("list.jsonl", '{"uri": "s3://photos/a.jpg"}\n{"uri": s3://photos/b.jpg}\n')

    with pytest.raises(SourceError, match="line 2 is not valid JSON"):
        list_uris(source, storage)


def test_jsonl_line_without_uri_names_line(place_manifest: Callable[[str, str], str], storage: Storage) -> None:
    source = place_manifest("list.jsonl", '{"uri": "s3://photos/a.jpg"}\n{"path": "s3://photos/b.jpg"}\n')

    with pytest.raises(SourceError, match="line 2 has no string field 'uri'"):
        list_uris(source, storage)


def test_manifest_invalid_bucket_names_line(place_manifest: Callable[[str, str], str], storage: Storage) -> None:
    source = place_manifest("list.txt", "s3://photos/a.jpg\n\ns3://Bad_Bucket/b.jpg\n")

    with pytest.raises(SourceError, match="line 3: invalid bucket name 'Bad_Bucket'"):
        list_uris(source, storage)


def test_manifest_other_scheme_rejected(place_manifest: Callable[[str, str], str], storage: Storage) -> None:
    source = place_manifest("list.txt", "http://example.com/a.jpg\n")

    with pytest.raises(SourceError, match="line 1"):
        list_uris(source, storage)


def test_missing_s3_manifest_raises_source_error(storage: Storage, make_bucket: Callable[[], str]) -> None:
    source = f"s3://{make_bucket()}/manifests/missing.txt"

    with pytest.raises(SourceError, match="manifests/missing.txt"):
        list_uris(source, storage)


def test_s3_manifest_rejects_local_entry(s3_client: BaseClient, make_bucket: Callable[[], str], storage: Storage) -> None:
    bucket = make_bucket()
    s3_client.put_object(Bucket=bucket, Key="list.txt", Body=b"s3://photos/a.jpg\n/etc/passwd.jpg\n")

    with pytest.raises(SourceError, match=r"line 2: '/etc/passwd.jpg' is not an s3:// URI"):
        list_uris(f"s3://{bucket}/list.txt", storage)


def test_local_manifest_resolves_relative_paths(tmp_path: Path, storage: Storage) -> None:
    manifest = tmp_path / "lists" / "list.txt"
    manifest.parent.mkdir()
    manifest.write_text("a.jpg\nsub/b.png\n/data/c.jpg\n", encoding="utf-8")

    uris = list_uris(str(manifest), storage)

    assert uris == [str(tmp_path / "lists" / "a.jpg"), str(tmp_path / "lists" / "sub" / "b.png"), "/data/c.jpg"]


# --- local folders --------------------------------------------------------------------------------


@pytest.fixture
def local_tree(tmp_path: Path) -> Path:
    """A folder with nested images, a non-image, and symbolic links to a file and a folder outside it."""
    outside = tmp_path / "outside"
    (outside / "private").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(b"s")
    (outside / "private" / "hidden.jpg").write_bytes(b"h")

    root = tmp_path / "photos"
    (root / "a" / "d").mkdir(parents=True)
    for relative in ("b.jpg", "a/c.jpg", "a/d/e.png", "a.jpg", "notes.txt"):
        (root / relative).write_bytes(b"x")
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink(outside / "private", root / "linked-folder")
    return root


def test_local_folder_recursive_sorted(local_tree: Path, storage: Storage) -> None:
    uris = list_uris(str(local_tree), storage)

    # The same order S3 gives the same keys: "a.jpg" < "a/c.jpg" < "a/d/e.png" < "b.jpg".
    assert uris == [str(local_tree / name) for name in ("a.jpg", "a/c.jpg", "a/d/e.png", "b.jpg")]


def test_local_folder_skips_file_symlink(local_tree: Path, storage: Storage) -> None:
    uris = list_uris(str(local_tree), storage)

    assert str(local_tree / "link.jpg") not in uris


def test_local_folder_skips_folder_symlink(local_tree: Path, storage: Storage) -> None:
    uris = list_uris(str(local_tree), storage)

    assert str(local_tree / "linked-folder" / "hidden.jpg") not in uris


def test_local_folder_counts_non_images(local_tree: Path, storage: Storage) -> None:
    stats = ListingStats()

    list_uris(str(local_tree), storage, stats=stats)

    assert stats.skipped_examples == [str(local_tree / "notes.txt")]


def test_missing_local_folder_raises(tmp_path: Path, storage: Storage) -> None:
    missing = tmp_path / "no-such-folder"

    with pytest.raises(SourceError, match="no-such-folder"):
        list_uris(str(missing), storage)


def test_non_utf8_file_name_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(b"x")
    os.close(os.open(os.fsencode(folder) + b"/bad\xffname.jpg", os.O_CREAT | os.O_WRONLY))
    stats = ListingStats()
    uris = list(iter_source(str(folder), Storage(), DEFAULT_IMAGE_EXTENSIONS, stats))
    assert uris == [str(folder / "good.jpg")]
    assert stats.skipped == 1


# --- manifest validation: comments, repeats and entry length ---------------------------------------

DUPLICATED_MANIFEST = "s3://photos/a.jpg\ns3://photos/b.jpg\ns3://photos/a.jpg\n\n# comment\ns3://photos/c.jpg\ns3://photos/b.jpg\ns3://photos/a.jpg\n"


def test_jsonl_skips_blank_and_comment_lines(place_manifest: Callable[[str, str], str], storage: Storage) -> None:
    source = place_manifest("list.jsonl", '# exported 2026-01-01\n{"uri": "s3://photos/a.jpg"}\n   \n  # note\n{"uri": "s3://photos/b.jpg"}\n')

    assert list_uris(source, storage) == ["s3://photos/a.jpg", "s3://photos/b.jpg"]


def test_manifest_repeats_dropped(
    place_manifest: Callable[[str, str], str], storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    source = place_manifest("list.txt", DUPLICATED_MANIFEST)
    stats = ListingStats()

    with caplog.at_level(logging.WARNING, logger="producer.manifests"):
        uris = list_uris(source, storage, stats=stats)

    assert uris == ["s3://photos/a.jpg", "s3://photos/b.jpg", "s3://photos/c.jpg"]
    assert stats.listed == 3
    assert stats.duplicates == 3
    assert stats.duplicate_examples == ["s3://photos/a.jpg", "s3://photos/b.jpg"]
    assert stats.skipped == 0
    warnings = [record.getMessage() for record in caplog.records if "repeats URIs" in record.getMessage()]
    assert len(warnings) == 1
    assert "repeats URIs 3 times" in warnings[0]


def test_manifest_relative_and_absolute_repeat_dropped(tmp_path: Path, storage: Storage) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"photos/a.jpg\n{tmp_path / 'photos' / 'a.jpg'}\n", encoding="utf-8")
    stats = ListingStats()

    uris = list_uris(str(manifest), storage, stats=stats)

    assert uris == [str(tmp_path / "photos" / "a.jpg")]
    assert stats.duplicates == 1


MEGABYTE_KEY = "k" * (1024 * 1024)


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        pytest.param("list.txt", f"s3://photos/a.jpg\n\ns3://photos/{MEGABYTE_KEY}.jpg\n", 3, id="txt"),
        pytest.param("list.jsonl", f'{{"uri": "s3://photos/a.jpg"}}\n{{"uri": "s3://photos/{MEGABYTE_KEY}.jpg"}}\n', 2, id="jsonl"),
        pytest.param("list.csv", f"uri\ns3://photos/a.jpg\ns3://photos/{MEGABYTE_KEY}.jpg\n", 3, id="csv"),
    ],
)
def test_megabyte_manifest_line_rejected(
    place_manifest: Callable[[str, str], str], storage: Storage, name: str, text: str, line: int
) -> None:
    source = place_manifest(name, text)

    with pytest.raises(ManifestError, match=rf"{name} line {line}: .*4096 bytes") as raised:
        list_uris(source, storage)

    assert isinstance(raised.value, InvalidJobSpec)
    assert len(str(raised.value)) < 400


def test_manifest_s3_key_over_limit_rejected(tmp_path: Path, storage: Storage) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("s3://photos/a.jpg\ns3://photos/" + "k" * 1021 + ".jpg\n", encoding="utf-8")

    with pytest.raises(ManifestError, match=r"list.txt line 2: the key of .* has 1025 UTF-8 bytes; S3 keys have at most 1024"):
        list_uris(str(manifest), storage)


def test_manifest_s3_key_at_limit_accepted(tmp_path: Path, storage: Storage) -> None:
    manifest = tmp_path / "list.txt"
    uri = "s3://photos/" + "k" * 1020 + ".jpg"
    manifest.write_text(uri + "\n", encoding="utf-8")

    assert list_uris(str(manifest), storage) == [uri]


def test_manifest_bad_line_raises_before_first_uri(tmp_path: Path, storage: Storage) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("s3://photos/a.jpg\ns3://Bad_Bucket/b.jpg\n", encoding="utf-8")
    uris = iter_source(str(manifest), storage, DEFAULT_IMAGE_EXTENSIONS)

    with pytest.raises(ManifestError, match="line 2"):
        next(uris)


# --- several sources ------------------------------------------------------------------------------


class BarrierStorage(Storage):
    """A Storage whose listings each wait at a barrier before listing, so they only finish when run together."""

    def __init__(self, endpoint_url: str, parties: int) -> None:
        super().__init__(endpoint_url=endpoint_url)
        self.barrier = threading.Barrier(parties, timeout=BARRIER_TIMEOUT_S)

    def iter_objects(self, prefix: S3Uri) -> Iterator[tuple[str, int]]:
        self.barrier.wait()  # raises BrokenBarrierError unless every party lists at the same time
        yield from super().iter_objects(prefix)


class CountingStorage(Storage):
    """A Storage that records how many listings run at the same time; each listing lasts at least LISTING_PAUSE_S."""

    def __init__(self, endpoint_url: str) -> None:
        super().__init__(endpoint_url=endpoint_url)
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def iter_objects(self, prefix: S3Uri) -> Iterator[tuple[str, int]]:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(LISTING_PAUSE_S)
            yield from super().iter_objects(prefix)
        finally:
            with self.lock:
                self.active -= 1


BARRIER_TIMEOUT_S = 20.0
LISTING_PAUSE_S = 0.05
PREFIX_COUNT = 11  # more prefixes than MAX_LISTING_THREADS


@pytest.fixture(scope="module")
def prefixes_bucket(s3_client: BaseClient) -> str:
    """A bucket with PREFIX_COUNT prefixes `p00/` ... holding two images each."""
    bucket = f"prefixes-{uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    put_objects(s3_client, bucket, {f"p{index:02d}/{name}": b"x" for index in range(PREFIX_COUNT) for name in ("a.jpg", "b.jpg")})
    return bucket


def expected_uris(bucket: str, indexes: list[int]) -> list[str]:
    return [f"s3://{bucket}/p{index:02d}/{name}" for index in indexes for name in ("a.jpg", "b.jpg")]


def test_sources_listed_in_given_order(storage: Storage, prefixes_bucket: str) -> None:
    order = [3, 0, 7]

    uris = list(iter_sources([f"s3://{prefixes_bucket}/p{index:02d}/" for index in order], storage, DEFAULT_IMAGE_EXTENSIONS))

    assert uris == expected_uris(prefixes_bucket, order)


def test_two_prefixes_listed_in_parallel(s3_server, prefixes_bucket: str) -> None:
    storage = BarrierStorage(s3_server.endpoint_url, parties=2)
    sources = [f"s3://{prefixes_bucket}/p01/", f"s3://{prefixes_bucket}/p02/"]

    uris = list(iter_sources(sources, storage, DEFAULT_IMAGE_EXTENSIONS))

    assert uris == expected_uris(prefixes_bucket, [1, 2])
    assert storage.barrier.broken is False


def test_listing_threads_capped(s3_server, prefixes_bucket: str) -> None:
    storage = CountingStorage(s3_server.endpoint_url)
    sources = [f"s3://{prefixes_bucket}/p{index:02d}/" for index in range(PREFIX_COUNT)]

    uris = list(iter_sources(sources, storage, DEFAULT_IMAGE_EXTENSIONS))

    assert uris == expected_uris(prefixes_bucket, list(range(PREFIX_COUNT)))
    assert storage.max_active <= MAX_LISTING_THREADS


def test_failing_prefix_named(storage: Storage, prefixes_bucket: str) -> None:
    sources = [f"s3://{prefixes_bucket}/p00/", "s3://no-such-bucket-either/photos/"]

    with pytest.raises(SourceError, match="listing prefix 's3://no-such-bucket-either/photos/' failed"):
        list(iter_sources(sources, storage, DEFAULT_IMAGE_EXTENSIONS))


def test_mixed_sources_in_order(storage: Storage, prefixes_bucket: str, tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("s3://photos/m.jpg\n", encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "f.png").write_bytes(b"x")
    sources = [f"s3://{prefixes_bucket}/p05/", str(manifest), str(folder), f"s3://{prefixes_bucket}/p04/"]

    uris = list(iter_sources(sources, storage, DEFAULT_IMAGE_EXTENSIONS))

    assert uris == [*expected_uris(prefixes_bucket, [5]), "s3://photos/m.jpg", str(folder / "f.png"), *expected_uris(prefixes_bucket, [4])]


def test_bad_manifest_fails_before_first_prefix_uri(storage: Storage, prefixes_bucket: str, tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("s3://photos/a.jpg\nhttp://example.com/b.jpg\n", encoding="utf-8")
    uris = iter_sources([f"s3://{prefixes_bucket}/p00/", str(manifest)], storage, DEFAULT_IMAGE_EXTENSIONS)

    with pytest.raises(ManifestError, match="list.txt line 2"):
        next(uris)


def test_closing_early_stops_listing_threads(storage: Storage, many_keys_bucket: tuple[str, list[str]]) -> None:
    bucket, _ = many_keys_bucket
    uris = iter_sources([f"s3://{bucket}/many/img-0", f"s3://{bucket}/many/img-1", f"s3://{bucket}/many/img-2"], storage, DEFAULT_IMAGE_EXTENSIONS)

    first = [next(uris) for _ in range(10)]
    uris.close()

    assert first[0] == f"s3://{bucket}/many/img-00000.jpg"
    assert [thread.name for thread in threading.enumerate() if thread.name.startswith("clipfleet-list-")] == []


def test_missing_folder_in_sources_fails_first(storage: Storage, prefixes_bucket: str, tmp_path: Path) -> None:
    uris = iter_sources([f"s3://{prefixes_bucket}/p00/", str(tmp_path / "no-such-folder")], storage, DEFAULT_IMAGE_EXTENSIONS)

    with pytest.raises(SourceError, match="no-such-folder"):
        next(uris)


def test_file_not_manifest_named(tmp_path: Path, storage: Storage) -> None:
    report = tmp_path / "inventory-report.json"
    report.write_text("{}")

    with pytest.raises(SourceError) as raised:
        list_uris(str(report), storage)

    assert "is a file, but not a manifest" in str(raised.value)
    assert "manifest.json" in str(raised.value)
