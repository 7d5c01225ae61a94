"""Offline checks of the Kubernetes manifests in ops/k8s/ and the container images in ops/.

Built-in kinds are validated with kubernetes-validate against the strict JSON schemas of one Kubernetes
version, and KEDA's kinds against JSON schemas derived from the cloudcoil-models-keda models, made strict
here. The wiring checks read the manifests and the product's own settings together: queue names, ports,
grace periods, selectors and secret keys. Nothing here builds an image or talks to a cluster.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from producer.constants import (
    DEFAULT_LOW_WATER,
    DEFAULT_MAX_TASKS,
    DEFAULT_QUEUE,
    DEFAULT_REALTIME_QUEUE,
    REALTIME_PENDING_KEY,
)
from producer.queue import celery_config
from producer.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
OPS_DIR = REPO_ROOT / "ops"
K8S_DIR = OPS_DIR / "k8s"

# The Kubernetes version whose schemas the built-in kinds must pass. kubernetes-validate 1.37 ships
# schemas for 1.25 to 1.37.
KUBERNETES_VERSION = "1.33.0"
KEDA_API_VERSION = "keda.sh/v1alpha1"
KEDA_MODELS = {"ScaledObject": keda.ScaledObject, "TriggerAuthentication": keda.TriggerAuthentication}
CLUSTER_SCOPED_KINDS = {"Namespace"}

# PyPI's torch 2.13.0 wheel for Linux x86_64 requires cuda-toolkit 13.0.3, so the GPU image's CUDA base
# must be 13.0.
TORCH_VERSION = "2.13.0"
TORCH_CUDA_VERSION = "13.0"
WORKER_PACKAGES = {"torch", "transformers"}
# The names of the worker's and the HTTP API's Deployment, and of the objects that belong to each.
WORKER_NAME = "clipfleet-worker"
API_NAME = "clipfleet-api"
WORKER_METRICS_SERVICE = "clipfleet-worker-metrics"


# Loading


def load_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                documents.append(document)
    return documents


DOCUMENTS = load_documents()


def find_one(kind: str, name: str | None = None) -> dict[str, Any]:
    """Return the only object of `kind` in ops/k8s/, or the only one named `name` when given."""
    matches = [
        document for document in DOCUMENTS
        if document["kind"] == kind and name in (None, document["metadata"]["name"])
    ]
    if len(matches) != 1:
        named = f" named {name!r}" if name else ""
        raise LookupError(f"expected one {kind}{named} in {K8S_DIR}, found {len(matches)}")
    return matches[0]


def document_id(document: dict[str, Any]) -> str:
    return f"{document['kind']}/{document['metadata']['name']}"


def config_data() -> dict[str, str]:
    return find_one("ConfigMap")["data"]


def secret_data() -> dict[str, str]:
    return find_one("Secret")["stringData"]


def worker_deployment() -> dict[str, Any]:
    return find_one("Deployment", WORKER_NAME)


def api_deployment() -> dict[str, Any]:
    return find_one("Deployment", API_NAME)


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def worker_container() -> dict[str, Any]:
    return next(container for container in pod_spec(worker_deployment())["containers"] if container["name"] == "worker")


def api_container() -> dict[str, Any]:
    return next(container for container in pod_spec(api_deployment())["containers"] if container["name"] == "api")


def redis_triggers() -> list[dict[str, Any]]:
    return [trigger for trigger in find_one("ScaledObject")["spec"]["triggers"] if trigger["type"] == "redis"]


def redis_trigger() -> dict[str, Any]:
    """The trigger on the batch queue, the first: ops/README.md and the dashboard tests quote its values."""
    return redis_triggers()[0]


def realtime_trigger() -> dict[str, Any]:
    """The trigger on the realtime queue of the HTTP API's requests, the second."""
    return redis_triggers()[1]


def resolve_container_port(port: int | str, container: dict[str, Any] | None = None) -> int:
    """Return the number of a probe's or Service's port, given as a number or a port name of `container`
    (by default the worker's)."""
    if isinstance(port, int):
        return port
    named = {entry["name"]: entry["containerPort"] for entry in (container or worker_container())["ports"]}
    return named[port]


