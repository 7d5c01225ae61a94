"""Wiring checks for docker-compose.yml and the worker image, without a Docker engine.

The file is parsed with PyYAML and ``${VAR:-default}`` interpolation is resolved here, so the
checks see the values that ``docker compose config`` would produce for a given environment.
They cover names, hosts, ports and credentials, not whether the images run. One test runs the
API service's command and healthcheck on this host, against a real Redis.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from producer.constants import DEFAULT_MODEL
from producer.embedded import ManagedProcess, free_port
from producer.settings import Settings
from producer.uris import parse_s3_uri

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

# ${NAME}, ${NAME:-default}, ${NAME-default}, $NAME and the escape $$, as in the Compose spec.
# The :?/? error forms are not used in docker-compose.yml and are left unresolved.
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?-)(?P<default>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


OVERRIDDEN_ENVIRONMENT = {
    "MINIO_ROOT_USER": "operator",
    "MINIO_ROOT_PASSWORD": "a-much-longer-secret",
    "CLIPFLEET_MODEL": "/models/clip",
}


def interpolate(text: str, environment: Mapping[str, str]) -> str:
    """Resolve Compose variable references in text against environment."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("bare")
        value = environment.get(name)
        operator = match.group("operator")
        if operator == ":-" and not value:
            return match.group("default")
        if operator == "-" and value is None:
            return match.group("default")
        return value or ""

    return INTERPOLATION.sub(replace, text)


def interpolate_tree(node: Any, environment: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environment)
    if isinstance(node, list):
        return [interpolate_tree(item, environment) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, environment) for key, value in node.items()}
    return node


