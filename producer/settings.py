"""Runtime configuration read from `CLIPFLEET_*` environment variables."""

from __future__ import annotations

import json
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.constants import (
    DEFAULT_AHEAD_S,
    DEFAULT_LOW_WATER,
    DEFAULT_MAX_TASKS,
    DEFAULT_MODEL,
    DEFAULT_QUEUE,
    DEFAULT_REALTIME_QUEUE,
)

# TLS query parameters of a rediss:// URL that redis-py 8 (`Redis.from_url`) and kombu 5.7 (Celery's Redis
# broker) both read the same way. Both pass them to `redis.SSLConnection`.
REDIS_TLS_PARAMETERS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
# redis-py rejects `CERT_REQUIRED` while kombu reads an unknown value as "no certificate check", so only the
# lowercase names that both read alike are accepted.
REDIS_CERT_REQS = ("none", "optional", "required")
# Largest CLIPFLEET_TORCH_THREADS. OpenMP failed to start 100,000 threads and crashed the first forward pass,
# and 1,024 is more than the CPUs of common two-socket servers.
MAX_TORCH_THREADS = 1024


def check_redis_tls_parameters(url: str) -> None:
    """Raise ValueError for an `ssl_*` query parameter that redis-py and Celery would not read alike.

    The message names the parameter and its value, never the URL, which may contain a password.
    """
    parts = urlsplit(url)
    pairs = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True) if name.startswith("ssl_")]
    names = [name for name, _ in pairs]
    for name, value in pairs:
        if name not in REDIS_TLS_PARAMETERS:
            raise ValueError(f"query parameter {name!r} is not supported; use {', '.join(REDIS_TLS_PARAMETERS)}")
        if names.count(name) > 1:
            raise ValueError(f"query parameter {name!r} appears more than once; give it once")
        if name == "ssl_cert_reqs" and value not in REDIS_CERT_REQS:
            raise ValueError(f"ssl_cert_reqs={value!r} is invalid; use one of {', '.join(REDIS_CERT_REQS)}")
        if name == "ssl_check_hostname" and value.lower() not in ("true", "false"):
            raise ValueError(f"ssl_check_hostname={value!r} is invalid; use true or false")
    if pairs and parts.scheme.lower() != "rediss":
        raise ValueError(f"TLS query parameters ({', '.join(names)}) need a rediss:// URL; change the scheme to rediss")


