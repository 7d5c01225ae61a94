"""Credentials in configuration, never in output: a whole job over TLS to a password-protected Redis.

One module-scoped run starts a redis-server that requires TLS with client certificates, a password for the
default user and an ACL user for the worker, plus a real worker process at DEBUG log level (`clipfleet worker`).
Jobs go through `clipfleet` commands run as subprocesses with distinctive AWS credentials. Every output (logs,
command output, result shards, `_SUCCESS.json`, every value in Redis) is then searched for the secrets.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlencode
from uuid import uuid4

import boto3
import pytest
import redis
import trustme
from botocore.client import BaseClient

from producer.embedded import ManagedProcess, find_redis_server, free_port
from tests.support.servers import S3Server

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "tests" / "data"
LABELS = "cat,rocket,coffee cup"

# Each value contains characters that must be percent-encoded in a URL.
REDIS_PASSWORD = "Rp-default/7fQz+Kx=w@secret"
ACL_USER = "clipfleet-worker"
ACL_PASSWORD = "Ap#acl:9vLm T@q2%w"
WRONG_PASSWORD = "Wrong-pass/4Hd+Zy=guess"
AWS_ACCESS_KEY_ID = "AKIACLIPFLEETSECRETS"
AWS_SECRET_ACCESS_KEY = "cfSecretKey/Zx81+Qw4Lp0Tn2Vb6Rm9Hs3Jd7Kf5Gt"
AWS_SESSION_TOKEN = "cfSessionToken//FwoGZXIvYXdzEJr+ExampleOnly=="
SECRETS = {
    "Redis password": REDIS_PASSWORD,
    "ACL password": ACL_PASSWORD,
    "wrong Redis password": WRONG_PASSWORD,
    "AWS secret access key": AWS_SECRET_ACCESS_KEY,
    "AWS session token": AWS_SESSION_TOKEN,
}

REDIS_START_TIMEOUT_S = 15.0
MOTO_START_TIMEOUT_S = 30.0
WORKER_READY_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 120.0


def secret_forms(secret: str) -> list[bytes]:
    """Return the spellings of `secret` that could reach an output: raw, percent-encoded and form-encoded."""
    return sorted({secret.encode(), quote(secret, safe="").encode(), quote_plus(secret).encode(), quote(secret).encode()})


def redis_url(user: str, password: str, port: int, certificates: dict[str, Path]) -> str:
    """Return a rediss:// URL with the CA, client certificate and key as query parameters."""
    tls = urlencode({
        "ssl_ca_certs": certificates["ca"],
        "ssl_certfile": certificates["client_cert"],
        "ssl_keyfile": certificates["client_key"],
        "ssl_cert_reqs": "required",
    }, safe="/")  # fmt: skip
    return f"rediss://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/0?{tls}"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1", "localhost")
    client = authority.issue_cert("clipfleet-client")
    paths = {name: folder / f"{name}.pem" for name in ("ca", "server_cert", "server_key", "client_cert", "client_key")}
    authority.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["server_cert"])
    server.private_key_pem.write_to_path(paths["server_key"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    return paths


def tls_redis_binary() -> str:
    """Return Debian's redis-server, which is built with TLS, or else the one the product finds."""
    debian = Path("/usr/bin/redis-server")
    return str(debian) if debian.exists() else find_redis_server()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, certificates: dict[str, Path]) -> Iterator[int]:
    """A redis-server that accepts only TLS with a client certificate, on a free port. Yields the port."""
    folder = tmp_path_factory.mktemp("redis-tls")
    port = free_port()
    argv = [
        tls_redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(certificates["server_cert"]), "--tls-key-file", str(certificates["server_key"]),
        "--tls-ca-cert-file", str(certificates["ca"]), "--tls-auth-clients", "yes",
        "--requirepass", REDIS_PASSWORD,
        "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all",
        "--save", "", "--appendonly", "no", "--dir", str(folder),
    ]  # fmt: skip
    server = ManagedProcess("redis-tls", argv, folder / "redis.log")
    try:
        wait_for_tls_redis(server, redis_url("default", REDIS_PASSWORD, port, certificates))
        yield port
    finally:
        server.stop()


def wait_for_tls_redis(server: ManagedProcess, url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if not server.running():
                raise RuntimeError(f"redis-server with TLS exited with code {server.process.returncode}:\n{server.log_tail()}")
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise TimeoutError(f"redis-server with TLS did not answer within {REDIS_START_TIMEOUT_S} s:\n{server.log_tail()}")
    finally:
        client.close()


@pytest.fixture(scope="module")
def aws_secrets(aws_test_environment: None) -> Iterator[None]:
    """Distinctive AWS credentials in this process's environment, inherited by every child process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY)
        patch.setenv("AWS_SESSION_TOKEN", AWS_SESSION_TOKEN)
        yield


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    tls_redis: int,
    certificates: dict[str, Path],
    s3_server: S3Server,
    tiny_clip_dir: Path,
    aws_secrets: None,
) -> Iterator[dict[str, Any]]:
    """A `clipfleet worker` process at DEBUG level that logs in as the ACL user, and the producer's settings."""
    log_dir = tmp_path_factory.mktemp("secret-logs")
    worker_env = dict(
        os.environ,
        CLIPFLEET_REDIS_URL=redis_url(ACL_USER, ACL_PASSWORD, tls_redis, certificates),
        CLIPFLEET_MODEL=str(tiny_clip_dir),
        CLIPFLEET_S3_ENDPOINT_URL=s3_server.endpoint_url,
        CLIPFLEET_LOG_LEVEL="DEBUG",
        CLIPFLEET_FETCH_THREADS="2",
    )
    argv = [sys.executable, "-m", "producer.cli", "worker", "--concurrency", "1"]
    worker = ManagedProcess("secrets-worker", argv, log_dir / "worker.log", worker_env)
    try:
        wait_for_worker(worker)
        producer_env = dict(
            os.environ,
            CLIPFLEET_REDIS_URL=redis_url("default", REDIS_PASSWORD, tls_redis, certificates),
            CLIPFLEET_S3_ENDPOINT_URL=s3_server.endpoint_url,
            CLIPFLEET_MODEL=str(tiny_clip_dir),
        )
        yield {"worker": worker, "env": producer_env, "port": tls_redis}
    finally:
        worker.stop()


def wait_for_worker(worker: ManagedProcess) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        log = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
        if "ready." in log and "Loaded model" in log:
            return
        if not worker.running():
            raise RuntimeError(f"worker exited with code {worker.process.returncode}:\n{worker.log_tail(60)}")
        time.sleep(0.2)
    raise TimeoutError(f"worker not ready within {WORKER_READY_TIMEOUT_S} s:\n{worker.log_tail(60)}")


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `clipfleet -v ARGS` in a subprocess and return its exit code, stdout and stderr as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", "-v", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def with_redis_url(env: dict[str, str], url: str) -> dict[str, str]:
    return {**env, "CLIPFLEET_REDIS_URL": url}


def record(outputs: dict[str, bytes], name: str, result: subprocess.CompletedProcess[bytes]) -> None:
    outputs[f"{name} stdout"] = result.stdout
    outputs[f"{name} stderr"] = result.stderr


@pytest.fixture(scope="module")
def buckets(s3_client: BaseClient) -> dict[str, str]:
    """An input bucket with two photos and a manifest that also names a missing key, and an output bucket."""
    names = {"input": f"secrets-in-{uuid4().hex[:8]}", "output": f"secrets-out-{uuid4().hex[:8]}"}
    for name in names.values():
        s3_client.create_bucket(Bucket=name)
    for photo in ("chelsea.jpg", "rocket.jpg"):
        s3_client.put_object(Bucket=names["input"], Key=f"in/{photo}", Body=(DATA / photo).read_bytes())
    lines = [f"s3://{names['input']}/in/chelsea.jpg", f"s3://{names['input']}/in/missing.jpg", f"s3://{names['input']}/in/rocket.jpg"]
    s3_client.put_object(Bucket=names["input"], Key="manifest.txt", Body="\n".join(lines).encode())
    return names


@pytest.fixture(scope="module")
def outputs(stack: dict[str, Any], buckets: dict[str, str], s3_client: BaseClient) -> dict[str, Any]:
    """Run the jobs and failing commands, then collect every output by name, as bytes."""
    env = stack["env"]
    collected: dict[str, bytes] = {}
    manifest = f"s3://{buckets['input']}/manifest.txt"
    output = f"s3://{buckets['output']}/results/"

    submit = run_cli(env, "submit", manifest, "--labels", LABELS, "--output", output, "--batch-size", "2")
    record(collected, "submit", submit)
    job_id = submit.stdout.decode().strip()
    wait = run_cli(env, "wait", job_id, "--timeout-s", str(JOB_TIMEOUT_S), "--no-progress")
    record(collected, "wait", wait)
    record(collected, "status", run_cli(env, "status", job_id))
    results = run_cli(env, "results", job_id)
    record(collected, "results", results)

    bad_model = run_cli(env, "submit", manifest, "--labels", LABELS, "--output", output, "--model", "/no/such/checkpoint", "--wait")
    record(collected, "submit with a missing model", bad_model)
    failed_job_id = bad_model.stdout.decode().splitlines()[0] if bad_model.stdout else ""
    missing_bucket = run_cli(env, "submit", manifest, "--labels", LABELS, "--output", f"s3://no-such-bucket-{uuid4().hex[:8]}/out/")
    record(collected, "submit to a missing bucket", missing_bucket)

    url = env["CLIPFLEET_REDIS_URL"]
    wrong_url = url.replace(quote(REDIS_PASSWORD, safe=""), quote(WRONG_PASSWORD, safe=""))
    wrong_password = run_cli(with_redis_url(env, wrong_url), "status", job_id)
    record(collected, "status with a wrong password", wrong_password)
    wrong_acl = run_cli(with_redis_url(env, url.replace("://default:", f"://{ACL_USER}:")), "status", job_id)
    record(collected, "status with a wrong ACL password", wrong_acl)
    invalid_url = run_cli(with_redis_url(env, url.replace("ssl_cert_reqs=required", "ssl_cert_reqs=CERT_REQUIRED")), "status", job_id)
    record(collected, "status with an invalid URL", invalid_url)

    collected.update(s3_objects(s3_client, buckets["output"]))
    collected.update(redis_values(env["CLIPFLEET_REDIS_URL"]))
    collected["worker log"] = stack["worker"].log_path.read_bytes()
    return {
        "outputs": collected,
        "job_id": job_id,
        "failed_job_id": failed_job_id,
        "exit_codes": {
            "submit": submit.returncode,
            "wait": wait.returncode,
            "results": results.returncode,
            "missing model": bad_model.returncode,
            "missing bucket": missing_bucket.returncode,
            "wrong password": wrong_password.returncode,
            "wrong ACL password": wrong_acl.returncode,
            "invalid URL": invalid_url.returncode,
        },
    }


def s3_objects(s3_client: BaseClient, bucket: str) -> dict[str, bytes]:
    objects = {}
    for item in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
        objects[f"s3://{bucket}/{item['Key']}"] = s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects


def redis_values(url: str) -> dict[str, bytes]:
    """Return every key of the Redis database with its whole value (hash fields, list and set members)."""
    client = redis.Redis.from_url(url, socket_timeout=5.0)
    values: dict[str, bytes] = {}
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                value = client.get(key) or b""
            elif kind == "hash":
                value = b"\n".join(field + b"=" + item for field, item in client.hgetall(key).items())
            elif kind == "list":
                value = b"\n".join(client.lrange(key, 0, -1))
            elif kind in ("set", "zset"):
                value = b"\n".join(client.smembers(key) if kind == "set" else client.zrange(key, 0, -1))
            else:
                value = kind.encode()
            values[f"redis key {key.decode(errors='replace')}"] = key + b"\n" + value
    finally:
        client.close()
    return values


@pytest.fixture(scope="module")
def authenticating_s3(tmp_path_factory: pytest.TempPathFactory, aws_secrets: None) -> Iterator[dict[str, str]]:
    """A moto S3 server that checks signatures, with one IAM user and one bucket.

    moto checks credentials only after its first INITIAL_NO_AUTH_ACTION_COUNT requests, which here create the
    user, its access key and the bucket. The user has no policy, so its own key gets AccessDenied.
    """
    folder = tmp_path_factory.mktemp("moto-auth")
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = ManagedProcess("moto-auth", argv, folder / "moto.log", env)
    try:
        wait_for_port(server, port)
        endpoint_url = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint_url, region_name="us-east-1")
        iam.create_user(UserName="clipfleet-no-policy")
        key = iam.create_access_key(UserName="clipfleet-no-policy")["AccessKey"]
        bucket = f"auth-{uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield {"endpoint_url": endpoint_url, "bucket": bucket, "key_id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        server.stop()


def wait_for_port(server: ManagedProcess, port: int) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"moto server exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"moto server did not listen on port {port} within {MOTO_START_TIMEOUT_S} s:\n{server.log_tail()}")


@pytest.mark.parametrize(
    ("case", "error_code"),
    [("session token", "InvalidToken"), ("wrong secret key", "SignatureDoesNotMatch"), ("key without access", "AccessDenied")],
)
def test_s3_auth_error_hides_secrets(authenticating_s3: dict[str, str], case: str, error_code: str) -> None:
    env = dict(
        os.environ,
        CLIPFLEET_REDIS_URL=f"redis://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:1/0",  # submit fails before Redis
        CLIPFLEET_S3_ENDPOINT_URL=authenticating_s3["endpoint_url"],
        AWS_ACCESS_KEY_ID=authenticating_s3["key_id"],
    )
    secrets = [AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, REDIS_PASSWORD]
    if case != "session token":
        del env["AWS_SESSION_TOKEN"]
    if case == "key without access":
        env["AWS_SECRET_ACCESS_KEY"] = authenticating_s3["secret"]
        secrets.append(authenticating_s3["secret"])
    output = f"s3://{authenticating_s3['bucket']}/out/"
    result = run_cli(env, "submit", f"s3://{authenticating_s3['bucket']}/in/", "--labels", LABELS, "--output", output)
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert error_code in stderr
    assert output in stderr
    for secret in secrets:
        assert not any(form in result.stdout + result.stderr for form in secret_forms(secret)), f"a secret appears in: {stderr}"


def test_job_over_tls_succeeds(outputs: dict[str, Any]) -> None:
    status = json.loads(outputs["outputs"]["wait stdout"])
    assert outputs["exit_codes"]["wait"] == 0
    assert status["state"] == "succeeded"
    assert (status["total"], status["succeeded"], status["failed"]) == (3, 2, 1)


def test_missing_key_gets_error_row(outputs: dict[str, Any]) -> None:
    rows = [json.loads(line) for line in outputs["outputs"]["results stdout"].splitlines()]
    codes = [row["error"]["code"] if row["error"] else None for row in rows]
    assert codes == [None, "not_found", None]


def test_shards_and_success_marker_written(outputs: dict[str, Any], buckets: dict[str, str]) -> None:
    prefix = f"s3://{buckets['output']}/results/{outputs['job_id']}/"
    names = sorted(name[len(prefix):] for name in outputs["outputs"] if name.startswith(prefix))
    assert names == ["_SUCCESS.json", "part-000000.jsonl", "part-000001.jsonl"]


def test_missing_model_fails_job(outputs: dict[str, Any]) -> None:
    assert outputs["exit_codes"]["missing model"] == 1
    job_hash = outputs["outputs"][f"redis key clipfleet:job:{outputs['failed_job_id']}"]
    assert b"state=failed" in job_hash
    assert b"/no/such/checkpoint" in job_hash


def test_missing_bucket_error_names_bucket(outputs: dict[str, Any]) -> None:
    stderr = outputs["outputs"]["submit to a missing bucket stderr"].decode()
    assert outputs["exit_codes"]["missing bucket"] != 0
    assert "no-such-bucket-" in stderr
    assert "NoSuchBucket" in stderr


@pytest.mark.parametrize("case", ["wrong password", "wrong ACL password"])
def test_wrong_password_error_is_clear(outputs: dict[str, Any], case: str) -> None:
    stderr = outputs["outputs"][f"status with a {case} stderr"].decode()
    assert outputs["exit_codes"][case] == 1
    assert "rejected the credentials" in stderr
    assert ":***@127.0.0.1:" in stderr


def test_invalid_url_error_is_redacted(outputs: dict[str, Any]) -> None:
    stderr = outputs["outputs"]["status with an invalid URL stderr"].decode()
    assert outputs["exit_codes"]["invalid URL"] == 2
    assert "ssl_cert_reqs='CERT_REQUIRED' is invalid" in stderr
    assert "rediss://default:***@127.0.0.1:" in stderr


def test_worker_banner_masks_password(outputs: dict[str, Any], stack: dict[str, Any]) -> None:
    log = outputs["outputs"]["worker log"].decode(errors="replace")
    assert f"rediss://{ACL_USER}:**@127.0.0.1:{stack['port']}/0" in log


def test_outputs_collected(outputs: dict[str, Any]) -> None:
    names = outputs["outputs"].keys()
    assert any(name.endswith("/_SUCCESS.json") for name in names)
    assert f"redis key clipfleet:job:{outputs['job_id']}" in names
    assert f"redis key clipfleet:job:{outputs['failed_job_id']}" in names
    assert b"DEBUG/MainProcess" in outputs["outputs"]["worker log"]
    assert b"DEBUG/ForkPoolWorker" in outputs["outputs"]["worker log"]


@pytest.mark.parametrize("secret_name", list(SECRETS))
def test_no_output_contains_secret(outputs: dict[str, Any], secret_name: str) -> None:
    forms = secret_forms(SECRETS[secret_name])
    leaks = [name for name, data in outputs["outputs"].items() if any(form in data for form in forms)]
    assert leaks == [], f"the {secret_name} appears in: {leaks}"