def load_compose(environment: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return interpolate_tree(raw, environment or {})


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """Return a service's environment as a dict, from either the mapping or the list form."""
    entries = service.get("environment") or {}
    if isinstance(entries, list):
        return dict(entry.split("=", 1) for entry in entries)
    return {key: "" if value is None else str(value) for key, value in entries.items()}


def command_words(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def option_value(words: list[str], option: str) -> str | None:
    """Return the word after option in a command line, or None when the option is absent."""
    if option not in words:
        return None
    position = words.index(option)
    return words[position + 1] if position + 1 < len(words) else None


def container_ports(service: Mapping[str, Any]) -> set[int]:
    """Return the container-side ports of a service's short-syntax port mappings."""
    ports = set()
    for mapping in service.get("ports") or []:
        container_part = str(mapping).rsplit(":", 1)[-1]
        ports.add(int(container_part.split("/", 1)[0]))
    return ports


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs from a Dockerfile, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.mark.parametrize(
    ("text", "environment", "expected"),
    [
        ("${USER:-dev}", {}, "dev"),
        ("${USER:-dev}", {"USER": ""}, "dev"),
        ("${USER:-dev}", {"USER": "alice"}, "alice"),
        ("${USER-dev}", {"USER": ""}, ""),
        ("${USER}", {}, ""),
        ("$USER@host", {"USER": "bob"}, "bob@host"),
        ("$$USER", {"USER": "bob"}, "$USER"),
        ("a ${X:-1} b ${Y:-2}", {"Y": "3"}, "a 1 b 3"),
    ],
)
def test_interpolate_resolves_compose_syntax(text: str, environment: dict[str, str], expected: str) -> None:
    assert interpolate(text, environment) == expected


def test_services_exist(services: dict[str, Any]) -> None:
    assert {"redis", "minio", "createbuckets", "worker", "api"} <= set(services)


def test_redis_persists_and_never_evicts(services: dict[str, Any]) -> None:
    words = command_words(services["redis"])

    assert services["redis"]["image"] == "redis:7"
    assert option_value(words, "--appendonly") == "yes"
    assert option_value(words, "--maxmemory-policy") == "noeviction"
    assert "test" in services["redis"]["healthcheck"]


def test_worker_redis_url_points_at_redis_service(services: dict[str, Any]) -> None:
    url = urlsplit(service_environment(services["worker"])["CLIPFLEET_REDIS_URL"])
    redis_port = int(option_value(command_words(services["redis"]), "--port") or 6379)

    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert url.port == redis_port
    assert url.path == "/0"
    assert redis_port in container_ports(services["redis"])


def test_worker_s3_endpoint_points_at_minio_api(services: dict[str, Any]) -> None:
    url = urlsplit(service_environment(services["worker"])["CLIPFLEET_S3_ENDPOINT_URL"])
    minio_words = command_words(services["minio"])

    assert url.scheme == "http"
    assert url.hostname == "minio"
    assert url.port == 9000
    assert minio_words[:2] == ["server", "/data"]
    assert option_value(minio_words, "--address") in (None, ":9000")
    assert option_value(minio_words, "--console-address") == ":9001"
    assert container_ports(services["minio"]) == {9000, 9001}
    assert "test" in services["minio"]["healthcheck"]


@pytest.mark.parametrize("environment", [{}, OVERRIDDEN_ENVIRONMENT], ids=["defaults", "overridden"])
def test_worker_credentials_match_minio_root(environment: dict[str, str]) -> None:
    services = load_compose(environment)["services"]
    minio = service_environment(services["minio"])
    worker = service_environment(services["worker"])

    assert worker["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert worker["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert worker["AWS_DEFAULT_REGION"]


def test_default_minio_credentials_are_long_enough(services: dict[str, Any]) -> None:
    minio = service_environment(services["minio"])

    # MinIO rejects a root user under 3 or a password under 8 characters (accessKeyMinLen and
    # secretKeyMinLen in MinIO's internal/auth/credentials.go).
    assert len(minio["MINIO_ROOT_USER"]) >= 3
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8


def test_worker_model_defaults_to_product_default(services: dict[str, Any]) -> None:
    overridden = load_compose(OVERRIDDEN_ENVIRONMENT)["services"]

    assert service_environment(services["worker"])["CLIPFLEET_MODEL"] == DEFAULT_MODEL
    assert service_environment(overridden["worker"])["CLIPFLEET_MODEL"] == "/models/clip"


def test_worker_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    depends_on = services["worker"]["depends_on"]

    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["minio"]["condition"] == "service_healthy"


def test_worker_caches_models_in_named_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert "hf-cache:/root/.cache/huggingface" in services["worker"]["volumes"]
    assert "hf-cache" in compose["volumes"]


def test_worker_image_runs_clipfleet_worker(services: dict[str, Any]) -> None:
    build = services["worker"]["build"]
    dockerfile = REPO_ROOT / build["context"] / build["dockerfile"]
    instructions = dockerfile_instructions(dockerfile)
    entrypoints = [exec_form(arguments) for keyword, arguments in instructions if keyword == "ENTRYPOINT"]

    assert dockerfile.is_file()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert entrypoints[-1] + command_words(services["worker"]) == ["clipfleet", "worker"]


def test_worker_image_installs_cpu_torch_first() -> None:
    instructions = dockerfile_instructions(REPO_ROOT / "ops" / "worker.Dockerfile")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    torch_step = next(index for index, command in enumerate(runs) if "torch==" in command)
    project_install = re.compile(r"pip install \.(\s|$)")
    project_step = next(index for index, command in enumerate(runs) if project_install.search(command))

    assert torch_step < project_step
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_step]


def test_createbuckets_makes_valid_buckets(services: dict[str, Any]) -> None:
    script = "\n".join(command_words(services["createbuckets"]))
    buckets = re.findall(r"\blocal/([^\s\"']+)", script)

    assert set(buckets) == {"clipfleet-input", "clipfleet-results", "clipfleet-api"}
    for bucket in buckets:
        assert parse_s3_uri(f"s3://{bucket}/").bucket == bucket


def test_createbuckets_logs_in_to_minio(services: dict[str, Any]) -> None:
    createbuckets = services["createbuckets"]
    script = "\n".join(command_words(createbuckets))

    assert service_environment(createbuckets) == service_environment(services["minio"])
    assert 'mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"' in script
    assert createbuckets["depends_on"]["minio"]["condition"] == "service_healthy"


def compose_duration_s(value: str) -> float:
    """Return the seconds of a Compose duration such as `75s`, `2m` or `1m30s`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    total, number = 0.0, ""
    for char in value:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * units[char]
            number = ""
    return total


WORKERS = ["worker", "worker-gpu"]


@pytest.mark.parametrize("name", WORKERS)
def test_stop_grace_outlasts_worker_grace(services: dict[str, Any], name: str) -> None:
    worker = services[name]
    shutdown_grace_s = float(service_environment(worker)["CLIPFLEET_SHUTDOWN_GRACE_S"])

    assert compose_duration_s(worker["stop_grace_period"]) > shutdown_grace_s


def createbuckets_buckets(services: Mapping[str, Any]) -> set[str]:
    script = "\n".join(command_words(services["createbuckets"]))
    return set(re.findall(r"\blocal/([^\s\"']+)", script))


def flower_broker_url(services: Mapping[str, Any]) -> str:
    """Return the broker URL from Flower's `--broker=URL` or `--broker URL` option."""
    words = command_words(services["flower"])
    for word in words:
        if word.startswith("--broker="):
            return word.split("=", 1)[1]
    broker = option_value(words, "--broker") or option_value(words, "-b")
    if broker is None:
        raise ValueError(f"flower command {words!r} has no --broker option")
    return broker


def test_gpu_worker_only_in_gpu_profile(services: dict[str, Any]) -> None:
    others_in_gpu = [name for name, service in services.items() if name != "worker-gpu" and "gpu" in service.get("profiles", [])]

    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert others_in_gpu == []


def test_default_services_need_no_profile(services: dict[str, Any]) -> None:
    default_services = {name for name, service in services.items() if not service.get("profiles")}

    assert default_services == {"redis", "minio", "createbuckets", "worker", "api", "flower"}


def test_gpu_worker_reserves_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]

    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_gpu_worker_builds_cuda_image(services: dict[str, Any]) -> None:
    build = services["worker-gpu"]["build"]
    dockerfile = REPO_ROOT / build["context"] / build["dockerfile"]
    entrypoints = [exec_form(arguments) for keyword, arguments in dockerfile_instructions(dockerfile) if keyword == "ENTRYPOINT"]

    assert dockerfile == REPO_ROOT / "ops" / "worker-cuda.Dockerfile"
    assert entrypoints[-1] + command_words(services["worker-gpu"]) == ["clipfleet", "worker"]
    assert service_environment(services["worker-gpu"])["CLIPFLEET_DEVICE"] == "cuda"


@pytest.mark.parametrize("environment", [{}, OVERRIDDEN_ENVIRONMENT], ids=["defaults", "overridden"])
@pytest.mark.parametrize("key", ["CLIPFLEET_REDIS_URL", "CLIPFLEET_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "CLIPFLEET_MODEL", "CLIPFLEET_SHUTDOWN_GRACE_S"])
def test_gpu_worker_environment_matches_cpu_worker(environment: dict[str, str], key: str) -> None:
    services = load_compose(environment)["services"]

    assert service_environment(services["worker-gpu"])[key] == service_environment(services["worker"])[key]


@pytest.mark.parametrize("name", ["worker", "worker-gpu", "submit", "api", "flower"])
def test_service_uses_redis_service_as_broker(services: dict[str, Any], name: str) -> None:
    if name == "flower":
        broker = flower_broker_url(services)
    else:
        broker = service_environment(services[name])["CLIPFLEET_REDIS_URL"]
    url = urlsplit(broker)
    redis_port = int(option_value(command_words(services["redis"]), "--port") or 6379)

    assert broker == service_environment(services["worker"])["CLIPFLEET_REDIS_URL"]
    assert url.hostname == "redis"
    assert url.port == redis_port
    assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("environment", [{}, OVERRIDDEN_ENVIRONMENT], ids=["defaults", "overridden"])
def test_submit_uses_worker_storage_and_model(environment: dict[str, str]) -> None:
    services = load_compose(environment)["services"]
    submit = service_environment(services["submit"])
    worker = service_environment(services["worker"])

    for key in ("CLIPFLEET_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CLIPFLEET_MODEL"):
        assert submit[key] == worker[key], key


def test_metrics_port_is_published(services: dict[str, Any]) -> None:
    exporting = {name: service for name, service in services.items() if "CLIPFLEET_METRICS_PORT" in service_environment(service)}

    assert "worker-gpu" in exporting
    for name, service in exporting.items():
        metrics_port = int(service_environment(service)["CLIPFLEET_METRICS_PORT"])
        assert metrics_port in container_ports(service), name


def test_flower_publishes_port_5555(services: dict[str, Any]) -> None:
    words = command_words(services["flower"])

    assert "flower" in words
    assert "--port=5555" in words
    assert "127.0.0.1:5555:5555" in services["flower"]["ports"]


def test_submit_runs_producer_image_and_waits(services: dict[str, Any]) -> None:
    submit = services["submit"]
    build = submit["build"]
    words = command_words(submit)

    assert submit["profiles"] == ["submit"]
    assert REPO_ROOT / build["context"] / build["dockerfile"] == REPO_ROOT / "ops" / "producer.Dockerfile"
    assert words[0] == "submit"
    assert "--wait" in words
    assert submit["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"


def test_submit_buckets_exist_in_createbuckets(services: dict[str, Any]) -> None:
    words = command_words(services["submit"])
    uris = [word for word in words if word.startswith("s3://")]
    source_bucket = parse_s3_uri(words[1]).bucket
    output_bucket = parse_s3_uri(option_value(words, "--output") or "").bucket

    assert len(uris) == 2
    assert source_bucket in createbuckets_buckets(services)
    assert output_bucket in createbuckets_buckets(services)


def test_gpu_worker_healthcheck_probes_readyz(services: dict[str, Any]) -> None:
    worker = services["worker-gpu"]
    probe = " ".join(worker["healthcheck"]["test"])
    metrics_port = service_environment(worker)["CLIPFLEET_METRICS_PORT"]

    assert f"http://127.0.0.1:{metrics_port}/readyz" in probe


# The HTTP API


def api_port(services: Mapping[str, Any]) -> int:
    return int(option_value(command_words(services["api"]), "--port") or 8000)


def api_files_bucket(services: Mapping[str, Any]) -> str:
    return parse_s3_uri(service_environment(services["api"])["CLIPFLEET_API_FILES_URI"]).bucket


def settings_from_environment(environment: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Return the Settings that a process reads with `environment` as its only CLIPFLEET_* variables."""
    for name in [name for name in os.environ if name.startswith("CLIPFLEET_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_api_runs_clipfleet_serve(services: dict[str, Any]) -> None:
    api = services["api"]
    build = api["build"]
    dockerfile = REPO_ROOT / build["context"] / build["dockerfile"]
    entrypoints = [exec_form(arguments) for keyword, arguments in dockerfile_instructions(dockerfile) if keyword == "ENTRYPOINT"]
    words = command_words(api)

    assert dockerfile == REPO_ROOT / "ops" / "producer.Dockerfile"
    assert entrypoints[-1] + words[:1] == ["clipfleet", "serve"]
    # Inside the container the server must listen on every interface, or the published port reaches nothing.
    assert option_value(words, "--host") == "0.0.0.0"


def test_api_port_published_on_loopback_only(services: dict[str, Any]) -> None:
    port = api_port(services)

    assert services["api"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_api_healthcheck_probes_healthz(services: dict[str, Any]) -> None:
    probe = " ".join(services["api"]["healthcheck"]["test"])

    assert f"http://127.0.0.1:{api_port(services)}/healthz" in probe


def test_api_waits_for_dependencies_and_buckets(services: dict[str, Any]) -> None:
    depends_on = services["api"]["depends_on"]

    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["minio"]["condition"] == "service_healthy"
    assert depends_on["createbuckets"]["condition"] == "service_completed_successfully"


def test_api_files_bucket_exists_in_createbuckets(services: dict[str, Any]) -> None:
    assert api_files_bucket(services) in createbuckets_buckets(services)


@pytest.mark.parametrize("name", WORKERS)
def test_workers_may_read_api_files(services: dict[str, Any], name: str) -> None:
    # Workers read the inputs of batches uploaded through the API from the files bucket.
    allowed = service_environment(services[name]).get("CLIPFLEET_ALLOWED_BUCKETS", "")

    assert not allowed or api_files_bucket(services) in allowed.split(",")


@pytest.mark.parametrize("environment", [{}, OVERRIDDEN_ENVIRONMENT], ids=["defaults", "overridden"])
@pytest.mark.parametrize("name", WORKERS)
def test_api_environment_matches_workers(environment: dict[str, str], name: str) -> None:
    compose = load_compose(environment)
    api = service_environment(compose["services"]["api"])
    worker = service_environment(compose["services"][name])

    for key in compose["x-clipfleet-environment"]:
        assert api[key] == worker[key], key
    # The API routes requests to the realtime queue that the workers announce, so both must name the same one.
    assert api.get("CLIPFLEET_REALTIME_QUEUE") == worker.get("CLIPFLEET_REALTIME_QUEUE")


def test_api_keys_from_host_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = service_environment(load_compose()["services"]["api"])
    overridden = service_environment(load_compose({"CLIPFLEET_API_KEYS": "key-a,key-b"})["services"]["api"])

    assert settings_from_environment(defaults, monkeypatch).api_keys == []
    assert settings_from_environment(overridden, monkeypatch).api_keys == ["key-a", "key-b"]


def test_api_stop_grace_outlasts_request_timeout(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    api = services["api"]
    settings = settings_from_environment(service_environment(api), monkeypatch)

    assert compose_duration_s(api["stop_grace_period"]) > settings.api_timeout_s


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_api_command_passes_healthcheck_with_keys(services: dict[str, Any], redis_url: str, tmp_path: Path) -> None:
    # The service's own command and healthcheck, run on loopback: /healthz must return 200 without an API key.
    api = services["api"]
    port = free_port()
    words = command_words(api)
    words[words.index("--host") + 1] = "127.0.0.1"
    words[words.index("--port") + 1] = str(port)
    env = dict(os.environ, **service_environment(api))
    env.update(CLIPFLEET_REDIS_URL=redis_url, CLIPFLEET_S3_ENDPOINT_URL="http://127.0.0.1:9", CLIPFLEET_API_KEYS="key-a")
    probe = [word.replace(f":{api_port(services)}/", f":{port}/") for word in api["healthcheck"]["test"][1:]]
    probe[0] = sys.executable if probe[0] == "python" else probe[0]
    server = ManagedProcess("api", [sys.executable, "-m", "producer.cli", *words], tmp_path / "api.log", env)
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}/healthz") is None and time.monotonic() < deadline:
            assert server.running(), server.log_tail()
            time.sleep(0.2)
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30)

        assert result.returncode == 0, result.stderr + server.log_tail()
        assert http_status(f"http://127.0.0.1:{port}/v1/models") == 401
    finally:
        server.stop()