def check_redis_url(url: str) -> None:
    """Raise ValueError when `url` is not a Redis URL that redis-py and Celery can use.

    The message never quotes the URL or parts of it, because a malformed URL may put its password where
    the port or host belongs.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis", "rediss", "unix"):
        raise ValueError("the URL must start with redis://, rediss:// or unix://, for example redis://host:6379/0")
    try:
        port = parts.port
    except ValueError:
        port = None
        malformed = True
    else:
        malformed = False
    if malformed or (parts.scheme.lower() != "unix" and not parts.hostname):
        raise ValueError(
            "the host or port of the URL is malformed; percent-encode '/', '?', '#' and '@' in the password "
            f"(for example '/' as %2F), as in redis://:PASSWORD@host:{port or 6379}/0"
        )
    check_redis_tls_parameters(url)


class Settings(BaseSettings):
    """Settings shared by producers and workers. AWS credentials come from the standard AWS chain."""

    # hide_input_in_errors keeps CLIPFLEET_REDIS_URL, which may contain a password, out of the text of a
    # ValidationError. `ValidationError.errors()` still carries each input, so print those only redacted.
    model_config = SettingsConfigDict(env_prefix="CLIPFLEET_", extra="ignore", hide_input_in_errors=True)

    redis_url: str | None = Field(
        None,
        description="Redis used as broker and job store; unset means `clipfleet run` starts a private one. "
        "A rediss:// URL takes the TLS query parameters ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs "
        "and ssl_check_hostname",
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint, for MinIO or other S3-compatible stores")
    model: str = Field(DEFAULT_MODEL, description="Hugging Face hub id or local directory of a CLIP checkpoint")
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(64, ge=1, le=4096, description="Images per task")
    model_batch_size: int = Field(
        32, ge=1, le=1024,
        description="Images per forward pass of the image tower, independent of the images per task. "
        "A task's images go through the model in chunks of this size while the next chunk is fetched and decoded",
    )
    jpeg_draft: bool = Field(
        True,
        description="Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode) when the "
        "smaller image still covers the model's input size. Faster, with pixels within the documented tolerance of "
        "CLIPImageProcessor; false decodes at full size for bit-exact preprocessing",
    )
    queue: str = DEFAULT_QUEUE
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Buckets jobs may read and write; empty allows all")
    local_roots: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Local folders a worker may read images from and write results to; empty rejects local paths")
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(89_478_485, ge=1)
    decode_budget_pixels: int = Field(
        100_000_000, ge=1, description="Pixels a worker process decodes and preprocesses at the same time, over all fetch threads"
    )
    visibility_timeout_s: int = Field(900, ge=10)
    fetch_threads: int = Field(16, ge=1, le=256)
    torch_threads: int | Literal["auto"] = Field(
        "auto",
        description="Threads each pool process of a worker gives the model on the CPU (torch's intra-op threads), "
        f"up to {MAX_TORCH_THREADS}. `auto` divides "
        "the CPUs the worker may use (its CPU affinity, capped by a cgroup CPU quota) among its pool processes, at least 1 each",
    )
    fetch_timeout_s: float = Field(30.0, gt=0)
    max_delivery_attempts: int = Field(5, ge=1)
    shutdown_grace_s: float = Field(60.0, ge=0, description="Seconds a worker keeps running its batches after SIGTERM before it hands them back to the queue and exits; keep it below Kubernetes' terminationGracePeriodSeconds")
    s3_max_attempts: int = Field(4, ge=1, le=20, description="Attempts per S3 image read or shard write, the first included. Transient errors (5xx, throttling, timeouts, dropped connections) are retried")
    retry_base_s: float = Field(0.2, ge=0, description="Base of the exponential backoff between S3 attempts, in seconds. Each wait is uniform in [0, base * 2^(failures-1)]")
    retry_max_s: float = Field(20.0, ge=0, description="No S3 retry starts later than this many seconds after the first attempt")
    queue_high_water: int | Literal["auto"] = Field(
        "auto",
        description="Producers pause while the queue contains this many tasks or more; `auto` keeps about "
        "CLIPFLEET_QUEUE_AHEAD_S seconds of the fleet's measured work queued, at most CLIPFLEET_QUEUE_MAX_TASKS",
    )
    queue_low_water: float = Field(
        DEFAULT_LOW_WATER, gt=0, lt=1, description="A paused producer resumes once the queue is at or below this fraction of the high-water mark"
    )
    queue_ahead_s: float = Field(DEFAULT_AHEAD_S, gt=0, description="Seconds of fleet work the automatic high-water mark keeps queued")
    queue_max_tasks: int = Field(DEFAULT_MAX_TASKS, ge=1, description="Largest automatic high-water mark, in tasks; bounds Redis memory")
    producer_lease_s: float = Field(
        30.0, ge=2, description="Seconds after a producer stops refreshing its claim on a job before `clipfleet resume` may take the job over"
    )
    max_labels: int = Field(20_000, ge=1, description="Maximum number of labels in one job; submit rejects a job with more")
    max_prompts: int = Field(100_000, ge=1, description="Maximum number of prompts in one job, over all labels; submit rejects a job with more")
    prompt_cache_max_mb: int = Field(
        256, ge=1,
        description="Bound on the label embeddings that the workers share through Redis, in MiB of embedding data "
        "over the whole fleet; the least recently used entries are evicted to stay under it",
    )
    realtime_queue: str = Field(
        DEFAULT_REALTIME_QUEUE,
        description="Queue of realtime embedding requests from the HTTP API. Workers read it before CLIPFLEET_QUEUE; "
        "an empty value makes a worker serve batch jobs only. Give each model of a mixed fleet its own realtime queue",
    )
    realtime_only: bool = Field(
        False, description="A worker reads the realtime queue only and no batch queue, for fleets that keep realtime latency apart from batch jobs"
    )
    realtime_max_requests: int = Field(
        64, ge=1, le=4096, description="Realtime requests a worker takes from its queue at once and embeds together"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys `clipfleet serve` accepts as `Authorization: Bearer KEY`, comma-separated; empty accepts every request",
    )
    api_files_uri: str | None = Field(
        None,
        description="Folder (s3:// prefix or local directory) where `clipfleet serve` keeps uploaded files, batch inputs "
        "and batch outputs; the workers must be allowed to read it. Unset disables /v1/files and /v1/batches",
    )
    api_timeout_s: float = Field(60.0, gt=0, description="Seconds an embeddings request waits for a worker before it fails with 504")
    api_queue_high_water: int = Field(
        1000, ge=1, description="Embeddings requests fail with 429 while the realtime queue holds this many waiting requests or more"
    )
    api_max_inputs: int = Field(2048, ge=1, description="Maximum number of inputs in one embeddings request")
    api_max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest body of an embeddings request, in bytes; larger requests fail with 413"
    )
    api_max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, description="Largest file `POST /v1/files` accepts, in bytes; larger uploads fail with 413"
    )
    log_level: str = "INFO"
    metrics_port: int | None = None

    @model_validator(mode="after")
    def _check_realtime_only(self) -> Settings:
        if self.realtime_only and not self.realtime_queue:
            raise ValueError(
                "CLIPFLEET_REALTIME_ONLY is set but CLIPFLEET_REALTIME_QUEUE is empty, so the worker would read no queue; "
                "set CLIPFLEET_REALTIME_QUEUE or unset CLIPFLEET_REALTIME_ONLY"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value:
            check_redis_url(value)
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_s3_endpoint_url(cls, value: str | None) -> str | None:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("the endpoint must be an http:// or https:// URL, for example http://minio:9000")
        if "@" in parts.netloc:
            # S3 clients sign requests with AWS credentials and ignore user information in the URL, which
            # would only leak into error messages.
            raise ValueError(
                "the endpoint URL must not contain a user name or password; give credentials through "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or an AWS profile"
            )
        return value

    @field_validator("queue_high_water", "torch_threads", mode="before")
    @classmethod
    def _parse_count_or_auto(cls, value: object, info: ValidationInfo) -> int | str:
        # Parsed here, so an invalid value gets one message instead of one per member of the union.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            count = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        except ValueError:
            count = None
        if info.field_name == "torch_threads":
            if count is None or not 1 <= count <= MAX_TORCH_THREADS:
                raise ValueError(f"use a whole number of threads from 1 to {MAX_TORCH_THREADS}, or auto")
        elif count is None or count < 1:
            raise ValueError("use a whole number of tasks of at least 1, or auto")
        return count

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("use one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("allowed_buckets", "local_roots", "api_keys", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str) and value.lstrip().startswith("["):
            return json.loads(value)  # a JSON list, for folder names that contain commas
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
