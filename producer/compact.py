"""Compaction: merge a finished job's shards, in batch order, into a few large files.

The files go to `{output}/{job_id}/compacted/part-00000.{jsonl,parquet}`, followed by `_MANIFEST.json`,
which lists each file with its rows and the batches it covers. Shards are read one at a time. Each
compacted file is written to a local temporary file, then moved into place (local output) or uploaded
with a multipart upload (S3 output), so readers never see a partial file and the local disk stores at most
one file of about the target size.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from producer.constants import STATE_CANCELLED, STATE_FAILED, STATE_SUCCEEDED
from producer.errors import ClipfleetError, StorageError
from producer.formats import (
    CONTENT_TYPES,
    PARQUET,
    PARQUET_COMPRESSION,
    PARQUET_MAGIC,
    RESULT_SCHEMA,
    check_format,
    decode_jsonl,
    decode_parquet,
    decode_parquet_table,
    encode_jsonl,
    rows_to_table,
)
from producer.results import job_output, list_shards
from producer.state import JobStore
from producer.storage import Storage, join_location
from producer.uris import S3Uri, parse_location

logger = logging.getLogger(__name__)

COMPACTED_FOLDER = "compacted"
MANIFEST_NAME = "_MANIFEST.json"
COMPACTED_NAME = "part-{index:05d}.{extension}"
COMPACTED_NAME_RE = re.compile(r"^part-\d{5,}\.(jsonl|parquet)$")
DEFAULT_TARGET_SIZE_BYTES = 256 * 1024 * 1024
COMPACTABLE_STATES = (STATE_SUCCEEDED, STATE_CANCELLED)
# A Parquet row group is written once this many rows, or this many bytes of Arrow data, are buffered, so
# small batches (64 rows by default) do not become one tiny row group each. Memory contains at most one
# row group plus one shard.
ROW_GROUP_MAX_ROWS = 65536
ROW_GROUP_MAX_BYTES = 64 * 1024 * 1024


class CompactionRejected(ClipfleetError):
    """The job cannot be compacted now: it is not finished, changed meanwhile, or was compacted before."""


@dataclass(frozen=True)
class CompactedFile:
    """One compacted file: its rows, size, and the range and count of the shards (batches) it contains."""

    name: str
    location: str
    rows: int
    size_bytes: int
    first_batch: int
    last_batch: int
    shards: int


@dataclass(frozen=True)
class Compaction:
    """Result of `compact_job`: the files written, in order, the manifest's location, and the shards deleted."""

    job_id: str
    format: str
    manifest: str
    files: list[CompactedFile] = field(default_factory=list)
    shards_deleted: int = 0

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.files)


def compact_job(
    store: JobStore,
    storage: Storage,
    job_id: str,
    target_size_bytes: int = DEFAULT_TARGET_SIZE_BYTES,
    output_format: str | None = None,
    delete_shards: bool = False,
) -> Compaction:
    """Merge a succeeded or cancelled job's shards, in batch order, into files of about `target_size_bytes`.

    A file is closed once it reaches the target size, so each file but the last exceeds it by less than
    one shard (JSONL) or one row group (Parquet). `output_format` is "jsonl" or "parquet", by default the
    job's own. `_MANIFEST.json` is written after every file, and only then are the shards deleted when
    `delete_shards` is set. Files of an earlier, interrupted compaction that the manifest does not list
    are deleted last.

    Raises JobNotFound for an unknown job, and ValueError for an invalid target size or format. Raises
    CompactionRejected for a job that is queued, running or failed, that started a retry round meanwhile,
    or whose manifest already exists. Raises StorageError when a shard cannot be read or a file cannot be
    written.
    """
    if target_size_bytes < 1:
        raise ValueError(f"target size {target_size_bytes!r} bytes is invalid: give a positive number of bytes")
    before = _compactable_fields(store, job_id)
    spec = store.spec(job_id)
    shard_format = check_format(output_format or spec.format)
    folder = job_output(spec, job_id)
    compacted = join_location(folder, COMPACTED_FOLDER)
    manifest = join_location(compacted, MANIFEST_NAME)
    _check_not_compacted(storage, job_id, manifest)

    shards = list_shards(storage, folder)
    files = _write_files(storage, folder, shards, compacted, shard_format, target_size_bytes)
    _check_unchanged(store, job_id, before)
    summary = _manifest(job_id, shard_format, target_size_bytes, before, files, delete_shards)
    storage.put_bytes(manifest, json.dumps(summary, indent=2, ensure_ascii=False).encode(), "application/json", job_id=job_id)
    logger.info("Job %s compacted: %d shards into %d %s files under %s", job_id, len(shards), len(files), shard_format, compacted)
    deleted = _delete_shards(storage, folder, shards) if delete_shards else 0
    _delete_leftovers(storage, compacted, {item.name for item in files})
    return Compaction(job_id, shard_format, manifest, files, deleted)


