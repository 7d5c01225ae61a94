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

from producer.constants import DEFAULT_LOW_WATER, DEFAULT_MAX_TASKS, DEFAULT_QUEUE
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


# Loading


def load_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                documents.append(document)
    return documents


DOCUMENTS = load_documents()


def find_one(kind: str) -> dict[str, Any]:
    matches = [document for document in DOCUMENTS if document["kind"] == kind]
    if len(matches) != 1:
        raise LookupError(f"expected one {kind} in {K8S_DIR}, found {len(matches)}")
    return matches[0]


def document_id(document: dict[str, Any]) -> str:
    return f"{document['kind']}/{document['metadata']['name']}"


def config_data() -> dict[str, str]:
    return find_one("ConfigMap")["data"]


def secret_data() -> dict[str, str]:
    return find_one("Secret")["stringData"]


def worker_container() -> dict[str, Any]:
    containers = find_one("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(container for container in containers if container["name"] == "worker")


def redis_trigger() -> dict[str, Any]:
    triggers = find_one("ScaledObject")["spec"]["triggers"]
    return next(trigger for trigger in triggers if trigger["type"] == "redis")


def resolve_container_port(port: int | str) -> int:
    """Return the number of a probe's or Service's port, given as a number or a container port name."""
    if isinstance(port, int):
        return port
    named = {entry["name"]: entry["containerPort"] for entry in worker_container()["ports"]}
    return named[port]


def settings_from_config(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Return the Settings that a worker reads with the ConfigMap as its only CLIPFLEET_* environment."""
    for name in [name for name in os.environ if name.startswith("CLIPFLEET_")]:
        monkeypatch.delenv(name)
    for name, value in config_data().items():
        monkeypatch.setenv(name, value)
    return Settings()


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# Schema validation


def test_manifests_found():
    kinds = sorted(document["kind"] for document in DOCUMENTS)
    assert kinds == sorted([
        "ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "ScaledObject", "Secret", "Service",
        "TriggerAuthentication",
    ])


BUILT_IN = [document for document in DOCUMENTS if document["apiVersion"] != KEDA_API_VERSION]


@pytest.mark.parametrize("document", BUILT_IN, ids=document_id)
def test_kubernetes_schema_strict(document):
    version = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert version == "1.33"


def test_kubernetes_schema_rejects_unknown_field():
    deployment = copy.deepcopy(find_one("Deployment"))
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
    assert target["name"] == find_one("Deployment")["metadata"]["name"]
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
    service_port = find_one("Service")["spec"]["ports"][0]
    annotations = find_one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert resolve_container_port(service_port["targetPort"]) == metrics_port
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_grace_period_above_shutdown_grace():
    shutdown_grace_s = float(config_data()["CLIPFLEET_SHUTDOWN_GRACE_S"])
    termination_grace_s = find_one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
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
    pod_labels = find_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(find_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)


def test_deployment_and_service_select_worker_pods():
    deployment = find_one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selector_matches(find_one("Service")["spec"]["selector"], pod_labels)


def test_worker_requests_one_gpu():
    assert worker_container()["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_worker_tolerates_gpu_taint():
    tolerations = find_one("Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert any(toleration["key"] == "nvidia.com/gpu" for toleration in tolerations)


def test_worker_scheduled_on_gpu_nodes():
    affinity = find_one("Deployment")["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = [expression["key"] for term in terms for expression in term["matchExpressions"]]
    assert keys == ["nvidia.com/gpu.present"]


def test_deployment_leaves_replicas_to_keda():
    assert "replicas" not in find_one("Deployment")["spec"]


def test_worker_runs_as_image_user():
    pod_security = find_one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsUser"] == int(dockerfile_value("worker-cuda.Dockerfile", "USER"))


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
