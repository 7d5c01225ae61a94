"""URL redaction, and the TLS query parameters of CLIPFLEET_REDIS_URL as redis-py and Celery read them."""

from __future__ import annotations

import ssl

import pytest
import redis
from pydantic import ValidationError

from producer.cli import describe_settings_error
from producer.queue import make_celery
from producer.redact import redact_url
from producer.settings import Settings

TLS_QUERY = "ssl_ca_certs=/etc/tls/ca.pem&ssl_certfile=/etc/tls/client.pem&ssl_keyfile=/etc/tls/client.key&ssl_cert_reqs=required"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://worker:hunter2@127.0.0.1:6379/0", "redis://worker:***@127.0.0.1:6379/0"),
        ("rediss://:hunter2@cache:6380/1?" + TLS_QUERY, "rediss://:***@cache:6380/1?" + TLS_QUERY),
        ("redis://:hun%2Fter%40@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://hunter2@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://cache:6379/0?password=hunter2&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hun/ter2@cache:6379/0",  # an unencoded / ends the host part early
        "redis://:hun?ter2@cache:6379/0",
        "redis://:hun#ter2@cache:6379/0",
        "redis://:hunter2@[::1:6379/0",  # urlsplit raises ValueError
        "redis:hunter2@cache",
    ],
)
def test_redact_unparseable_url(url: str) -> None:
    redacted = redact_url(url)
    assert "ter2" not in redacted
    assert redacted.endswith(url.rpartition("@")[2])


def test_settings_error_redacts_url() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url="rediss://:hunter2@cache:6380/0?ssl_cert_reqs=CERT_REQUIRED")
    message = describe_settings_error(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in message
    assert "CLIPFLEET_REDIS_URL='rediss://:***@cache:6380/0?ssl_cert_reqs=CERT_REQUIRED' is invalid" in message


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("ssl_cert_reqs=CERT_REQUIRED", "ssl_cert_reqs='CERT_REQUIRED' is invalid"),
        ("ssl_check_hostname=no", "ssl_check_hostname='no' is invalid"),
        ("ssl_min_version=3", "'ssl_min_version' is not supported"),
        ("ssl_ca_certs=/a.pem&ssl_ca_certs=/b.pem", "'ssl_ca_certs' appears more than once"),
    ],
)
def test_settings_reject_tls_parameter(query: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=f"rediss://:hunter2@cache:6380/0?{query}")
    assert problem in str(caught.value)


def test_settings_reject_tls_without_rediss() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url="redis://:hunter2@cache:6379/0?ssl_ca_certs=/a.pem")
    assert "need a rediss:// URL" in str(caught.value)


def test_redis_py_reads_tls_parameters() -> None:
    client = redis.Redis.from_url(f"rediss://:hunter2@cache:6380/0?{TLS_QUERY}&ssl_check_hostname=false")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["ssl_ca_certs"] == "/etc/tls/ca.pem"
    assert kwargs["ssl_certfile"] == "/etc/tls/client.pem"
    assert kwargs["ssl_keyfile"] == "/etc/tls/client.key"
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is False


def test_celery_reads_tls_parameters() -> None:
    app = make_celery(Settings(redis_url=f"rediss://:hunter2@cache:6380/0?{TLS_QUERY}&ssl_check_hostname=false"))
    connection = app.connection_for_write()
    assert connection.ssl == {
        "ssl_ca_certs": "/etc/tls/ca.pem",
        "ssl_certfile": "/etc/tls/client.pem",
        "ssl_keyfile": "/etc/tls/client.key",
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": False,
    }
    assert connection.as_uri() == "rediss://:**@cache:6380/0"


def test_celery_checks_certificate_by_default() -> None:
    connection = make_celery(Settings(redis_url="rediss://:hunter2@cache:6380/0")).connection_for_write()
    assert connection.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_celery_plain_redis_has_no_tls() -> None:
    connection = make_celery(Settings(redis_url="redis://:hunter2@cache:6379/0")).connection_for_write()
    assert not connection.ssl


@pytest.mark.parametrize(
    "url",
    ["redis://:S3cr3tPw/x@127.0.0.1:6379/0", "redis://:S3cr3tPw?x@127.0.0.1:6379/0", "redis://user:S3cr3tPw#@h:6379/0"],
)
def test_malformed_redis_url_hides_password(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=url)
    assert "percent-encode" in str(caught.value)
    assert "S3cr3tPw" not in str(caught.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "127.0.0.1:6379"])
def test_redis_url_scheme_checked(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=url)
    assert "redis://, rediss:// or unix://" in str(caught.value)


@pytest.mark.parametrize("url", ["redis://:p%2Fw@127.0.0.1:6379/0", "unix:///run/redis.sock", "rediss://h:6380/0"])
def test_valid_redis_urls_accepted(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


def test_endpoint_with_credentials_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(s3_endpoint_url="http://user:EndpointPw@127.0.0.1:9000")
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)
    assert "EndpointPw" not in str(caught.value)


@pytest.mark.parametrize("url", ["127.0.0.1:9000", "ftp://127.0.0.1:9000"])
def test_endpoint_scheme_checked(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(s3_endpoint_url=url)
    assert "http:// or https://" in str(caught.value)


def test_endpoint_url_accepted() -> None:
    assert Settings(s3_endpoint_url="http://127.0.0.1:9000").s3_endpoint_url == "http://127.0.0.1:9000"
