"""The worker's own check of a job's size and locations, made before any image of the job is touched.

Producers check jobs at submit, but anyone who can write to the Redis that a worker reads can enqueue a
job spec directly. So each worker checks again, against its own settings:

- The job has at most `CLIPFLEET_MAX_LABELS` labels and `CLIPFLEET_MAX_PROMPTS` prompts.
- An S3 source or output must be in `CLIPFLEET_ALLOWED_BUCKETS` when that setting is not empty.
- A local source folder or output must lie under one of `CLIPFLEET_LOCAL_ROOTS`, with symbolic links
  resolved. With that setting empty, the worker rejects every local path. A local manifest is read at
  submit, so only the local image paths it lists must lie under those folders. `clipfleet run` sets it for its private
  worker to the job's source and output folders.
"""

from __future__ import annotations

from pathlib import Path

from producer.errors import ClipfleetError, InvalidJobSpec
from producer.settings import Settings
from producer.sources import is_read_at_submit
from producer.spec import JobSpec, check_job_size, local_root
from producer.uris import S3Uri, parse_location


class JobRejected(ClipfleetError):
    """A job is larger than, or names a source or output outside, what this worker's settings allow."""


def check_job(spec: JobSpec, settings: Settings) -> None:
    """Raise JobRejected, naming the value and the setting to change, if `spec` is not allowed here."""
    try:
        check_job_size(spec, settings.max_labels, settings.max_prompts)
    except InvalidJobSpec as e:
        raise JobRejected(str(e)) from e
    check_job_locations(spec, settings)


def check_job_locations(spec: JobSpec, settings: Settings) -> None:
    """Raise JobRejected, naming the location and the setting to change, if `spec` is not allowed here."""
    checked = []
    # A manifest or S3 Inventory report is read at submit, so workers need only its S3 entries, or the local
    # image paths in it, which `allowed_local_root` confines. Other sources are checked as the folders images come from.
    for source in spec.sources:
        if not is_read_at_submit(source):
            checked.append(("source", source if source.startswith("s3://") else str(local_root(spec))))
    checked.append(("output", spec.output))
    for role, value in checked:
        location = parse_location(value)
        if isinstance(location, S3Uri):
            _check_bucket(role, location, settings.allowed_buckets)
        else:
            _check_local(role, location, settings.local_roots)


def allowed_local_root(spec: JobSpec, settings: Settings) -> Path | None:
    """Return the folder that the job's local images must lie under, or None when local paths are not allowed.

    It is the job's source folder (or its manifest's folder) when that lies under one of
    `CLIPFLEET_LOCAL_ROOTS`. With None, `workers.fetch` reads no local path.
    """
    folder = local_root(spec)
    if folder is None:
        return None
    try:
        _check_local("source", folder, settings.local_roots)
    except JobRejected:
        return None
    return folder


def _check_bucket(role: str, location: S3Uri, allowed_buckets: list[str]) -> None:
    if allowed_buckets and location.bucket not in allowed_buckets:
        raise JobRejected(
            f"the job's {role} {str(location)!r} is in bucket {location.bucket!r}, which is not in this "
            f"worker's CLIPFLEET_ALLOWED_BUCKETS={sorted(allowed_buckets)!r}"
        )


def _check_local(role: str, path: Path, local_roots: list[str]) -> None:
    if not local_roots:
        raise JobRejected(
            f"the job's {role} is the local path {str(path)!r}, and this worker accepts no local paths; "
            "use s3:// locations, or set CLIPFLEET_LOCAL_ROOTS on the worker to the folders it may use"
        )
    resolved = path.resolve()
    for root in local_roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return
    raise JobRejected(
        f"the job's {role} {str(path)!r} is not under this worker's CLIPFLEET_LOCAL_ROOTS={local_roots!r}; "
        "add its folder to that setting or move the data"
    )
