"""Names shared by producers and workers: task names, the default queue, Redis keys, error codes."""

from __future__ import annotations

# Celery task names. Producers send tasks by name, so they never import the worker code.
TASK_CLASSIFY_BATCH = "clipfleet.classify_batch"

DEFAULT_QUEUE = "clipfleet"
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_TEMPLATES = ("a photo of a {}.",)

# Every Redis key the product writes starts with this prefix.
KEY_PREFIX = "clipfleet:"
JOB_KEY = KEY_PREFIX + "job:{job_id}"  # hash: spec, state, counters, timestamps
JOB_BATCHES_KEY = KEY_PREFIX + "job:{job_id}:batches"  # set of finished batch numbers
JOB_ATTEMPTS_KEY = KEY_PREFIX + "job:{job_id}:attempts"  # hash: batch number -> deliveries
JOB_FINALIZED_KEY = KEY_PREFIX + "job:{job_id}:finalized"  # set once, by the process that writes _SUCCESS.json
JOBS_INDEX_KEY = KEY_PREFIX + "jobs"  # sorted set: job id scored by creation time
PROMPT_CACHE_KEY = KEY_PREFIX + "prompts:{digest}"  # label embeddings, see workers.prompts

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

# Job states stored in the job hash.
STATE_QUEUED = "queued"
STATE_RUNNING = "running"
STATE_SUCCEEDED = "succeeded"
STATE_CANCELLED = "cancelled"
STATE_FAILED = "failed"  # listing, the model or the output failed for the whole job; workers drop its batches
FINAL_STATES = (STATE_SUCCEEDED, STATE_CANCELLED, STATE_FAILED)

SUCCESS_MARKER = "_SUCCESS.json"
SHARD_NAME = "part-{batch:06d}.jsonl"