def settings_from_config(monkeypatch: pytest.MonkeyPatch, with_secret: bool = False) -> Settings:
    """Return the Settings that a pod reads with the ConfigMap (and the Secret's CLIPFLEET_* keys, with
    `with_secret`) as its only CLIPFLEET_* environment."""
    for name in [name for name in os.environ if name.startswith("CLIPFLEET_")]:
        monkeypatch.delenv(name)
    secret = {name: value for name, value in secret_data().items() if name.startswith("CLIPFLEET_")}
    for name, value in {**config_data(), **(secret if with_secret else {})}.items():
        monkeypatch.setenv(name, value)
    return Settings()


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# Schema validation


def test_manifests_found():
    kinds = sorted(document["kind"] for document in DOCUMENTS)
    assert kinds == sorted([
        "ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Namespace", "PodDisruptionBudget",
        "PodDisruptionBudget", "ScaledObject", "Secret", "Service", "Service", "TriggerAuthentication",
    ])


BUILT_IN = [document for document in DOCUMENTS if document["apiVersion"] != KEDA_API_VERSION]


@pytest.mark.parametrize("document", BUILT_IN, ids=document_id)
def test_kubernetes_schema_strict(document):
    version = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert version == "1.33"


def test_kubernetes_schema_rejects_unknown_field():
    deployment = copy.deepcopy(worker_deployment())
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 75
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def forbid_unknown_properties(schema: Any) -> Any:
    """Set `additionalProperties: false` on every object schema that lists its properties, recursively.

    The cloudcoil models accept and drop unknown fields, as pydantic does by default, so their schemas
    would pass a misspelt field that the Kubernetes API server (with KEDA's CRDs) would reject.
    """
    if isinstance(schema, dict):
        strict = {key: forbid_unknown_properties(value) for key, value in schema.items()}
        if "properties" in strict and "additionalProperties" not in strict:
            strict["additionalProperties"] = False
        return strict
    if isinstance(schema, list):
        return [forbid_unknown_properties(item) for item in schema]
    return schema


def keda_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = forbid_unknown_properties(KEDA_MODELS[kind].model_json_schema(by_alias=True))
    return jsonschema.Draft202012Validator(schema)


KEDA_DOCUMENTS = [document for document in DOCUMENTS if document["apiVersion"] == KEDA_API_VERSION]


@pytest.mark.parametrize("document", KEDA_DOCUMENTS, ids=document_id)
def test_keda_schema_strict(document):
    errors = [error.message for error in keda_validator(document["kind"]).iter_errors(document)]
    assert errors == []


def test_keda_schema_rejects_unknown_field():
    scaled_object = copy.deepcopy(find_one("ScaledObject"))
    scaled_object["spec"]["minReplicas"] = 0
    assert not keda_validator("ScaledObject").is_valid(scaled_object)


def test_keda_schema_rejects_number_in_trigger_metadata():
    scaled_object = copy.deepcopy(find_one("ScaledObject"))
    scaled_object["spec"]["triggers"][0]["metadata"]["listLength"] = 50  # KEDA's trigger metadata is a map of strings
    assert not keda_validator("ScaledObject").is_valid(scaled_object)


# Wiring between the manifests and the product


@pytest.mark.parametrize(
    "document", [document for document in DOCUMENTS if document["kind"] not in CLUSTER_SCOPED_KINDS], ids=document_id
)
def test_namespaced_objects_in_namespace(document):
    assert document["metadata"]["namespace"] == find_one("Namespace")["metadata"]["name"]


def test_config_settings_parse(monkeypatch):
    unknown = [
        name for name in config_data()
        if name.startswith("CLIPFLEET_") and name[len("CLIPFLEET_"):].lower() not in Settings.model_fields
    ]
    assert unknown == []
    settings = settings_from_config(monkeypatch)
    assert settings.metrics_port == int(config_data()["CLIPFLEET_METRICS_PORT"])


