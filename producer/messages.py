"""The task message schema: the JSON body of one batch task, defined once for producers and workers.

Job ids are validated here too, because they become parts of Redis keys and of result paths.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from producer.constants import MAX_BATCH_SIZE, MAX_MANIFEST_URI_BYTES
from producer.errors import ClipfleetError

MESSAGE_VERSION = 1
# A message carries at most one job's batch size of URIs, each at most a manifest entry's length.
MAX_URI_CHARS = MAX_MANIFEST_URI_BYTES

# The form `producer.client.new_job_id` produces: UTC time to the second, then 8 random hex digits.
GENERATED_JOB_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")
# Every job id accepted: a letter or digit, then up to 127 letters, digits, `_`, `.` or `-`, with no `..`.
# So an id is always one path segment and can never climb out of a results folder.
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used with fullmatch: `$` would allow a final newline
JOB_ID_FORM = "a letter or digit, then up to 127 letters, digits, '_', '.' or '-', with no '..'"


class InvalidJobId(ClipfleetError, ValueError):
    """A job id does not have the accepted form, so it is not used in any key or path."""


def check_job_id(job_id: object) -> str:
    """Return `job_id` unchanged when it is a valid job id.

    Raises InvalidJobId (a ValueError) quoting the value and the accepted form otherwise. Call it before a job id is used in a
    Redis key or a path.
    """
    if not isinstance(job_id, str):
        raise InvalidJobId(f"job id {job_id!r} must be a string of {JOB_ID_FORM}")
    if not JOB_ID_RE.fullmatch(job_id) or ".." in job_id:
        quoted = job_id if len(job_id) <= 140 else job_id[:137] + "..."
        raise InvalidJobId(f"invalid job id {quoted!r}: use {JOB_ID_FORM}, for example 20260101-120000-0123abcd")
    return job_id


class BatchMessage(BaseModel):
    """One batch of images of one job. The job's spec is read from Redis by `job_id`, not carried here.

    Fields are checked strictly: a number sent as a string, an unknown field or an invalid job id raises
    pydantic's ValidationError.

    `retry_round` is 0 for the job's first run. A retry round N > 0 carries the failed images of batch
    `batch` again, and the worker replaces their rows in that batch's existing shard. Serialization leaves
    `retry_round` out when it is 0, so first-run messages keep the form that older workers accept.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = MESSAGE_VERSION
    job_id: str = Field(min_length=1, max_length=128)
    batch: int = Field(ge=0)
    uris: list[Annotated[str, Field(min_length=1, max_length=MAX_URI_CHARS)]] = Field(min_length=1, max_length=MAX_BATCH_SIZE)
    retry_round: int = Field(default=0, ge=0)

    @field_validator("job_id")
    @classmethod
    def _check_job_id(cls, value: str) -> str:
        return check_job_id(value)

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value != MESSAGE_VERSION:
            raise ValueError(f"message version {value} is not supported; this worker reads version {MESSAGE_VERSION}")
        return value

    @model_serializer(mode="wrap")
    def _omit_first_round(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("retry_round") == 0:
            del data["retry_round"]
        return data
