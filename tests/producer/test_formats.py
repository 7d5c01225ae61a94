"""Tests for producer.formats and the shard readers of producer.results, on local folders (no servers)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.errors import InvalidJobSpec, StorageError
from producer.formats import (
    RESULT_SCHEMA,
    decode_jsonl,
    decode_parquet,
    decode_shard,
    encode_jsonl,
    encode_parquet,
    encode_shard,
    parse_shard_name,
    rows_to_table,
    shard_name,
)
from producer.results import iter_results, iter_shards, list_shards, read_shard, replace_rows, write_shard
from producer.spec import JobSpec, build_spec
from producer.storage import Storage

JOB_ID = "job-formats"
# Floats whose shortest repr needs all 17 digits, the smallest subnormal, and values near the extremes.
HARD_SCORES = [0.1 + 0.2, 1 / 3, 5e-324, 2.2250738585072014e-308, 0.9999999999999999, 1e-300, 0.0]


def good_row(uri: str, scores: list[float]) -> dict[str, Any]:
    top_k = [{"label": f"label {index}", "score": score} for index, score in enumerate(scores)]
    return {"uri": uri, "label": top_k[0]["label"], "score": top_k[0]["score"], "top_k": top_k, "error": None}


def error_row(uri: str, code: str = "not_found", message: str = "the object does not exist") -> dict[str, Any]:
    return {"uri": uri, "label": None, "score": None, "top_k": [], "error": {"code": code, "message": message}}


def sample_rows() -> list[dict[str, Any]]:
    return [
        good_row("s3://photos/a b+c.jpg", HARD_SCORES[:3]),
        error_row("s3://photos/missing.jpg"),
        good_row("/data/café/猫 \u2028 line.JPG", HARD_SCORES[3:]),
        error_row("s3://photos/100%.jpg", "decode_error", "cannot identify image file \u0085 \"quoted\""),
    ]


def make_spec(tmp_path: Path, shard_format: str) -> JobSpec:
    return build_spec(source=str(tmp_path / "in"), labels=["cat"], output=str(tmp_path / "out"), format=shard_format)


# --- encoders and decoders ------------------------------------------------------------------------


def test_jsonl_bytes_unchanged() -> None:
    rows = [error_row("s3://b/é.jpg"), good_row("s3://b/x.jpg", [0.5])]

    body = encode_jsonl(rows)

    expected = (
        '{"uri": "s3://b/é.jpg", "label": null, "score": null, "top_k": [], '
        '"error": {"code": "not_found", "message": "the object does not exist"}}\n'
        '{"uri": "s3://b/x.jpg", "label": "label 0", "score": 0.5, "top_k": [{"label": "label 0", "score": 0.5}], "error": null}\n'
    ).encode()
    assert body == expected


def test_jsonl_round_trip_keeps_line_separators() -> None:
    rows = sample_rows()

    assert decode_jsonl(encode_jsonl(rows)) == rows


def test_parquet_round_trip_equal_rows() -> None:
    rows = sample_rows()

    assert decode_parquet(encode_parquet(rows)) == rows


def test_parquet_floats_round_trip_exactly() -> None:
    rows = [good_row(f"s3://b/{index}.jpg", [score]) for index, score in enumerate(HARD_SCORES)]

    decoded = decode_parquet(encode_parquet(rows))

    assert [row["score"].hex() for row in decoded] == [score.hex() for score in HARD_SCORES]
    assert [row["top_k"][0]["score"].hex() for row in decoded] == [score.hex() for score in HARD_SCORES]


def test_parquet_rows_print_same_json() -> None:
    rows = sample_rows()

    from_parquet = decode_parquet(encode_parquet(rows))

    assert encode_jsonl(from_parquet) == encode_jsonl(rows)


def test_parquet_file_has_result_schema() -> None:
    table = pq.read_table(io.BytesIO(encode_parquet(sample_rows())))

    assert table.schema.equals(RESULT_SCHEMA, check_metadata=False)
    assert table.column("score").type == pa.float64()
    assert table.column("error").type == pa.struct([("code", pa.string()), ("message", pa.string())])


@pytest.mark.parametrize(
    "rows",
    [pytest.param([], id="empty"), pytest.param([error_row("s3://b/a.jpg"), error_row("s3://b/b.jpg")], id="all-errors")],
)
def test_parquet_schema_fixed_without_scores(rows: list[dict[str, Any]]) -> None:
    body = encode_parquet(rows)

    table = pq.read_table(io.BytesIO(body))

    assert table.schema.equals(RESULT_SCHEMA, check_metadata=False)
    assert table.num_rows == len(rows)
    assert decode_parquet(body) == rows


def test_parquet_error_struct_fields() -> None:
    table = pq.read_table(io.BytesIO(encode_parquet(sample_rows())))

    errors = table.column("error").to_pylist()

    assert errors[0] is None
    assert errors[1] == {"code": "not_found", "message": "the object does not exist"}
    assert errors[3]["code"] == "decode_error"


def test_parquet_compressed_with_zstd() -> None:
    metadata = pq.ParquetFile(io.BytesIO(encode_parquet(sample_rows()))).metadata

    assert metadata.row_group(0).column(0).compression == "ZSTD"


def test_decode_shard_detects_format() -> None:
    rows = sample_rows()

    assert decode_shard(encode_shard(rows, "parquet")) == rows
    assert decode_shard(encode_shard(rows, "jsonl")) == rows
    assert decode_shard(b"") == []


def test_encode_shard_unknown_format() -> None:
    with pytest.raises(ValueError, match="'csv'"):
        encode_shard(sample_rows(), "csv")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"extra": 1}, "expected exactly", id="extra-field"),
        pytest.param({"top_k": None}, "null uri or top_k", id="null-top-k"),
        pytest.param({"score": "high"}, "do not match the Parquet result schema", id="score-text"),
        pytest.param({"top_k": [{"label": "cat"}]}, "top_k entry", id="top-k-missing-score"),
        pytest.param({"error": {"code": "not_found"}}, "expected null or", id="error-missing-message"),
        pytest.param({"error": "not_found"}, "expected null or", id="error-text"),
    ],
)
def test_rows_to_table_rejects_invalid(change: dict[str, Any], message: str) -> None:
    row = {**good_row("s3://b/a.jpg", [0.5]), **change}

    with pytest.raises(ValueError, match=message):
        rows_to_table([row])


def test_rows_to_table_rejects_missing_field() -> None:
    row = good_row("s3://b/a.jpg", [0.5])
    del row["error"]

    with pytest.raises(ValueError, match="row 0 has fields"):
        rows_to_table([row])


def test_decode_parquet_rejects_corrupt_file() -> None:
    body = encode_parquet(sample_rows())

    with pytest.raises(ValueError, match="not a readable Parquet file"):
        decode_parquet(body[:20] + b"\x00" * 40 + body[60:-12])


def test_decode_parquet_rejects_other_schema() -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"uri": ["a"], "label": ["cat"]}), buffer)

    with pytest.raises(ValueError, match="do not match the result schema"):
        decode_parquet(buffer.getvalue())


def test_decode_parquet_casts_compatible_schema() -> None:
    # float32 scores and columns in another order still read as result rows.
    table = pa.table(
        {
            "error": pa.array([None], pa.struct([("code", pa.string()), ("message", pa.string())])),
            "uri": ["s3://b/a.jpg"],
            "label": ["cat"],
            "score": pa.array([0.5], pa.float32()),
            "top_k": pa.array([[{"label": "cat", "score": 0.5}]]),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)

    rows = decode_parquet(buffer.getvalue())

    assert rows == [{"uri": "s3://b/a.jpg", "label": "cat", "score": 0.5, "top_k": [{"label": "cat", "score": 0.5}], "error": None}]


def test_nan_score_round_trips() -> None:
    rows = [good_row("s3://b/a.jpg", [math.nan])]

    decoded = decode_parquet(encode_parquet(rows))

    assert math.isnan(decoded[0]["score"])


# --- shard names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("part-000012.jsonl", (12, "jsonl")),
        ("part-000012.parquet", (12, "parquet")),
        ("part-1234567.parquet", (1234567, "parquet")),
        ("part-12.jsonl", None),
        ("_SUCCESS.json", None),
        (".part-000001.parquet.x1y2.tmp", None),
        ("part-000001.parquet.gz", None),
    ],
)
def test_parse_shard_name(name: str, expected: tuple[int, str] | None) -> None:
    assert parse_shard_name(name) == expected


def test_shard_name_by_format() -> None:
    assert shard_name(7, "jsonl") == "part-000007.jsonl"
    assert shard_name(7, "parquet") == "part-000007.parquet"


# --- the job spec -----------------------------------------------------------------------------------


def test_spec_format_defaults_to_jsonl(tmp_path: Path) -> None:
    spec = build_spec(source=str(tmp_path / "in"), labels=["cat"], output=str(tmp_path / "out"))

    assert spec.format == "jsonl"


def test_spec_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InvalidJobSpec, match="format"):
        build_spec(source=str(tmp_path / "in"), labels=["cat"], output=str(tmp_path / "out"), format="csv")


# --- reading and writing shards through producer.results --------------------------------------------


@pytest.mark.parametrize("shard_format", ["jsonl", "parquet"])
def test_write_shard_named_by_format(tmp_path: Path, shard_format: str) -> None:
    spec = make_spec(tmp_path, shard_format)

    location = write_shard(Storage(), spec, JOB_ID, 3, sample_rows())

    assert Path(location) == tmp_path / "out" / JOB_ID / f"part-000003.{shard_format}"
    assert read_shard(Storage(), spec, JOB_ID, 3) == sample_rows()


def test_jsonl_shard_bytes_on_disk(tmp_path: Path) -> None:
    rows = sample_rows()

    location = write_shard(Storage(), make_spec(tmp_path, "jsonl"), JOB_ID, 0, rows)

    assert Path(location).read_bytes() == "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def test_retry_rewrite_keeps_parquet(tmp_path: Path) -> None:
    storage = Storage()
    spec = make_spec(tmp_path, "parquet")
    write_shard(storage, spec, JOB_ID, 0, sample_rows())
    fixed = good_row("s3://photos/missing.jpg", [0.75])

    merged, unknown = replace_rows(read_shard(storage, spec, JOB_ID, 0), [fixed])
    write_shard(storage, spec, JOB_ID, 0, merged)

    assert unknown == []
    assert sorted(path.name for path in (tmp_path / "out" / JOB_ID).iterdir()) == ["part-000000.parquet"]
    assert read_shard(storage, spec, JOB_ID, 0)[1] == fixed


def test_iter_shards_in_numeric_batch_order(tmp_path: Path) -> None:
    storage = Storage()
    spec = make_spec(tmp_path, "parquet")
    for batch in (1000000, 100001, 2):
        write_shard(storage, spec, JOB_ID, batch, [good_row(f"s3://b/{batch}.jpg", [0.5])])

    batches = [batch for batch, _ in iter_shards(storage, spec, JOB_ID)]

    assert batches == [2, 100001, 1000000]


def test_iter_results_same_for_both_formats(tmp_path: Path) -> None:
    storage = Storage()
    rows = sample_rows()
    results = {}
    for shard_format in ("jsonl", "parquet"):
        spec = make_spec(tmp_path / shard_format, shard_format)
        write_shard(storage, spec, JOB_ID, 0, rows[:2])
        write_shard(storage, spec, JOB_ID, 1, rows[2:])
        results[shard_format] = list(iter_results(storage, spec, JOB_ID))

    assert results["parquet"] == rows
    assert results["jsonl"] == rows


def test_mixed_formats_folder_rejected(tmp_path: Path) -> None:
    storage = Storage()
    write_shard(storage, make_spec(tmp_path, "jsonl"), JOB_ID, 0, sample_rows())
    write_shard(storage, make_spec(tmp_path, "parquet"), JOB_ID, 1, sample_rows())
    folder = str(tmp_path / "out" / JOB_ID)

    with pytest.raises(StorageError, match="both formats") as caught:
        list_shards(storage, folder)

    assert folder in str(caught.value)


def test_mixed_formats_rejected_before_rows(tmp_path: Path) -> None:
    storage = Storage()
    spec = make_spec(tmp_path, "parquet")
    write_shard(storage, spec, JOB_ID, 0, sample_rows())
    write_shard(storage, make_spec(tmp_path, "jsonl"), JOB_ID, 1, sample_rows())

    with pytest.raises(StorageError, match="part-000000.parquet and part-000001.jsonl"):
        next(iter_results(storage, spec, JOB_ID))


def test_corrupt_shard_names_location(tmp_path: Path) -> None:
    storage = Storage()
    spec = make_spec(tmp_path, "parquet")
    location = Path(write_shard(storage, spec, JOB_ID, 0, sample_rows()))
    location.write_bytes(location.read_bytes()[:-30])

    with pytest.raises(StorageError, match="not a valid result shard") as caught:
        read_shard(storage, spec, JOB_ID, 0)

    assert str(location) in str(caught.value)
