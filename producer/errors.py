"""Errors raised by clipfleet. Every message names the value at fault and what to do next."""

from __future__ import annotations


class ClipfleetError(Exception):
    """Base class of every error clipfleet raises on purpose."""


class InvalidJobSpec(ClipfleetError, ValueError):
    """A job specification failed validation; nothing was enqueued."""


class SourceError(ClipfleetError):
    """An image source (prefix, manifest or folder) could not be listed or read."""


class StorageError(ClipfleetError):
    """Reading or writing object storage or local files failed."""


class JobNotFound(ClipfleetError, KeyError):
    """No job with the given id exists in Redis."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "job not found"


class EmbeddedServerError(ClipfleetError):
    """The private Redis server or worker of `clipfleet run` failed to start or died."""
