"""The task message schema: the JSON body of one batch task, defined once for producers and workers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MESSAGE_VERSION = 1


class BatchMessage(BaseModel):
    """One batch of images of one job. The job's spec is read from Redis by `job_id`, not carried here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = MESSAGE_VERSION
    job_id: str = Field(min_length=1, max_length=128)
    batch: int = Field(ge=0)
    uris: list[str] = Field(min_length=1)