def _compactable_fields(store: JobStore, job_id: str) -> dict[str, str]:
    """Return the job's hash fields. Raises CompactionRejected unless the job succeeded or was cancelled."""
    store.state(job_id)  # raises JobNotFound with the product's message
    fields = store.fields(job_id)
    state = fields["state"]
    if state not in COMPACTABLE_STATES:
        fix = "submit it again" if state == STATE_FAILED else "wait for it to finish (`clipfleet wait`)"
        raise CompactionRejected(
            f"job {job_id} is {state}: only a succeeded or cancelled job can be compacted, because its shards "
            f"may still change or be incomplete; {fix}"
        )
    return fields


def _check_unchanged(store: JobStore, job_id: str, before: dict[str, str]) -> None:
    """Raise CompactionRejected when the job left its state or started a retry round while its shards were read."""
    # NOTE: a worker that took a batch before the job was cancelled may still write its shard after this
    # check. Such a shard is missing from the compacted files, and --delete-shards keeps it.
    after = store.fields(job_id)
    for name in ("state", "retry_round"):
        if after.get(name) != before.get(name):
            raise CompactionRejected(
                f"job {job_id} changed while it was compacted ({name} {before.get(name)!r} became {after.get(name)!r}), "
                "so the compacted files may miss rows and no manifest was written; compact it again once it finishes"
            )


def _check_not_compacted(storage: Storage, job_id: str, manifest: str) -> None:
    if not storage.exists(manifest):
        return
    try:
        deleted = bool(json.loads(storage.get_bytes(manifest)).get("delete_shards"))
    except (ValueError, AttributeError):
        deleted = False
    if deleted:
        raise CompactionRejected(
            f"job {job_id} was already compacted and its shards deleted: its results are the files that {manifest} lists"
        )
    raise CompactionRejected(
        f"job {job_id} was already compacted ({manifest} exists); delete that manifest, or the folder that "
        "contains it, to compact the job again from its shards"
    )


def _write_files(
    storage: Storage, folder: str, shards: list[tuple[int, str]], compacted: str, shard_format: str, target_size_bytes: int
) -> list[CompactedFile]:
    """Write the shards' rows into compacted files, rolling over to the next file at the target size."""
    files: list[CompactedFile] = []
    current: _CompactedFileWriter | None = None
    try:
        for batch, name in shards:
            if current is None:
                current = _CompactedFileWriter(storage, compacted, len(files), shard_format, target_size_bytes)
            location = join_location(folder, name)
            body = storage.get_bytes(location)
            try:
                current.add(batch, body)
            except ValueError as e:
                raise StorageError(f"shard {location!r} cannot be compacted: {e}") from e
            except OSError as e:  # the local temporary file, such as a full disk
                raise StorageError(f"writing {current.location!r} failed: {e}") from e
            if current.size_bytes() >= target_size_bytes:
                files.append(current.commit())
                current = None
        if current is not None:
            files.append(current.commit())
            current = None
    finally:
        if current is not None:
            current.discard()
    return files


def _manifest(
    job_id: str, shard_format: str, target_size_bytes: int, fields: dict[str, str], files: list[CompactedFile], delete_shards: bool
) -> dict[str, Any]:
    """Return the contents of `_MANIFEST.json`. File entries omit `location`, since it moves with the folder."""
    entries = [{key: value for key, value in asdict(item).items() if key != "location"} for item in files]
    return {
        "job_id": job_id,
        "format": shard_format,
        "job_state": fields["state"],
        "retry_round": int(fields.get("retry_round", 0)),
        "target_size_bytes": target_size_bytes,
        "rows": sum(item.rows for item in files),
        "shards": sum(item.shards for item in files),
        "delete_shards": delete_shards,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
    }


def _delete_shards(storage: Storage, folder: str, shards: list[tuple[int, str]]) -> int:
    for _, name in shards:
        storage.delete(join_location(folder, name))
    logger.info("Deleted %d shards under %s", len(shards), folder)
    return len(shards)


def _delete_leftovers(storage: Storage, compacted: str, written: set[str]) -> None:
    """Delete compacted files that an earlier, interrupted run wrote and this run's manifest does not list."""
    for name in storage.list_names(compacted):
        if COMPACTED_NAME_RE.match(name) and name not in written:
            logger.info("Deleting %s, left by an earlier compaction", join_location(compacted, name))
            storage.delete(join_location(compacted, name))


