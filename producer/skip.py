"""Leaving out images that earlier jobs already classified (`submit --skip-existing PREFIX`).

An earlier job counts when its folder under PREFIX contains a job summary (`_SUCCESS.json`, or
`_CANCELLED.json` for the partial results of a cancelled job) with the same model, model revision,
prompts (labels and templates), top-k, threshold and multi-label mode as the new job. Its rows
without an error are the images to leave out. The URIs are kept in a `FingerprintSet` on disk, so
memory does not grow with them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.constants import CANCELLED_MARKER, SUCCESS_MARKER
from producer.errors import InvalidJobSpec, StorageError
from producer.fingerprints import FingerprintSet
from producer.results import list_shards, read_rows
from producer.spec import JobSpec
from producer.storage import Storage, as_folder, join_location
from producer.uris import S3Uri, parse_location

logger = logging.getLogger(__name__)

SUMMARY_MARKERS = (SUCCESS_MARKER, CANCELLED_MARKER)


@dataclass
class ClassifiedUris:
    """The URIs that matching earlier jobs classified without error, and the folders they came from."""

    uris: FingerprintSet
    folders: list[str] = field(default_factory=list)
    skipped: int = 0  # images of the listing left out so far

    @classmethod
    def scan(cls, storage: Storage, prefix: str, spec: JobSpec) -> ClassifiedUris:
        """Read the result rows of every earlier job under `prefix` whose summary matches `spec`.

        Raises InvalidJobSpec when `prefix` cannot be listed (a missing folder or bucket), and StorageError
        when a matching job's shard cannot be read.
        """
        found = cls(FingerprintSet())
        for folder in _job_folders(storage, prefix):
            summary = _read_summary(storage, folder)
            if summary is None or not matches(summary, spec):
                continue
            found.folders.append(folder)
            for _, name in list_shards(storage, folder):
                for row in read_rows(storage, join_location(folder, name)):
                    if row["error"] is None:
                        found.uris.add(row["uri"])
        logger.info("%d images classified by %d earlier jobs under %s will be skipped", len(found.uris), len(found.folders), prefix)
        return found

    def filter(self, uris: Iterator[str]) -> Iterator[str]:
        """Yield the URIs of `uris` that no matching earlier job classified, counting the others in `skipped`."""
        try:
            for uri in uris:
                if uri in self.uris:
                    self.skipped += 1
                else:
                    yield uri
        finally:
            self.uris.close()


def check_skip_existing(prefix: str) -> str:
    """Return `prefix` when it is an S3 URI or a local path. Raises InvalidJobSpec naming the value otherwise."""
    if not prefix.strip():
        raise InvalidJobSpec("--skip-existing is empty: give the output prefix or folder of the earlier jobs")
    try:
        parse_location(prefix)
    except ValueError as e:
        raise InvalidJobSpec(f"--skip-existing {prefix!r} is invalid: {e}") from e
    return prefix


def matches(summary: dict[str, Any], spec: JobSpec) -> bool:
    """Return whether an earlier job's summary has the same model, revision, prompts, top-k, threshold and
    multi-label mode as `spec`. Summaries written before the threshold and multi-label options match the defaults."""
    same_revision = spec.model_revision is None or summary.get("model_revision") == spec.model_revision
    return (
        summary.get("model") == spec.model
        and same_revision
        and summary.get("prompts") == spec.prompts
        and summary.get("top_k", spec.top_k) == spec.top_k
        and summary.get("threshold") == spec.threshold
        and summary.get("multi_label", False) == spec.multi_label
    )


def _job_folders(storage: Storage, prefix: str) -> Iterator[str]:
    """Yield each folder under `prefix`, at any depth, that contains a job summary."""
    target = parse_location(prefix)
    seen: set[str] = set()
    if isinstance(target, S3Uri):
        base = as_folder(target)
        try:
            for key, _ in storage.iter_objects(base):
                folder, _, name = key.rpartition("/")
                if name in SUMMARY_MARKERS and folder not in seen:
                    seen.add(folder)
                    yield str(S3Uri(target.bucket, folder))
        except StorageError as e:
            raise InvalidJobSpec(f"--skip-existing {prefix!r} cannot be listed: {e}") from e
        return
    if not Path(target).is_dir():
        raise InvalidJobSpec(f"--skip-existing {prefix!r} is not a folder; give the output folder of earlier jobs")
    for marker in SUMMARY_MARKERS:
        for path in sorted(Path(target).rglob(marker)):
            if str(path.parent) not in seen:
                seen.add(str(path.parent))
                yield str(path.parent)


def _read_summary(storage: Storage, folder: str) -> dict[str, Any] | None:
    for marker in SUMMARY_MARKERS:
        location = join_location(folder, marker)
        if storage.exists(location):
            try:
                summary = json.loads(storage.get_bytes(location))
            except json.JSONDecodeError as e:
                logger.warning("Ignoring %s: it is not valid JSON (%s)", location, e)
                return None
            return summary if isinstance(summary, dict) else None
    return None
