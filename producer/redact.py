"""Masking of credentials in URLs before they reach a log line or an error message."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters whose values are credentials. redis-py, for example, accepts `?password=...`.
_SECRET_QUERY_WORDS = ("password", "secret", "token")


def redact_url(url: str) -> str:
    """Return `url` with its password, and any credential in its query, replaced by `***`. Raises nothing for any string.

    `redis://user:PASSWORD@host:6379/0` becomes `redis://user:***@host:6379/0`. A user name without a password
    is masked as well, because `redis://SECRET@host` is a common way to write a password alone. A password
    with an unencoded `/`, `?` or `#` puts an `@` after the host part. For such a URL, and for one that cannot
    be parsed, everything from `//` (or from the start, without `//`) to the last `@` is masked.
    """
    try:
        parts = urlsplit(url)
        netloc = _redact_netloc(parts.netloc)
        query = _redact_query(parts.query)
    except ValueError:
        return _mask_up_to_last_at(url)
    if "@" in parts.path + parts.query + parts.fragment:
        return _mask_up_to_last_at(url)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_netloc(netloc: str) -> str:
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return f"{MASK}@{host}"
    return f"{user}:{MASK}@{host}"


def _redact_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(_is_secret_name(name) for name, _ in pairs):
        return query  # keep the original spelling when nothing is masked
    return urlencode([(name, MASK if _is_secret_name(name) else value) for name, value in pairs], safe="/*")


def _is_secret_name(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_QUERY_WORDS)


def _mask_up_to_last_at(url: str) -> str:
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, slashes, _ = head.partition("//")
    return f"{scheme}{slashes}{MASK}@{tail}" if slashes else f"{MASK}@{tail}"
