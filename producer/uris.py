"""Parsing of the two kinds of location clipfleet reads and writes: `s3://bucket/key` URIs and local paths.

Every other URI scheme (`http://`, `https://`, `file://`, ...) is rejected, so no location is ever fetched over
HTTP or opened through a URL handler. Keys are kept byte-exact: no URL-unquoting, no Unicode normalisation
and no removal of `/`, so `s3://bucket//a.jpg` names the key `/a.jpg`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

S3_SCHEME = "s3://"
# S3 keys are at most 1,024 UTF-8 bytes (Amazon S3 User Guide, "Naming Amazon S3 objects"). moto 5.2.1 stores
# longer keys, so against moto only parse_s3_uri rejects them.
MAX_S3_KEY_BYTES = 1024

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# A scheme as RFC 3986 defines it, followed by `:/`. It matches `http://host`, `file:///etc` and `s3:/b`,
# but not a relative path such as `photos:2026/a.jpg`.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):/")
_SHOWN_CHARS = 120


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
    return value.startswith(S3_SCHEME)


def uri_scheme(value: str) -> str | None:
    """Return the scheme of a value written as a URI (`http` for `http://host/a.jpg`), or None for a path."""
    match = _SCHEME_RE.match(value)
    return match.group(1) if match else None


def parse_s3_uri(value: str) -> S3Uri:
    """Split `s3://bucket/key` into bucket and key, keeping the key byte-exact.

    Raises ValueError naming the value and the fix when the scheme or the bucket name is invalid, or when
    the key is longer than MAX_S3_KEY_BYTES UTF-8 bytes or cannot be encoded as UTF-8.
    """
    if not is_s3_uri(value):
        raise ValueError(f"{shorten(value)} is not an S3 URI: expected s3://bucket/key{_scheme_hint(value)}")
    bucket, _, key = value[len(S3_SCHEME):].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid bucket name {shorten(bucket)} in {shorten(value)}: bucket names have 3 to 63 characters "
            "(lowercase letters, digits, dots and hyphens) and start and end with a letter or digit"
        )
    _check_key(key, value)
    return S3Uri(bucket, key)


def _check_key(key: str, uri: str) -> None:
    try:
        size_bytes = len(key.encode("utf-8"))
    except UnicodeEncodeError as e:
        # Only a lone surrogate, such as a file name that was not UTF-8 (PEP 383), gets here.
        raise ValueError(f"the key of {shorten(uri)} is not valid Unicode ({e.reason}); S3 keys are UTF-8 text") from e
    if size_bytes > MAX_S3_KEY_BYTES:
        raise ValueError(
            f"the key of {shorten(uri)} has {size_bytes} UTF-8 bytes; S3 keys have at most {MAX_S3_KEY_BYTES}. "
            "Rename the object to a shorter key"
        )


def _scheme_hint(value: str) -> str:
    scheme = uri_scheme(value)
    if scheme is None:
        return ""
    if scheme.lower() == "s3":
        return "; write the scheme as 's3://' in lower case with two slashes"
    return f"; scheme {scheme!r} is not supported, only s3://"


def parse_location(value: str) -> S3Uri | Path:
    """Parse a source or output location: an `s3://` URI, or a local path (returned absolute).

    Raises ValueError naming the value and the fix for an empty value, an invalid S3 URI, or any other URI
    scheme, such as `http://`, `https://`, `file://` or `S3://`. Whether a local path stays under an allowed
    folder is checked by the worker, which resolves symbolic links.
    """
    if is_s3_uri(value):
        return parse_s3_uri(value)
    scheme = uri_scheme(value)
    if scheme is not None:
        raise ValueError(unsupported_scheme_message(value, scheme))
    if not value.strip():
        raise ValueError("empty location: use s3://bucket/prefix or a local path")
    return Path(value).expanduser().absolute()


def unsupported_scheme_message(value: str, scheme: str) -> str:
    """Return the error message for a location whose URI scheme is not `s3://`."""
    if scheme.lower() == "s3":
        return f"invalid location {shorten(value)}: write the scheme as 's3://' in lower case with two slashes"
    fix = "copy the data to S3 and use s3://bucket/key, or use a local path"
    if scheme.lower() == "file":
        fix = "write the local path without 'file://'"
    return f"unsupported location {shorten(value)}: scheme {scheme!r} is not supported, only s3:// and local paths; {fix}"


def check_bucket_allowed(location: S3Uri, allowed_buckets: Collection[str]) -> None:
    """Raise ValueError naming the bucket and the setting when `allowed_buckets` is not empty and lacks it.

    An empty `allowed_buckets` (CLIPFLEET_ALLOWED_BUCKETS unset) allows every bucket.
    """
    if allowed_buckets and location.bucket not in allowed_buckets:
        raise ValueError(
            f"bucket {location.bucket!r} of {shorten(str(location))} is not in CLIPFLEET_ALLOWED_BUCKETS="
            f"{sorted(allowed_buckets)!r}; add it to that setting or copy the images to an allowed bucket"
        )


def shorten(value: str) -> str:
    """Return `repr(value)`, cut to about 120 characters with its length noted, for error messages."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"
