"""Runtime configuration read from `CLIPFLEET_*` environment variables."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.constants import DEFAULT_MODEL, DEFAULT_QUEUE


class Settings(BaseSettings):
    """Settings shared by producers and workers. AWS credentials come from the standard AWS chain."""

    model_config = SettingsConfigDict(env_prefix="CLIPFLEET_", extra="ignore")

    redis_url: str | None = Field(None, description="Redis used as broker and job store; unset means `clipfleet run` starts a private one")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint, for MinIO or other S3-compatible stores")
    model: str = Field(DEFAULT_MODEL, description="Hugging Face hub id or local directory of a CLIP checkpoint")
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(64, ge=1, le=4096, description="Images per task")
    queue: str = DEFAULT_QUEUE
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Buckets jobs may read and write; empty allows all")
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(89_478_485, ge=1)
    visibility_timeout_s: int = Field(900, ge=10)
    fetch_threads: int = Field(16, ge=1, le=256)
    fetch_timeout_s: float = Field(30.0, gt=0)
    max_delivery_attempts: int = Field(5, ge=1)
    queue_high_water: int = Field(1000, ge=1, description="Producers pause while the queue contains this many tasks or more")
    log_level: str = "INFO"
    metrics_port: int | None = None

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("use one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return [bucket.strip() for bucket in value.split(",") if bucket.strip()]
        return value
