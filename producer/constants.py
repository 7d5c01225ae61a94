"""Names shared by producers and workers: task names, the default queue, Redis keys, error codes."""

from __future__ import annotations

# Celery task names. Producers send tasks by name, so they never import the worker code.
TASK_CLASSIFY_BATCH = "clipfleet.classify_batch"
# Embeds the pending requests of a realtime queue (see producer.realtime). The HTTP API sends it, and so does a
# worker that leaves requests in the queue.
TASK_EMBED = "clipfleet.embed"
# Message header with the Unix time at which the producer published a batch; workers report the queue wait from it.
PUBLISHED_AT_HEADER = "clipfleet_published_at"

DEFAULT_QUEUE = "clipfleet"
# The queue of realtime embedding requests, which workers read before DEFAULT_QUEUE.
DEFAULT_REALTIME_QUEUE = "clipfleet-realtime"
# Backpressure defaults (CLIPFLEET_QUEUE_LOW_WATER, _AHEAD_S, _MAX_TASKS): a paused producer resumes at half
# the high-water mark, which keeps 180 s of the fleet's work queued, at most 10,000 tasks.
DEFAULT_LOW_WATER = 0.5
DEFAULT_AHEAD_S = 180.0
DEFAULT_MAX_TASKS = 10_000
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_TEMPLATES = ("a photo of a {}.",)

# Every Redis key the product writes starts with this prefix.
KEY_PREFIX = "clipfleet:"
JOB_KEY = KEY_PREFIX + "job:{job_id}"  # hash: spec, state, counters, timestamps
# Batches of retry round N > 0 appear in the next two keys as "N:batch", first-run batches as "batch".
JOB_BATCHES_KEY = KEY_PREFIX + "job:{job_id}:batches"  # set of finished batches
JOB_ATTEMPTS_KEY = KEY_PREFIX + "job:{job_id}:attempts"  # hash: batch -> deliveries
# hash: batch number -> JSON {"succeeded": n, "failed": n, "errors": {code: n}}, what the batch added to the counters
JOB_BATCH_COUNTS_KEY = KEY_PREFIX + "job:{job_id}:batch_counts"
JOB_FINALIZED_KEY = KEY_PREFIX + "job:{job_id}:finalized"  # set once, by the process that writes _SUCCESS.json
# set once per retry round (1, 2, ...), by the process that rewrites _SUCCESS.json at the end of that round
JOB_ROUND_FINALIZED_KEY = KEY_PREFIX + "job:{job_id}:finalized:{round}"
JOBS_INDEX_KEY = KEY_PREFIX + "jobs"  # sorted set: job id scored by creation time
# string with a TTL: the token of the producer process that is enqueueing the job, refreshed while it runs
JOB_PRODUCER_KEY = KEY_PREFIX + "job:{job_id}:producer"
# sorted set: progress samples "time:done" scored by time, for the rate over the last minute
JOB_PROGRESS_KEY = KEY_PREFIX + "job:{job_id}:progress"
# string: job id of the latest job with a given spec digest, so a resubmission can find it
SPEC_INDEX_KEY = KEY_PREFIX + "spec:{digest}"
PROMPT_CACHE_KEY = KEY_PREFIX + "prompts:{digest}"  # label embeddings, see workers.prompts
# The prompt cache's eviction index (see workers.prompt_store), outside the pattern of PROMPT_CACHE_KEY:
PROMPT_CACHE_LRU_KEY = KEY_PREFIX + "prompt_cache:lru"  # sorted set: digest scored by its last use on the clock below
PROMPT_CACHE_SIZES_KEY = KEY_PREFIX + "prompt_cache:sizes"  # hash: digest -> bytes of its embeddings
PROMPT_CACHE_BYTES_KEY = KEY_PREFIX + "prompt_cache:bytes"  # string: the sum of those bytes
PROMPT_CACHE_CLOCK_KEY = KEY_PREFIX + "prompt_cache:clock"  # counter: a logical clock, incremented on each use