class _CompactedFileWriter:
    """One compacted file being written: a local temporary file, committed to its location at the end."""

    def __init__(self, storage: Storage, compacted: str, index: int, shard_format: str, target_size_bytes: int) -> None:
        self.name = COMPACTED_NAME.format(index=index, extension=shard_format)
        self.location = join_location(compacted, self.name)
        self.staged = _StagedFile(storage, self.location, CONTENT_TYPES[shard_format])
        self.encoder: _JsonlEncoder | _ParquetEncoder
        if shard_format == PARQUET:
            self.encoder = _ParquetEncoder(self.staged.file, min(ROW_GROUP_MAX_BYTES, target_size_bytes))
        else:
            self.encoder = _JsonlEncoder(self.staged.file)
        self.rows = 0
        self.batches: list[int] = []

    def add(self, batch: int, body: bytes) -> None:
        """Append the rows of one shard, in either format. Raises ValueError for an invalid shard."""
        self.rows += self.encoder.add(body)
        self.batches.append(batch)

    def size_bytes(self) -> int:
        """Return the bytes written so far; Parquet rows still buffered for a row group are not counted."""
        return self.staged.file.tell()

    def commit(self) -> CompactedFile:
        try:
            self.encoder.close()
        except OSError as e:
            raise StorageError(f"writing {self.location!r} failed: {e}") from e
        size_bytes = self.staged.commit()
        logger.info("Wrote %s: %d rows of batches %d to %d, %d bytes", self.location, self.rows, self.batches[0], self.batches[-1], size_bytes)
        return CompactedFile(self.name, self.location, self.rows, size_bytes, self.batches[0], self.batches[-1], len(self.batches))

    def discard(self) -> None:
        try:
            self.encoder.close()  # a ParquetWriter left open raises from its finalizer once the file is closed
        except (OSError, ValueError, pa.ArrowException):
            logger.debug("Closing the encoder of %s failed while discarding it", self.location, exc_info=True)
        self.staged.discard()


class _JsonlEncoder:
    def __init__(self, file: IO[bytes]) -> None:
        self.file = file

    def add(self, body: bytes) -> int:
        """Append a shard's rows and return how many. A JSONL shard is decoded to check it, then copied as it is."""
        if body.startswith(PARQUET_MAGIC):
            rows = decode_parquet(body)
            self.file.write(encode_jsonl(rows))
            return len(rows)
        count = len(decode_jsonl(body))
        self.file.write(body if not body or body.endswith(b"\n") else body + b"\n")
        return count

    def close(self) -> None:
        pass


class _ParquetEncoder:
    """Appends rows to a Parquet file, buffering them into row groups of up to ROW_GROUP_MAX_ROWS rows.

    Parquet shards are appended as Arrow tables, without converting their rows to Python objects.
    """

    def __init__(self, file: IO[bytes], row_group_max_bytes: int) -> None:
        self.writer = pq.ParquetWriter(file, RESULT_SCHEMA, compression=PARQUET_COMPRESSION)
        self.row_group_max_bytes = row_group_max_bytes
        self.pending: list[pa.Table] = []

    def add(self, body: bytes) -> int:
        """Buffer a shard's rows and return how many. Raises ValueError when a row does not match RESULT_SCHEMA."""
        table = decode_parquet_table(body) if body.startswith(PARQUET_MAGIC) else rows_to_table(decode_jsonl(body))
        self.pending.append(table)
        pending_rows = sum(item.num_rows for item in self.pending)
        pending_bytes = sum(item.nbytes for item in self.pending)
        if pending_rows >= ROW_GROUP_MAX_ROWS or pending_bytes >= self.row_group_max_bytes:
            self.flush()
        return table.num_rows

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending = []
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.writer.close()


class _StagedFile:
    """A local temporary file that `commit` moves to a local path or uploads to S3. Not thread-safe."""

    def __init__(self, storage: Storage, location: str, content_type: str) -> None:
        self.storage = storage
        self.location = location
        self.content_type = content_type
        self.target = parse_location(location)
        self.temporary: Path | None = None
        if isinstance(self.target, S3Uri):
            self.file: IO[bytes] = tempfile.TemporaryFile()
            return
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        except OSError as e:
            raise StorageError(f"writing {location!r} failed: {e}") from e
        self.temporary = Path(name)
        self.file = os.fdopen(handle, "w+b")

    def commit(self) -> int:
        """Move or upload the file to its location and return its size in bytes. Raises StorageError."""
        try:
            self.file.flush()
            size_bytes = self.file.tell()
            if isinstance(self.target, S3Uri):
                self._upload(self.target)
            else:
                os.fsync(self.file.fileno())
                self.file.close()
                os.chmod(self.temporary, 0o644)  # mkstemp creates 0600; results are meant to be read by others
                os.replace(self.temporary, self.target)
        except (OSError, *_upload_errors()) as e:
            self.discard()
            raise StorageError(f"writing {self.location!r} failed: {e}") from e
        self.file.close()
        return size_bytes

    def _upload(self, target: S3Uri) -> None:
        # boto3's managed upload sends files above 8 MiB in parts, so the file is never read into memory whole.
        self.file.seek(0)
        self.storage.client.upload_fileobj(self.file, target.bucket, target.key, ExtraArgs={"ContentType": self.content_type})

    def discard(self) -> None:
        self.file.close()
        if self.temporary is not None:
            self.temporary.unlink(missing_ok=True)


def _upload_errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (Boto3Error, BotoCoreError, ClientError)
