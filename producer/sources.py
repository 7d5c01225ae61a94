"""Image sources: S3 prefixes, manifests of URIs, S3 Inventory reports and local folders, listed as streams.

A job may have several sources. They are listed in the order given, and each in a deterministic order
(S3's lexicographic key order, manifest order, inventory data file order, sorted folder walk), so the same
sources always yield the same batches. Memory does not grow with the number of keys: S3 prefixes are
listed by background threads a few pages ahead of the consumer, manifests are read as streams, and
repeated manifest entries are found through an on-disk FingerprintSet.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from producer.errors import SourceError, StorageError
from producer.fingerprints import FingerprintSet
from producer.inventory import (
    InventoryReport,
    is_inventory_manifest,
    iter_inventory,
    open_inventory,
)
from producer.manifests import (
    MANIFEST_SUFFIXES,
    Manifest,
    ManifestError,
    manifest_format,
    open_manifest,
)
from producer.storage import Storage
from producer.uris import S3Uri, is_s3_uri, parse_location

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_SUFFIXES",
    "ListingStats",
    "ManifestError",
    "is_manifest",
    "is_read_at_submit",
    "iter_local_folder",
    "iter_manifest",
    "iter_source",
    "iter_sources",
]

MAX_EXAMPLES = 5
# S3 prefixes listed at the same time, each by its own thread.
MAX_LISTING_THREADS = 8
# Pages of keys each listing thread may hold ahead of the consumer. Memory is bounded by
# MAX_LISTING_THREADS * LISTING_PAGES_AHEAD * LISTING_PAGE_KEYS keys.
LISTING_PAGES_AHEAD = 4
LISTING_PAGE_KEYS = 1000  # ListObjectsV2 returns at most this many keys per page
_QUEUE_POLL_S = 0.1


@dataclass
class ListingStats:
    """Counts kept while sources are listed."""

    listed: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    duplicates: int = 0  # manifest entries dropped because the same URI came earlier in the job's manifests
    duplicate_examples: list[str] = field(default_factory=list)

    def skip(self, uri: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(uri)

    def drop_duplicate(self, uri: str) -> None:
        self.duplicates += 1
        if len(self.duplicate_examples) < MAX_EXAMPLES and uri not in self.duplicate_examples:
            self.duplicate_examples.append(uri)


def is_manifest(source: str) -> bool:
    """Return True for a manifest source: a manifest suffix, and an S3 URI or an existing local file."""
    return manifest_format(source) is not None and (is_s3_uri(source) or Path(source).is_file())


def is_inventory(source: str) -> bool:
    """Return True for an S3 Inventory source: a `manifest.json` S3 URI or existing local file."""
    return is_inventory_manifest(source) and (is_s3_uri(source) or Path(source).is_file())


def is_read_at_submit(source: str) -> bool:
    """Return True when the producer reads `source`'s entries at submit (a manifest or an S3 Inventory
    manifest.json), judged by name only, so workers need only the locations it lists."""
    return manifest_format(source) is not None or is_inventory_manifest(source)


def iter_source(
    source: str,
    storage: Storage,
    extensions: Iterable[str],
    stats: ListingStats | None = None,
    allowed_buckets: Collection[str] = (),
) -> Iterator[str]:
    """Yield the image URIs of one source; see `iter_sources`."""
    return iter_sources([source], storage, extensions, stats, allowed_buckets)


def iter_sources(
    sources: Sequence[str],
    storage: Storage,
    extensions: Iterable[str],
    stats: ListingStats | None = None,
    allowed_buckets: Collection[str] = (),
) -> Iterator[str]:
    """Yield the image URIs of each source in turn whose extension is in `extensions` (compared case-insensitively).

    S3 sources yield `s3://` URIs with keys kept byte-exact; local sources yield absolute paths.
    Keys ending in `/` (folder markers) are dropped; other non-image keys are counted in `stats.skipped`.
    A manifest URI listed earlier by any manifest of `sources` is dropped and counted in `stats.duplicates`.

    Every manifest is checked whole, and every S3 Inventory manifest.json read, before the first URI is
    yielded, so a bad entry fails the job before anything is enqueued. S3 prefixes are listed by up to
    MAX_LISTING_THREADS threads at once. Raises SourceError naming the source when one cannot be read or
    listed, and ManifestError (a SourceError and an InvalidJobSpec) when a manifest entry is invalid or
    outside a non-empty `allowed_buckets`. Closing the generator early stops the listing threads.
    """
    stats = stats if stats is not None else ListingStats()
    suffixes = tuple(ext.lower() for ext in extensions)
    for uri in _iter_raw(list(sources), storage, allowed_buckets, stats):
        if uri.endswith("/"):
            continue
        if not _is_utf8(uri):
            logger.warning("Skipping %r: its name is not valid UTF-8, so result rows cannot hold it", uri)
            stats.skip(uri)
            continue
        if not uri.lower().endswith(suffixes):
            stats.skip(uri)
            continue
        stats.listed += 1
        yield uri


def iter_manifest(
    source: str, storage: Storage, allowed_buckets: Collection[str] = (), stats: ListingStats | None = None
) -> Iterator[str]:
    """Yield the URIs a manifest lists, each once and without filtering by extension; see `producer.manifests`.

    Raises SourceError when the manifest cannot be read and ManifestError for an invalid entry.
    """
    stats = stats if stats is not None else ListingStats()
    with ExitStack() as stack:
        spool_folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipfleet-manifest-")))
        manifest = open_manifest(source, storage, spool_folder, allowed_buckets)
        manifest.check()
        seen = stack.enter_context(FingerprintSet(spool_folder))
        yield from manifest.iter_uris(seen, stats)


def _iter_raw(
    sources: list[str], storage: Storage, allowed_buckets: Collection[str], stats: ListingStats
) -> Iterator[str]:
    """Yield every URI of `sources` unfiltered, after opening (and checking) all of them."""
    with ExitStack() as stack:
        spool_folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipfleet-sources-")))
        window = _ListingWindow(storage, MAX_LISTING_THREADS)
        stack.callback(window.stop)
        opened = [_open(index, source, storage, allowed_buckets, spool_folder, window) for index, source in enumerate(sources)]
        seen = stack.enter_context(FingerprintSet(spool_folder)) if any(isinstance(item, Manifest) for item in opened) else None
        for index, (source, item) in enumerate(zip(sources, opened)):
            window.start_from(index)
            yield from _iter_opened(source, item, storage, spool_folder, seen, stats)


def _open(
    index: int,
    source: str, storage: Storage, allowed_buckets: Collection[str], spool_folder: Path, window: "_ListingWindow"
) -> "Manifest | InventoryReport | _PrefixListing | Path":
    try:
        if is_inventory(source):
            return open_inventory(source, storage, allowed_buckets)
        if is_manifest(source):
            manifest = open_manifest(source, storage, spool_folder, allowed_buckets)
            manifest.check()
            return manifest
        location = parse_location(source)
        if isinstance(location, S3Uri):
            return window.add(index, source, location)
        _check_folder(location)
        return location
    except StorageError as e:
        raise SourceError(f"source {source!r} cannot be read: {e}") from e


def _iter_opened(
    source: str,
    item: "Manifest | InventoryReport | _PrefixListing | Path",
    storage: Storage,
    spool_folder: Path,
    seen: FingerprintSet | None,
    stats: ListingStats,
) -> Iterator[str]:
    try:
        if isinstance(item, Manifest) and seen is not None:
            yield from item.iter_uris(seen, stats)
        elif isinstance(item, InventoryReport):
            yield from iter_inventory(item, storage, spool_folder)
        elif isinstance(item, _PrefixListing):
            yield from item.iter_uris()
        elif isinstance(item, Path):
            yield from _walk_sorted(item)
    except StorageError as e:
        raise SourceError(f"source {source!r} cannot be read: {e}") from e


def _is_utf8(uri: str) -> bool:
    # Local file names that are not UTF-8 arrive as lone surrogates (PEP 383), which JSON cannot encode.
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_local_folder(root: Path) -> Iterator[str]:
    """Yield the files under `root` as absolute paths, in the order S3 would list the same keys.

    Entries are sorted by name, a folder as its name plus `/`, so `a/c.jpg` comes before `a0.jpg` as in S3.
    Symbolic links are not followed: a link that points outside `root` could expose any file on the machine.
    Raises SourceError when `root` is not a folder.
    """
    _check_folder(root)
    yield from _walk_sorted(root)


def _check_folder(root: Path) -> None:
    if root.is_dir():
        return
    if manifest_format(str(root)) is not None or is_inventory_manifest(str(root)):
        raise SourceError(
            f"source {str(root)!r} does not exist: expected a folder, a manifest ({' '.join(MANIFEST_SUFFIXES)}) "
            "or an S3 Inventory manifest.json"
        )
    if root.is_file():
        raise SourceError(
            f"source {str(root)!r} is a file, but not a manifest: a manifest ends in {' '.join(MANIFEST_SUFFIXES)}, "
            "and an S3 Inventory manifest is named manifest.json"
        )
    raise SourceError(f"source folder {str(root)!r} does not exist or is not a folder")


def _walk_sorted(folder: Path) -> Iterator[str]:
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name)
    for entry in entries:
        if entry.is_symlink():
            logger.warning("Skipping symbolic link %s: links are not followed", entry.path)
        elif entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            yield entry.path




class _PrefixListing:
    """The keys under one S3 prefix, listed by a background thread into a queue of at most `pages_ahead` pages."""

    def __init__(self, source: str, prefix: S3Uri, storage: Storage, stop: threading.Event, pages_ahead: int) -> None:
        self.source = source
        self.prefix = prefix
        self.storage = storage
        self.started = False
        self._stop = stop
        self._pages: queue.Queue[list[str] | BaseException | None] = queue.Queue(maxsize=pages_ahead)
        self._thread = threading.Thread(target=self._run, name=f"clipfleet-list-{prefix.bucket}", daemon=True)

    def start(self) -> None:
        self.started = True
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        if self.started:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        """Put pages of keys, then None at the end, or the exception that stopped the listing."""
        try:
            page: list[str] = []
            for key, _size in self.storage.iter_objects(self.prefix):
                page.append(key)
                if len(page) == LISTING_PAGE_KEYS:
                    if not self._put(page):
                        return
                    page = []
            if page and not self._put(page):
                return
            self._put(None)
        except Exception as e:  # handed to the consumer, which raises it as a SourceError
            self._put(e)

    def _put(self, item: list[str] | BaseException | None) -> bool:
        """Wait for room in the queue; return False when the consumer has stopped."""
        while not self._stop.is_set():
            try:
                self._pages.put(item, timeout=_QUEUE_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def iter_uris(self) -> Iterator[str]:
        """Yield the prefix's URIs in S3's order. Raises SourceError naming the prefix when listing failed."""
        while True:
            item = self._next_page()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise SourceError(f"listing prefix {self.source!r} failed: {item}") from item
            for key in item:
                yield str(S3Uri(self.prefix.bucket, key))

    def _next_page(self) -> list[str] | BaseException | None:
        while True:
            try:
                return self._pages.get(timeout=_QUEUE_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._pages.empty():
                    raise SourceError(f"listing prefix {self.source!r} stopped without an error or an end") from None


class _ListingWindow:
    """Starts S3 prefix listings in source order, with at most `max_threads` started and not yet consumed.

    Starting in source order means the consumer's current prefix always has a thread, so the window
    cannot deadlock on threads of later prefixes that wait for room in their queues.
    """

    def __init__(self, storage: Storage, max_threads: int) -> None:
        self.storage = storage
        self.max_threads = max_threads
        self.listings: dict[int, _PrefixListing] = {}
        self._stop = threading.Event()

    def add(self, index: int, source: str, prefix: S3Uri) -> _PrefixListing:
        """Register the prefix of source number `index`; it starts now when the window has room."""
        listing = _PrefixListing(source, prefix, self.storage, self._stop, LISTING_PAGES_AHEAD)
        self.listings[index] = listing
        self.start_from(0)
        return listing

    def start_from(self, index: int) -> None:
        """Start waiting listings of sources `index` and later, in order, while fewer than `max_threads` run."""
        pending = [number for number in sorted(self.listings) if number >= index]
        active = sum(1 for number in pending if self.listings[number].started)
        for number in pending:
            if active >= self.max_threads:
                return
            if not self.listings[number].started:
                self.listings[number].start()
                active += 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Tell every listing thread to stop and wait briefly for each. A thread inside a slow S3 call
        ends after that call; it is a daemon thread, so it never keeps the process alive."""
        self._stop.set()
        for listing in self.listings.values():
            listing.join(timeout_s)