def test_scaler_list_is_worker_queue(monkeypatch):
    settings = settings_from_config(monkeypatch)
    list_name = redis_trigger()["metadata"]["listName"]
    assert list_name == config_data().get("CLIPFLEET_QUEUE", DEFAULT_QUEUE)
    assert list_name == celery_config(settings)["task_default_queue"]


def test_scaler_list_is_default_queue():
    assert redis_trigger()["metadata"]["listName"] == DEFAULT_QUEUE


def test_scaler_targets_worker_deployment():
    target = find_one("ScaledObject")["spec"]["scaleTargetRef"]
    assert target["name"] == worker_deployment()["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"


def test_scaler_scales_to_zero():
    spec = find_one("ScaledObject")["spec"]
    assert spec["minReplicaCount"] == 0
    # KEDA activates when the list is longer than this, so any larger value strands small jobs at zero.
    assert int(redis_trigger()["metadata"]["activationListLength"]) == 0


def test_scaler_cooldown_outlasts_batch():
    # A batch is killed at 0.9 × the visibility timeout, so it cannot outlive a cooldown of that length.
    visibility_timeout_s = int(config_data()["CLIPFLEET_VISIBILITY_TIMEOUT_S"])
    assert find_one("ScaledObject")["spec"]["cooldownPeriod"] >= 0.9 * visibility_timeout_s


def test_scaler_reaches_max_replicas():
    # Even a producer paused at its low-water mark keeps enough batches queued for every replica.
    spec = find_one("ScaledObject")["spec"]
    queued_for_max = spec["maxReplicaCount"] * int(redis_trigger()["metadata"]["listLength"])
    assert queued_for_max <= DEFAULT_MAX_TASKS * DEFAULT_LOW_WATER


def test_scaler_authentication_wiring():
    trigger_authentication = find_one("TriggerAuthentication")
    assert redis_trigger()["authenticationRef"]["name"] == trigger_authentication["metadata"]["name"]
    references = trigger_authentication["spec"]["secretTargetRef"]
    assert sorted(reference["parameter"] for reference in references) == ["address", "password"]
    for reference in references:
        assert reference["name"] == find_one("Secret")["metadata"]["name"]
        assert reference["key"] in secret_data()


def test_scaler_reads_worker_redis():
    url = urlsplit(secret_data()["CLIPFLEET_REDIS_URL"])
    assert secret_data()["redis-address"] == f"{url.hostname}:{url.port}"
    assert secret_data()["redis-password"] == url.password
    assert redis_trigger()["metadata"]["databaseIndex"] == url.path.lstrip("/")


def test_probe_paths():
    container = worker_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe", "startupProbe"])
def test_probe_uses_metrics_port(probe):
    port = resolve_container_port(worker_container()[probe]["httpGet"]["port"])
    assert port == int(config_data()["CLIPFLEET_METRICS_PORT"])


def test_metrics_service_and_annotations_port():
    metrics_port = int(config_data()["CLIPFLEET_METRICS_PORT"])
    service_port = find_one("Service", WORKER_METRICS_SERVICE)["spec"]["ports"][0]
    annotations = worker_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert resolve_container_port(service_port["targetPort"]) == metrics_port
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_grace_period_above_shutdown_grace():
    shutdown_grace_s = float(config_data()["CLIPFLEET_SHUTDOWN_GRACE_S"])
    termination_grace_s = pod_spec(worker_deployment())["terminationGracePeriodSeconds"]
    assert termination_grace_s > shutdown_grace_s
    # The worker exits about 1.4 s after its grace ends (README.md), so leave a margin of several seconds.
    assert termination_grace_s - shutdown_grace_s >= 10


def test_worker_gets_config_and_secrets():
    container = worker_container()
    assert {"configMapRef": {"name": find_one("ConfigMap")["metadata"]["name"]}} in container["envFrom"]
    for entry in container["env"]:
        reference = entry["valueFrom"]["secretKeyRef"]
        assert reference["name"] == find_one("Secret")["metadata"]["name"]
        assert reference["key"] in secret_data()
    assert "CLIPFLEET_REDIS_URL" in {entry["name"] for entry in container["env"]}


def test_pdb_selects_worker_pods():
    labels = pod_labels(worker_deployment())
    assert selector_matches(find_one("PodDisruptionBudget", WORKER_NAME)["spec"]["selector"]["matchLabels"], labels)


def test_deployment_and_service_select_worker_pods():
    deployment = worker_deployment()
    labels = pod_labels(deployment)
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selector_matches(find_one("Service", WORKER_METRICS_SERVICE)["spec"]["selector"], labels)


def test_worker_requests_one_gpu():
    assert worker_container()["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_worker_tolerates_gpu_taint():
    tolerations = pod_spec(worker_deployment())["tolerations"]
    assert any(toleration["key"] == "nvidia.com/gpu" for toleration in tolerations)


def test_worker_scheduled_on_gpu_nodes():
    affinity = pod_spec(worker_deployment())["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = [expression["key"] for term in terms for expression in term["matchExpressions"]]
    assert keys == ["nvidia.com/gpu.present"]


def test_deployment_leaves_replicas_to_keda():
    assert "replicas" not in worker_deployment()["spec"]


def test_worker_runs_as_image_user():
    pod_security = pod_spec(worker_deployment())["securityContext"]
    assert pod_security["runAsUser"] == int(dockerfile_value("worker-cuda.Dockerfile", "USER"))


# The HTTP API tier


def test_api_deployment_and_service_select_api_pods():
    deployment = api_deployment()
    labels = pod_labels(deployment)
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selector_matches(find_one("Service", API_NAME)["spec"]["selector"], labels)
    assert selector_matches(find_one("PodDisruptionBudget", API_NAME)["spec"]["selector"]["matchLabels"], labels)


def test_api_and_worker_pods_kept_apart():
    # A Service or budget that selected both tiers would send requests to workers or count GPU pods as API pods.
    worker_labels, api_labels = pod_labels(worker_deployment()), pod_labels(api_deployment())
    assert not selector_matches(find_one("Service", API_NAME)["spec"]["selector"], worker_labels)
    assert not selector_matches(find_one("PodDisruptionBudget", API_NAME)["spec"]["selector"]["matchLabels"], worker_labels)
    assert not selector_matches(find_one("Service", WORKER_METRICS_SERVICE)["spec"]["selector"], api_labels)
    assert not selector_matches(find_one("PodDisruptionBudget", WORKER_NAME)["spec"]["selector"]["matchLabels"], api_labels)


def test_api_runs_clipfleet_serve():
    arguments = api_container()["args"]
    assert arguments[0] == "serve"
    assert arguments[arguments.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_api_probe_on_served_port(probe):
    container = api_container()
    arguments = container["args"]
    served_port = int(arguments[arguments.index("--port") + 1])
    probe_get = container[probe]["httpGet"]
    assert probe_get["path"] == "/healthz"
    assert resolve_container_port(probe_get["port"], container) == served_port


def test_api_service_targets_served_port():
    container = api_container()
    arguments = container["args"]
    served_port = int(arguments[arguments.index("--port") + 1])
    service_ports = find_one("Service", API_NAME)["spec"]["ports"]
    assert [resolve_container_port(port["targetPort"], container) for port in service_ports] == [served_port]
    assert [int(port) for port in dockerfile_values("producer.Dockerfile", "EXPOSE")] == [served_port]


def test_api_gets_worker_config_and_secrets():
    container = api_container()
    secret_name = find_one("Secret")["metadata"]["name"]
    assert container["envFrom"] == worker_container()["envFrom"]
    for entry in container["env"]:
        assert entry["valueFrom"]["secretKeyRef"]["name"] == secret_name
        assert entry["valueFrom"]["secretKeyRef"]["key"] in secret_data()
    # The API sends to the workers' Redis and reads the workers' buckets, with the same credentials.
    worker_env = {entry["name"]: entry for entry in worker_container()["env"]}
    api_env = {entry["name"]: entry for entry in container["env"]}
    assert {name: api_env.get(name) for name in worker_env} == worker_env


def test_api_keys_come_from_secret():
    api_env = {entry["name"]: entry for entry in api_container()["env"]}
    assert api_env["CLIPFLEET_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "CLIPFLEET_API_KEYS"
    assert "CLIPFLEET_API_KEYS" not in config_data()


def test_api_settings_parse(monkeypatch):
    settings = settings_from_config(monkeypatch, with_secret=True)
    assert settings.api_keys == [secret_data()["CLIPFLEET_API_KEYS"]]
    assert settings.api_timeout_s == float(config_data()["CLIPFLEET_API_TIMEOUT_S"])


def test_api_requests_no_gpu():
    spec = pod_spec(api_deployment())
    resources = api_container()["resources"]
    assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
    assert "tolerations" not in spec
    assert "affinity" not in spec


def test_api_requests_cpu_and_memory():
    # The HPA's CPU utilization is measured against the CPU request, so without one it cannot scale.
    requests = api_container()["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"}


def test_api_security_matches_worker():
    assert pod_spec(api_deployment())["securityContext"] == pod_spec(worker_deployment())["securityContext"]
    assert api_container()["securityContext"] == worker_container()["securityContext"]
    assert pod_spec(api_deployment())["securityContext"]["runAsUser"] == int(dockerfile_value("producer.Dockerfile", "USER"))


def test_api_grace_period_above_request_timeout():
    # A stopping pod sleeps in its preStop hook, then lets each running request wait up to CLIPFLEET_API_TIMEOUT_S.
    pre_stop = api_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    request_timeout_s = float(config_data()["CLIPFLEET_API_TIMEOUT_S"])
    termination_grace_s = pod_spec(api_deployment())["terminationGracePeriodSeconds"]
    assert termination_grace_s - float(pre_stop[1]) - request_timeout_s >= 5


def test_api_hpa_scales_api_deployment_on_cpu():
    spec = find_one("HorizontalPodAutoscaler", API_NAME)["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", API_NAME)
    assert [metric["resource"]["name"] for metric in spec["metrics"]] == ["cpu"]
    assert spec["metrics"][0]["resource"]["target"]["type"] == "Utilization"


def test_api_keeps_two_replicas():
    spec = find_one("HorizontalPodAutoscaler", API_NAME)["spec"]
    assert spec["minReplicas"] >= 2
    assert spec["maxReplicas"] >= spec["minReplicas"]
    # With a replica count in the Deployment, every `kubectl apply` would reset what the HPA chose.
    assert "replicas" not in api_deployment()["spec"]
    assert find_one("PodDisruptionBudget", API_NAME)["spec"]["maxUnavailable"] < spec["minReplicas"]


def test_scaler_has_batch_and_realtime_triggers():
    assert len(redis_triggers()) == len(find_one("ScaledObject")["spec"]["triggers"]) == 2
    assert realtime_trigger()["authenticationRef"] == redis_trigger()["authenticationRef"]
    assert realtime_trigger()["metadata"]["databaseIndex"] == redis_trigger()["metadata"]["databaseIndex"]


def test_realtime_trigger_list_is_pending_requests(monkeypatch):
    # The pending list counts waiting requests; the Celery list named after the queue holds only wake-up tasks.
    settings = settings_from_config(monkeypatch)
    list_name = realtime_trigger()["metadata"]["listName"]
    assert list_name == REALTIME_PENDING_KEY.format(queue=config_data().get("CLIPFLEET_REALTIME_QUEUE", DEFAULT_REALTIME_QUEUE))
    assert list_name == REALTIME_PENDING_KEY.format(queue=settings.realtime_queue)
    assert list_name == REALTIME_PENDING_KEY.format(queue=Settings.model_fields["realtime_queue"].default)
    assert list_name != settings.realtime_queue
    assert list_name != redis_trigger()["metadata"]["listName"]


def test_realtime_trigger_wakes_on_first_request():
    assert int(realtime_trigger()["metadata"]["activationListLength"]) == 0


def test_realtime_trigger_reaches_max_before_api_refuses(monkeypatch):
    # Past CLIPFLEET_API_QUEUE_HIGH_WATER waiting requests the API responds with 429 and queues nothing more, so the
    # trigger must ask for every replica before the list gets that long.
    settings = settings_from_config(monkeypatch)
    queued_for_max = find_one("ScaledObject")["spec"]["maxReplicaCount"] * int(realtime_trigger()["metadata"]["listLength"])
    assert queued_for_max < settings.api_queue_high_water


def readme_ingress_example() -> dict[str, Any]:
    """Return the Ingress of the YAML block under "TLS and the ingress" in ops/README.md."""
    markdown = (OPS_DIR / "README.md").read_text(encoding="utf-8")
    section = markdown[markdown.index("### TLS and the ingress"):]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None, "no YAML block under 'TLS and the ingress' in ops/README.md"
    return yaml.safe_load(block.group(1))


def test_readme_ingress_example_valid():
    kubernetes_validate.validate(readme_ingress_example(), KUBERNETES_VERSION, strict=True)


def test_readme_ingress_routes_to_api_service():
    ingress = readme_ingress_example()
    service = find_one("Service", API_NAME)
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert ingress["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert backends == [{"name": API_NAME, "port": {"name": service["spec"]["ports"][0]["name"]}}]


def test_readme_ingress_fits_api_limits(monkeypatch):
    # ingress-nginx rejects larger bodies with 413 and ends a slower reply with 504 before the API does.
    settings = settings_from_config(monkeypatch)
    annotations = readme_ingress_example()["metadata"]["annotations"]
    body_size = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body_size.endswith("m")
    assert int(body_size[:-1]) * 1024 * 1024 >= max(settings.api_max_request_bytes, settings.api_max_file_bytes)
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > settings.api_timeout_s


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["batch-only", "serving-api"])
def test_scaler_valid_with_either_minimum(min_replicas):
    # ops/README.md asks operators who deploy the API to set minReplicaCount to 1.
    scaled_object = copy.deepcopy(find_one("ScaledObject"))
    scaled_object["spec"]["minReplicaCount"] = min_replicas
    assert keda_validator("ScaledObject").is_valid(scaled_object)
    assert min_replicas <= scaled_object["spec"]["maxReplicaCount"]


# Dockerfiles


def parse_dockerfile(name: str) -> list[tuple[str, str]]:
    """Return the (INSTRUCTION, arguments) pairs of a Dockerfile, with continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (OPS_DIR / name).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def dockerfile_values(name: str, keyword: str) -> list[str]:
    return [arguments for found, arguments in parse_dockerfile(name) if found == keyword]


def dockerfile_value(name: str, keyword: str) -> str:
    values = dockerfile_values(name, keyword)
    if len(values) != 1:
        raise LookupError(f"expected one {keyword} in {name}, found {len(values)}")
    return values[0]


def dockerfile_env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in dockerfile_values(name, "ENV"):
        for pair in shlex.split(arguments):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def pip_installs(name: str) -> list[list[str]]:
    """Return the arguments of each `pip install` in the Dockerfile's RUN instructions, options included."""
    installs = []
    for command in dockerfile_values(name, "RUN"):
        words = shlex.split(command)
        for index in range(len(words) - 1):
            if words[index] == "pip" and words[index + 1] == "install":
                arguments = []
                for word in words[index + 2:]:
                    if word in ("&&", ";", "||"):
                        break
                    arguments.append(word)
                installs.append(arguments)
    return installs


def install_targets(arguments: list[str]) -> list[str]:
    """Return the requirements and paths of one `pip install`, without its options and their values."""
    takes_value = {"--index-url", "--extra-index-url", "-i", "--constraint", "-c", "--requirement", "-r"}
    targets = []
    skip = False
    for word in arguments:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            targets.append(word)
    return targets


@pytest.mark.parametrize("name", ["worker.Dockerfile", "worker-cuda.Dockerfile", "producer.Dockerfile"])
def test_dockerfile_entrypoint_exec_form(name):
    # The exec form makes `clipfleet` process 1 of the container, so it receives Kubernetes' SIGTERM itself.
    assert json.loads(dockerfile_value(name, "ENTRYPOINT")) == ["clipfleet"]


@pytest.mark.parametrize("name", ["worker.Dockerfile", "worker-cuda.Dockerfile"])
def test_worker_image_runs_worker(name):
    assert json.loads(dockerfile_value(name, "CMD")) == ["worker"]


def test_cpu_image_base():
    assert dockerfile_value("worker.Dockerfile", "FROM") == "python:3.11-slim"
    assert ["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"] in pip_installs("worker.Dockerfile")


def test_cuda_image_base_matches_torch():
    image = dockerfile_value("worker-cuda.Dockerfile", "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", image)
    assert match is not None, image
    assert f"{match.group(1)}.{match.group(2)}" == TORCH_CUDA_VERSION
    assert [f"torch=={TORCH_VERSION}"] in pip_installs("worker-cuda.Dockerfile")


def test_cuda_image_model_location():
    download = next(command for command in dockerfile_values("worker-cuda.Dockerfile", "RUN") if "hf download" in command)
    words = shlex.split(download)
    local_dir = words[words.index("--local-dir") + 1]
    assert dockerfile_env("worker-cuda.Dockerfile")["CLIPFLEET_MODEL"] == local_dir
    assert dockerfile_env("worker-cuda.Dockerfile")["CLIPFLEET_DEVICE"] == "cuda"


def test_producer_image_base():
    assert dockerfile_value("producer.Dockerfile", "FROM") == "python:3.11-slim"


def test_producer_image_project_without_dependencies():
    installs = pip_installs("producer.Dockerfile")
    assert ["--no-deps", "."] in installs
    project_installs = [arguments for arguments in installs if "." in install_targets(arguments)]
    assert all("--no-deps" in arguments for arguments in project_installs)


def test_producer_image_copies_no_worker_code():
    copied = [shlex.split(arguments)[0] for arguments in dockerfile_values("producer.Dockerfile", "COPY")]
    assert "workers" not in copied


def producer_requirements() -> list[Requirement]:
    targets = [
        target for arguments in pip_installs("producer.Dockerfile") for target in install_targets(arguments)
        if target != "."
    ]
    return [Requirement(target) for target in targets]


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """Return the canonical names of the requirements and everything they depend on, from installed metadata.

    Raises PackageNotFoundError for a distribution that is not installed here, because its dependencies
    could then not be followed.
    """
    found: set[str] = set()
    pending = [(requirement, frozenset(requirement.extras)) for requirement in requirements]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in found:
            continue
        found.add(key)
        found.add(name)
        for text in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(text)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                pending.append((dependency, frozenset(dependency.extras)))
    return {name for name in found if "[" not in name}


def test_producer_image_installs_no_torch():
    requirement_names = {canonicalize_name(requirement.name) for requirement in producer_requirements()}
    assert requirement_names & WORKER_PACKAGES == set()
    assert dependency_closure(producer_requirements()) & WORKER_PACKAGES == set()


def producer_imports() -> set[str]:
    """Return the top-level third-party modules that producer/ imports, anywhere in its code."""
    modules: set[str] = set()
    for path in (REPO_ROOT / "producer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.partition(".")[0])
    # Only `clipfleet worker` imports workers, and the producer image does not support that command.
    return modules - set(sys.stdlib_module_names) - {"__future__", "producer", "workers"}


def test_producer_image_installs_api_server():
    # FastAPI imports python-multipart only when a route reads a form, such as the upload of POST /v1/files.
    names = {canonicalize_name(requirement.name) for requirement in producer_requirements()}
    assert {"fastapi", "uvicorn", "python-multipart"} <= names


def test_producer_image_installs_producer_imports():
    distributions = importlib.metadata.packages_distributions()
    closure = dependency_closure(producer_requirements())
    missing = sorted(
        module for module in producer_imports()
        if not {canonicalize_name(name) for name in distributions.get(module, [module])} & closure
    )
    assert missing == []


def test_producer_imports_without_torch():
    # Blocking the modules makes any import of them raise ImportError, as in the producer image.
    code = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; import producer.cli"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
