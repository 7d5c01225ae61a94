"""kombu's Redis transport, changed to drop a malformed queue entry instead of stopping the worker.

kombu 5.7 (`kombu.transport.redis.Channel._brpop_read`) pops an entry off a queue's Redis list with BRPOP,
parses it as JSON and builds a message from its envelope (`properties`, `headers`, base64 `body`). A parse
error reaches Celery's event loop, which logs "Unrecoverable error" and stops the worker. BRPOP has already
removed the entry from the list and the entry is not yet among the unacknowledged messages, so logging it
and going on drops it for good: no later worker receives it again.

`install` makes kombu use this transport for redis:// and rediss:// URLs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from queue import Empty
from typing import Any

import kombu.transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

TRANSPORT_NAME = "workers.transport:Transport"
# URL schemes served by kombu's Redis transport.
REDIS_SCHEMES = ("redis", "rediss")
# A log line quotes at most this many characters of a dropped entry, because an entry may be megabytes long.
EXCERPT_CHARS = 80
# Logged in place of the excerpt when the parse error does not contain the entry.
ENTRY_NOT_AVAILABLE = object()


class MalformedQueueEntry(Exception):
    """A queue entry that parses as JSON but is not a kombu message envelope."""

    def __init__(self, payload: Any, reason: str) -> None:
        super().__init__(reason)
        self.payload = payload


def describe_excerpt(entry: Any) -> str:
    """Return the start of `entry` as a quoted, escaped string, so it stays on one log line, and its length."""
    if isinstance(entry, bytes):
        entry = entry.decode("utf-8", errors="replace")
    text = entry if isinstance(entry, str) else json.dumps(entry, default=repr)
    return f"{text[:EXCERPT_CHARS]!r} ({len(text)} characters)"


def describe_queues(queues: Iterable[str]) -> str:
    names = sorted(queues)
    return f"queue {names[0]}" if len(names) == 1 else f"one of the queues {', '.join(names) or '(none)'}"


def check_envelope(message: virtual.Message) -> None:
    """Raise TypeError when a field that kombu's Redis QoS or Celery reads next is missing or of the wrong type.

    `kombu.transport.redis.QoS.append` reads `delivery_info["exchange"]` and `delivery_info["routing_key"]`
    and stores the entry in a Redis hash under `delivery_tag`, where a value of another type would raise
    after the message was built.
    """
    if not isinstance(message.delivery_tag, str):
        raise TypeError(f"properties.delivery_tag must be a string, not {type(message.delivery_tag).__name__}")
    delivery_info = message.delivery_info
    if not isinstance(delivery_info, dict):
        raise TypeError(f"properties.delivery_info must be an object, not {type(delivery_info).__name__}")
    for key in ("exchange", "routing_key"):
        if not isinstance(delivery_info.get(key), str):
            raise TypeError(f"properties.delivery_info.{key} must be a string")
    # Celery 5.7 looks the task name up in a dict before its own error handling, so a name that is a list or
    # an object would stop the worker. Headers of another type are rejected by Celery itself.
    headers = message.headers
    if isinstance(headers, dict) and "task" in headers and not isinstance(headers["task"], str):
        raise TypeError(f"headers.task must be a string, not {type(headers['task']).__name__}")


class Message(virtual.Message):
    """kombu's message, raising MalformedQueueEntry for an entry that is not a valid envelope."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        # kombu builds the message right after it parsed the entry, so the channel learns that any later
        # exception comes from building or handling the message, not from parsing.
        if isinstance(channel, Channel):
            channel.entry_parsed = True
        try:
            super().__init__(payload, channel=channel, **kwargs)
            check_envelope(self)
        # An envelope of another shape raises TypeError, KeyError or AttributeError while kombu reads its
        # fields. A body that is not base64 raises binascii.Error, a subclass of ValueError.
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise MalformedQueueEntry(payload, f"{_error_name(e)}: {_shorten(str(e))}") from e


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, logging and dropping a queue entry that is not a message.

    NOTE: only the BRPOP path of the worker's event loop is covered. `basic_get` (`Channel._get`), which
    workers do not use, still raises on a malformed entry.
    """

    Message = Message
    entry_parsed = False
    entry_queue: str | None = None  # the queue of the entry being read, once BRPOP has returned it

    def _brpop_read(self, **options: Any) -> Any:
        self.entry_parsed = False
        self.entry_queue = None
        try:
            with self._recording_entry_queue():
                return super()._brpop_read(**options)
        except MalformedQueueEntry as e:
            self._log_dropped_entry(e.payload, f"not a message envelope: {e}")
        # kombu raises Empty when BRPOP timed out without an entry.
        except (*self.connection_errors, RedisError, Empty):
            raise
        # Before the message is built, any exception is a parse error of the entry. kombu's JSON decoder
        # raises JSONDecodeError, UnicodeDecodeError, and for an object such as {"__type__": "datetime",
        # "__value__": ...} whatever its type's decoder raises. Later exceptions come from Celery and still
        # stop the worker, because the message may be among the unacknowledged ones by then.
        except Exception as e:
            if self.entry_parsed:
                raise
            self._log_dropped_entry(_entry_of(e), f"not valid JSON: {_error_name(e)}: {_shorten(str(e))}")
        return None

    @contextlib.contextmanager
    def _recording_entry_queue(self) -> Iterator[None]:
        """Record in `entry_queue` the queue that BRPOP returned the entry from.

        kombu 5.7 passes that queue to `_queue_cycle.rotate` before it parses the entry, and to no exception, so
        the cycle's `rotate` is wrapped for the duration of one read.
        """
        cycle = self._queue_cycle
        rotate = cycle.rotate

        def record_and_rotate(queue: str) -> Any:
            self.entry_queue = queue
            return rotate(queue)

        cycle.rotate = record_and_rotate
        try:
            yield
        finally:
            del cycle.rotate  # the class's own method shows through again

    def _log_dropped_entry(self, entry: Any, reason: str) -> None:
        # Without a recorded queue (a kombu version that no longer rotates first), the log names every queue read.
        queues = [self.entry_queue] if self.entry_queue else self.active_queues
        excerpt = "is not available" if entry is ENTRY_NOT_AVAILABLE else f"starts {describe_excerpt(entry)}"
        logger.error("Dropped a malformed entry from %s: %s; entry %s", describe_queues(queues), reason, excerpt)


def _entry_of(error: Exception) -> Any:
    """Return the entry quoted by a decoding error, or ENTRY_NOT_AVAILABLE where the error quotes none."""
    if isinstance(error, json.JSONDecodeError):
        return error.doc
    if isinstance(error, UnicodeDecodeError):
        return error.object
    return ENTRY_NOT_AVAILABLE


def _error_name(error: Exception) -> str:
    module = type(error).__module__
    return type(error).__qualname__ if module == "builtins" else f"{module}.{type(error).__qualname__}"


def _shorten(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the entry-checking Channel."""

    Channel = Channel


def install() -> None:
    """Make kombu resolve the redis:// and rediss:// URL schemes to this transport, in this process.

    kombu picks a transport by looking the URL's scheme up in `kombu.transport.TRANSPORT_ALIASES`. Replacing
    the two entries, instead of setting Celery's `broker_transport`, keeps everything kombu derives from the
    scheme: the TLS of rediss://, its `ssl_*` query parameters, and the broker URL that the worker logs
    ("Connected to rediss://user:**@host:port/0"). A name resolved earlier in this process is cached by
    kombu 5.7 in `_transport_cache`, so the cached entries are dropped too.
    """
    for scheme in REDIS_SCHEMES:
        kombu_transport.TRANSPORT_ALIASES[scheme] = TRANSPORT_NAME
        getattr(kombu_transport, "_transport_cache", {}).pop(scheme, None)