# Live workers. Each ready worker refreshes its hash (model, revision, queues, heartbeat time) with a TTL, and its
# name in the index sorted set, scored by the time its hash expires.
WORKER_KEY = KEY_PREFIX + "worker:{name}"
WORKERS_INDEX_KEY = KEY_PREFIX + "workers"
# Realtime embedding requests (see producer.realtime): a list of waiting request ids per realtime queue, each
# request's JSON body (with a TTL), and a list per request into which a worker pushes the JSON reply.
REALTIME_PENDING_KEY = KEY_PREFIX + "realtime:{queue}:pending"
REALTIME_REQUEST_KEY = KEY_PREFIX + "realtime:request:{request_id}"
REALTIME_REPLY_KEY = KEY_PREFIX + "realtime:reply:{request_id}"
# A string that exists while a TASK_EMBED task of the realtime queue is queued, so senders queue at most one task
# at a time. The worker that runs the task deletes it before taking requests. It expires after
# producer.realtime.WAKE_TTL_S.
REALTIME_WAKE_KEY = KEY_PREFIX + "realtime:{queue}:wake"
# The HTTP API's files and batches (see producer.api): a hash per object and an index sorted by creation time.
API_FILE_KEY = KEY_PREFIX + "api:file:{file_id}"
API_FILES_INDEX_KEY = KEY_PREFIX + "api:files"
API_BATCH_KEY = KEY_PREFIX + "api:batch:{batch_id}"
API_BATCHES_INDEX_KEY = KEY_PREFIX + "api:batches"
# set: the ids of batches that are not yet completed, failed, expired or cancelled, which the drivers advance
API_BATCHES_ACTIVE_KEY = KEY_PREFIX + "api:batches:active"
# string with a TTL: the API server process that currently drives a batch
API_BATCH_LEASE_KEY = KEY_PREFIX + "api:batch:{batch_id}:lease"

# Image file extensions listed by default (compared case-insensitively).
DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# Per-image error codes that appear in result rows.
ERROR_CODES = {
    "not_found": "the object or file does not exist",
    "access_denied": "the storage service denied the read, or the location is outside the allowed buckets or root",
    "too_large": "the object is larger than CLIPFLEET_MAX_IMAGE_BYTES",
    "too_many_pixels": "width times height is above CLIPFLEET_MAX_IMAGE_PIXELS",
    "decode_error": "the bytes are not a readable image (empty, truncated or corrupt)",
    "unsupported_format": "the image format is not one the workers decode (for example SVG, PDF, EPS, HEIC)",
    "fetch_timeout": "reading the object took longer than the fetch timeout",
    "fetch_error": "reading the object failed after retries for another reason",
    "delivery_attempts_exceeded": "the batch was delivered more times than the cap without finishing",
}

# Prefixes of counter fields in the job hash: `errors:<code>` counts result rows by error code, and
# `retries:<kind>` counts retried operations (for example `retries:s3_get`), summed as the job's retries.
ERRORS_FIELD_PREFIX = "errors:"
RETRIES_FIELD_PREFIX = "retries:"
# `giveups:<kind>` counts operations whose retries ran out (for example `giveups:s3_get`).
GIVEUPS_FIELD_PREFIX = "giveups:"
REDELIVERIES_FIELD = "redeliveries"
# Batches retried by the task after an exception, such as Redis or storage errors or the soft time limit.
BATCH_RETRIES_FIELD = RETRIES_FIELD_PREFIX + "batch"
# Redis commands of a batch retried after a connection error or a timeout.
REDIS_RETRIES_FIELD = RETRIES_FIELD_PREFIX + "redis"

# Job states stored in the job hash.
STATE_QUEUED = "queued"
STATE_RUNNING = "running"
STATE_SUCCEEDED = "succeeded"
STATE_CANCELLED = "cancelled"
STATE_FAILED = "failed"  # listing, the model or the output failed for the whole job; workers drop its batches
FINAL_STATES = (STATE_SUCCEEDED, STATE_CANCELLED, STATE_FAILED)

SUCCESS_MARKER = "_SUCCESS.json"
# The summary of a cancelled job's partial results, rewritten as its last batches finish.
CANCELLED_MARKER = "_CANCELLED.json"
# Result shard file names by format (see producer.formats). SHARD_NAME is the default format's.
SHARD_NAMES = {"jsonl": "part-{batch:06d}.jsonl", "parquet": "part-{batch:06d}.parquet"}
SHARD_NAME = SHARD_NAMES["jsonl"]

# Images per batch, the largest `batch_size` a job may set.
MAX_BATCH_SIZE = 4096
# Longest URI or path a manifest line or a message may hold, in UTF-8 bytes. Linux paths are at most
# 4,096 bytes (PATH_MAX). S3 URIs are shorter: `s3://`, a bucket of at most 63 characters, `/` and a key
# of at most 1,024 bytes, which `parse_s3_uri` checks on its own.
MAX_MANIFEST_URI_BYTES = 4096
