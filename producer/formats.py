"""Encoders and decoders of result shards, in JSON Lines or Parquet, and the shard file names.

Both formats contain the same rows: `uri`, `label`, `score`, `top_k` (a list of `{label, score}`) and `error`
(`{code, message}` or null). A row decoded from either format equals the row that was encoded, floats
included, because Parquet stores `score` as float64, the type of a Python float.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from producer.constants import SHARD_NAMES

logger = logging.getLogger(__name__)

JSONL = "jsonl"
PARQUET = "parquet"
SHARD_FORMATS = (JSONL, PARQUET)
CONTENT_TYPES = {JSONL: "application/x-ndjson", PARQUET: "application/vnd.apache.parquet"}
# Every Parquet file starts and ends with these 4 bytes; a JSONL shard starts with "{" or is empty.
PARQUET_MAGIC = b"PAR1"
# zstd, because on 4,096 rows shaped like worker output (top_k=5, float32 scores, 2% errors) its shards were
# 25% smaller than snappy's (199 KB against 265 KB; the JSONL shard has 1.88 MB) and took about as long to
# write, 8 to 11 ms each (pyarrow 26, 2 shared AMD EPYC cores).
PARQUET_COMPRESSION = "zstd"

ROW_FIELDS = ("uri", "label", "score", "top_k", "error")
TOP_K_FIELDS = ("label", "score")
ERROR_FIELDS = ("code", "message")
TOP_K_TYPE = pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float64())])
ERROR_TYPE = pa.struct([pa.field("code", pa.string()), pa.field("message", pa.string())])
# One fixed schema, so a shard whose rows are all errors (or that has no rows) has the same column types.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("top_k", pa.list_(TOP_K_TYPE), nullable=False),
        pa.field("error", ERROR_TYPE),
    ]
)

_SHARD_NAME_RE = re.compile(r"^part-(\d{6,})\.(jsonl|parquet)$")


def shard_name(batch: int, shard_format: str) -> str:
    """Return the file name of a batch's shard, such as `part-000012.parquet`. Raises ValueError for an unknown format."""
    return SHARD_NAMES[check_format(shard_format)].format(batch=batch)


def parse_shard_name(name: str) -> tuple[int, str] | None:
    """Return `(batch, format)` of a shard file name, or None for any other name."""
    match = _SHARD_NAME_RE.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def check_format(shard_format: str) -> str:
    """Return `shard_format` when it is one of SHARD_FORMATS. Raises ValueError naming the value otherwise."""
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"unknown result format {shard_format!r}: use one of {', '.join(SHARD_FORMATS)}")
    return shard_format


def encode_shard(rows: Sequence[dict[str, Any]], shard_format: str) -> bytes:
    """Return the bytes of a shard containing `rows` in `shard_format`.

    Raises ValueError for an unknown format, and for Parquet also for a row that does not match RESULT_SCHEMA.
    """
    if check_format(shard_format) == PARQUET:
        return encode_parquet(rows)
    return encode_jsonl(rows)


def decode_shard(body: bytes) -> list[dict[str, Any]]:
    """Return the rows of a shard in either format, detected by the Parquet magic bytes.

    Raises ValueError (json.JSONDecodeError and UnicodeDecodeError included) when `body` is not a valid shard.
    """
    if body.startswith(PARQUET_MAGIC):
        return decode_parquet(body)
    return decode_jsonl(body)


def encode_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    """Return one JSON object per row, each ended by "\\n", in UTF-8 with non-ASCII characters unescaped."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def decode_jsonl(body: bytes) -> list[dict[str, Any]]:
    # Split at "\n" only: rows hold U+2028 and U+0085 unescaped, and str.splitlines splits at both.
    return [json.loads(line) for line in body.decode().split("\n") if line]


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Return `rows` as a table of RESULT_SCHEMA.

    Raises ValueError naming the first row with missing or extra fields, a null `uri` or `top_k`, or a value
    of the wrong type. pyarrow alone would drop unknown fields and store null for missing ones.
    """
    for index, row in enumerate(rows):
        _check_row(index, row)
    try:
        return pa.Table.from_pylist(list(rows), schema=RESULT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"result rows do not match the Parquet result schema: {e}") from e


def _check_row(index: int, row: dict[str, Any]) -> None:
    if not isinstance(row, dict) or set(row) != set(ROW_FIELDS):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"result row {index} has fields {found}; expected exactly {list(ROW_FIELDS)}")
    if row["uri"] is None or row["top_k"] is None:
        raise ValueError(f"result row {index} ({row['uri']!r}) has a null uri or top_k; use an empty list for no labels")
    for item in row["top_k"]:
        if not isinstance(item, dict) or set(item) != set(TOP_K_FIELDS):
            raise ValueError(f"result row {index} ({row['uri']!r}) has a top_k entry {item!r}; expected {{label, score}}")
    error = row["error"]
    if error is not None and (not isinstance(error, dict) or set(error) != set(ERROR_FIELDS)):
        raise ValueError(f"result row {index} ({row['uri']!r}) has the error {error!r}; expected null or {{code, message}}")


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Return the rows of a RESULT_SCHEMA table as dicts, with fields in schema order like the JSONL rows."""
    return table.to_pylist()


def encode_parquet(rows: Sequence[dict[str, Any]]) -> bytes:
    """Return a whole Parquet file containing `rows`. Raises ValueError like `rows_to_table`."""
    buffer = io.BytesIO()
    write_parquet(rows_to_table(rows), buffer)
    return buffer.getvalue()


def write_parquet(table: pa.Table, sink: BinaryIO) -> None:
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION)


def decode_parquet(body: bytes) -> list[dict[str, Any]]:
    """Return the rows of a Parquet shard. Raises ValueError for a corrupt file or one of another schema."""
    return table_to_rows(decode_parquet_table(body))


def decode_parquet_table(body: bytes) -> pa.Table:
    """Return a Parquet shard as a table of RESULT_SCHEMA. Raises ValueError like `decode_parquet`."""
    try:
        table = pq.read_table(pa.BufferReader(body))
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"not a readable Parquet file: {e}") from e
    return conform_table(table)


def conform_table(table: pa.Table) -> pa.Table:
    """Return `table` with RESULT_SCHEMA's types, cast when a writer stored compatible ones.

    Raises ValueError naming both schemas when the columns differ or cannot be cast.
    """
    if table.schema.equals(RESULT_SCHEMA, check_metadata=False):
        return table
    try:
        return table.select(list(ROW_FIELDS)).cast(RESULT_SCHEMA)
    except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        found = ", ".join(f"{field.name}: {field.type}" for field in table.schema)
        raise ValueError(f"Parquet columns ({found}) do not match the result schema ({_describe_schema()}): {e}") from e


def _describe_schema() -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in RESULT_SCHEMA)
