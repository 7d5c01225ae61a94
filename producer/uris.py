"""Parsing of the two kinds of location clipfleet reads and writes: `s3://bucket/key` URIs and local paths."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


@dataclass(frozen=True)
class S3Uri:
    """An object or prefix in S3. `key` is kept byte-exact: no unquoting, no normalisation."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, name: str) -> "S3Uri":
        """Return the URI of `name` under this prefix, adding one `/` between them when needed."""
        if self.key == "" or self.key.endswith("/"):
            return S3Uri(self.bucket, self.key + name)
        return S3Uri(self.bucket, f"{self.key}/{name}")


def is_s3_uri(value: str) -> bool:
    return value.startswith("s3://")


def parse_s3_uri(value: str) -> S3Uri:
    """Split `s3://bucket/key` into bucket and key.

    Raises ValueError naming the value when the scheme or the bucket name is invalid.
    """
    if not is_s3_uri(value):
        raise ValueError(f"{value!r} is not an S3 URI: expected s3://bucket/key")
    bucket, _, key = value[len("s3://"):].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid bucket name {bucket!r} in {value!r}: bucket names have 3 to 63 characters "
            "(lowercase letters, digits, dots and hyphens) and start and end with a letter or digit"
        )
    return S3Uri(bucket, key)


def parse_location(value: str) -> S3Uri | Path:
    """Parse a source or output location: an `s3://` URI, or a local path (returned absolute).

    Raises ValueError for any other URI scheme, such as `http://` or `file://`.
    """
    if is_s3_uri(value):
        return parse_s3_uri(value)
    if _SCHEME_RE.match(value):
        scheme = value.split("://", 1)[0]
        raise ValueError(
            f"unsupported location {value!r}: scheme {scheme!r} is not supported; "
            "use s3://bucket/prefix or a local path"
        )
    if not value.strip():
        raise ValueError("empty location: use s3://bucket/prefix or a local path")
    return Path(value).expanduser().absolute()
