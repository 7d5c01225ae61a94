#!/usr/bin/env python
"""Simulate KEDA and the HPA scaling the worker fleet on the queue's length, with no cluster.

Run from the repository root:

    python benchmarks/autoscale.py                     # every scenario on the default workload, as a table
    python benchmarks/autoscale.py --json              # the same as JSON
    python benchmarks/autoscale.py --ops-dir DIR       # read the manifests from a copy of ops/
    python benchmarks/autoscale.py --measure-startup   # time a real worker from start to /readyz (about a minute)

The scaler settings come from ops/k8s/scaledobject.yaml, the worker's concurrency from
ops/k8s/worker-deployment.yaml, the CLIPFLEET_* settings from ops/k8s/configmap.yaml over the product's
defaults, and the prefetch multiplier from producer.queue.celery_config. The per-worker rate and start-up time
are the measured figures below. docs/benchmarks.md describes the model, its simplifications and the results.

The simulation advances in steps of STEP_S seconds. Within a step a pool process may finish one batch and
start the next, so batches shorter than a step are timed exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import re
import shlex
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._options import positive_int  # noqa: E402
from producer.queue import Backpressure, celery_config  # noqa: E402
from producer.settings import Settings  # noqa: E402

logger = logging.getLogger(__name__)

OPS_DIR = REPO_ROOT / "ops"
STEP_S = 1.0
DAY_S = 86_400

# Measured inputs.
# One worker end to end, ViT-B/32-sized checkpoint, 2-core AMD EPYC, no GPU: 60.3 images/s with 10 labels
# (docs/benchmarks.md, "Throughput", run of 2026-12-05 01:59 UTC).
MEASURED_CPU_IMAGES_PER_S = 60.3
# Seconds from starting `clipfleet worker --concurrency 6` with the ViT-B/32-sized random checkpoint to
# /readyz returning 200: the median of 8 starts (9.1 to 18.5 s) by `python benchmarks/autoscale.py
# --measure-startup`, 2026-12-05 06:37 to 06:40 UTC, on the same 2-core machine, model files in the page cache.
MEASURED_STARTUP_S = 12.3
# The producer enqueued about 98,000 URIs/s in 64-image tasks (docs/benchmarks.md, "Bulk submission").
MEASURED_PRODUCER_TASKS_PER_S = 1_500.0

# Assumptions, not measured.
# Scheduling, node provisioning and the image pull before the worker process starts.
ASSUMED_EXTRA_STARTUP_S = 60.0
EXTRA_STARTUP_SENSITIVITY_S = (0.0, 60.0, 180.0)
# A GPU worker's end-to-end rate. Unmeasured: no GPU was available, and the goal for an H200 is 5,000 images/s.
ASSUMED_GPU_IMAGES_PER_S = 2_000.0
# Spread of batch times around their mean. Images differ in size, so equal batches take different times.
DEFAULT_BATCH_TIME_JITTER = 0.25

# Kubernetes defaults (kube-controller-manager 1.33 and the HPA API's default behavior).
HPA_SYNC_PERIOD_S = 15
HPA_TOLERANCE = 0.1

STARTUP_TIMEOUT_S = 300.0
READY_POLL_S = 0.1


@dataclass(frozen=True)
class ScalingPolicy:
    """One HPA scaling policy: change by at most `value` pods or percent per `period_s`."""

    kind: str  # "Pods" or "Percent"
    value: int
    period_s: int


@dataclass(frozen=True)
class ScalingRules:
    """The HPA behavior of one direction (scaleUp or scaleDown)."""

    stabilization_window_s: int
    select_policy: str  # "Max", "Min" or "Disabled"
    policies: tuple[ScalingPolicy, ...]


# The HPA's defaults when a ScaledObject sets no behavior (autoscaling/v2 API reference).
DEFAULT_SCALE_UP = ScalingRules(0, "Max", (ScalingPolicy("Percent", 100, 15), ScalingPolicy("Pods", 4, 15)))
DEFAULT_SCALE_DOWN = ScalingRules(300, "Max", (ScalingPolicy("Percent", 100, 15),))


@dataclass(frozen=True)
class ScalerSettings:
    """The ScaledObject's settings that the simulation uses."""

    polling_interval_s: int
    cooldown_s: int
    min_replicas: int
    max_replicas: int
    list_length: int
    activation_list_length: int
    scale_up: ScalingRules
    scale_down: ScalingRules


@dataclass(frozen=True)
class FleetSettings:
    """Worker and producer settings: the Deployment's concurrency, the ConfigMap over the product's defaults."""

    concurrency: int
    prefetch_multiplier: int
    shutdown_grace_s: float
    batch_size: int
    queue_ahead_s: float
    queue_low_water: float
    queue_max_tasks: int
    queue_high_water: int | str  # a fixed number of tasks, or "auto"


@dataclass(frozen=True)
class WorkerModel:
    """Speed of one worker pod: images/s over all its pool processes, and seconds from creation to ready."""

    images_per_s: float
    startup_s: float
    extra_startup_s: float


@dataclass(frozen=True)
class Job:
    """A job of `images` images submitted at `arrival_s`, one of the jobs of burst number `burst`."""

    arrival_s: float
    images: int
    burst: int


@dataclass(frozen=True)
class Scenario:
    name: str
    scaler: ScalerSettings
    fleet: FleetSettings
    worker: WorkerModel
    jobs: tuple[Job, ...]
    max_simulated_s: float = 3 * DAY_S
    # Each batch takes its mean time × a factor drawn uniformly from [1 - jitter, 1 + jitter], seeded by
    # `seed`. With 0 every batch of a size takes the same time, so the pool processes of pods started
    # together finish in step and take batches in bursts.
    batch_time_jitter: float = 0.0
    seed: int = 0


# Reading the manifests


class ManifestError(ValueError):
    """A manifest under the ops folder that is missing, unreadable, or contains a value the simulation cannot use.

    The message names the file, the field path and the value, and says what is allowed.
    """


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    try:
        documents = [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document]
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"failed to read the manifest {path}: {e}") from e
    for document in documents:
        if not isinstance(document, dict):
            raise ManifestError(f"invalid document {document!r} in {path}: expected a mapping with a kind")
    return documents


def _find_kind(path: Path, kind: str) -> dict[str, Any]:
    matches = [document for document in _yaml_documents(path) if document.get("kind") == kind]
    if len(matches) != 1:
        raise ManifestError(f"expected one {kind} in {path}, found {len(matches)}")
    return matches[0]


def _mapping(parent: dict[str, Any], key: str, path: Path, field_path: str, required: bool = False) -> dict[str, Any]:
    """Return `parent[key]` when it is a mapping, {} when it is absent and not `required`; raise ManifestError otherwise."""
    value = parent.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"invalid {field_path} {value!r} in {path}: expected a mapping")
    return value


def _integer(value: Any, path: Path, field_path: str, minimum: int, maximum: int | None = None) -> int:
    """Return `value` as an int within [minimum, maximum].

    Accepts YAML integers and decimal strings, because KEDA's trigger metadata values are strings. Raises
    ManifestError for anything else (booleans, fractions, words) and for values out of range.
    """
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        number = int(value)
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    if number is None or number < minimum or (maximum is not None and number > maximum):
        raise ManifestError(f"invalid {field_path} {value!r} in {path}: expected {allowed}")
    return number


def _parse_policy(policy: Any, path: Path, field_path: str) -> ScalingPolicy:
    if not isinstance(policy, dict):
        raise ManifestError(f"invalid {field_path} {policy!r} in {path}: expected a mapping with type, value and periodSeconds")
    kind = policy.get("type")
    if kind not in ("Pods", "Percent"):
        raise ManifestError(f"invalid {field_path}.type {kind!r} in {path}: expected 'Pods' or 'Percent'")
    # The HPA API's limits: value > 0, 0 < periodSeconds <= 1800 (autoscaling/v2 HPAScalingPolicy).
    value = _integer(policy.get("value"), path, f"{field_path}.value", minimum=1)
    period_s = _integer(policy.get("periodSeconds"), path, f"{field_path}.periodSeconds", minimum=1, maximum=1800)
    return ScalingPolicy(kind, value, period_s)


def _parse_rules(behavior: dict[str, Any], direction: str, default: ScalingRules, path: Path, behavior_path: str) -> ScalingRules:
    """Read the behavior of one direction, filling the fields it leaves out with the HPA's defaults for it.

    Raises ManifestError for a value the HPA API rejects.
    """
    field_path = f"{behavior_path}.{direction}"
    rules = _mapping(behavior, direction, path, field_path)
    if not rules:
        return default
    policies_value = rules.get("policies", [])
    if not isinstance(policies_value, list):
        raise ManifestError(f"invalid {field_path}.policies {policies_value!r} in {path}: expected a list of policies")
    policies = tuple(_parse_policy(policy, path, f"{field_path}.policies[{index}]") for index, policy in enumerate(policies_value))
    window_value = rules.get("stabilizationWindowSeconds", default.stabilization_window_s)
    # The HPA API allows 0 to 3600 s (autoscaling/v2 HPAScalingRules).
    window_s = _integer(window_value, path, f"{field_path}.stabilizationWindowSeconds", minimum=0, maximum=3600)
    select_policy = rules.get("selectPolicy", default.select_policy)
    if select_policy not in ("Max", "Min", "Disabled"):
        raise ManifestError(f"invalid {field_path}.selectPolicy {select_policy!r} in {path}: expected 'Max', 'Min' or 'Disabled'")
    return ScalingRules(window_s, select_policy, policies or default.policies)


def _redis_trigger_metadata(spec: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """Return the field path and the metadata of the ScaledObject's first redis trigger, the batch queue's.

    A later redis trigger watches the realtime queue of the HTTP API. The simulation sends no realtime requests,
    so that trigger asks for no replicas and the HPA follows the first one alone.
    """
    triggers = spec.get("triggers", [])
    if not isinstance(triggers, list):
        raise ManifestError(f"invalid spec.triggers {triggers!r} in {path}: expected a list of triggers")
    indexes = [index for index, trigger in enumerate(triggers) if isinstance(trigger, dict) and trigger.get("type") == "redis"]
    if not indexes:
        raise ManifestError(f"expected a redis trigger in {path}, found none")
    field_path = f"spec.triggers[{indexes[0]}].metadata"
    return field_path, _mapping(triggers[indexes[0]], "metadata", path, field_path, required=True)


def read_scaler_settings(ops_dir: Path = OPS_DIR) -> ScalerSettings:
    """Read the ScaledObject in `ops_dir`/k8s/scaledobject.yaml, with KEDA's defaults for what it leaves out.

    Raises ManifestError when the file is missing or unreadable, has no single ScaledObject or no redis trigger,
    or has a value out of range: pollingInterval and listLength below 1, cooldownPeriod,
    activationListLength or minReplicaCount below 0, maxReplicaCount below 1 or below minReplicaCount.
    """
    path = ops_dir / "k8s" / "scaledobject.yaml"
    spec = _mapping(_find_kind(path, "ScaledObject"), "spec", path, "spec", required=True)
    metadata_path, metadata = _redis_trigger_metadata(spec, path)
    behavior_path = "spec.advanced.horizontalPodAutoscalerConfig.behavior"
    advanced = _mapping(spec, "advanced", path, "spec.advanced")
    hpa_config = _mapping(advanced, "horizontalPodAutoscalerConfig", path, "spec.advanced.horizontalPodAutoscalerConfig")
    behavior = _mapping(hpa_config, "behavior", path, behavior_path)
    # KEDA 2.16's defaults for the fields left out.
    min_replicas = _integer(spec.get("minReplicaCount", 0), path, "spec.minReplicaCount", minimum=0)
    max_replicas = _integer(spec.get("maxReplicaCount", 100), path, "spec.maxReplicaCount", minimum=1)
    if max_replicas < min_replicas:
        raise ManifestError(
            f"invalid spec.maxReplicaCount {max_replicas} in {path}: expected an integer >= spec.minReplicaCount ({min_replicas}); "
            "raise maxReplicaCount or lower minReplicaCount"
        )
    return ScalerSettings(
        polling_interval_s=_integer(spec.get("pollingInterval", 30), path, "spec.pollingInterval", minimum=1),
        cooldown_s=_integer(spec.get("cooldownPeriod", 300), path, "spec.cooldownPeriod", minimum=0),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        list_length=_integer(metadata.get("listLength", 5), path, f"{metadata_path}.listLength", minimum=1),
        activation_list_length=_integer(metadata.get("activationListLength", 0), path, f"{metadata_path}.activationListLength", minimum=0),
        scale_up=_parse_rules(behavior, "scaleUp", DEFAULT_SCALE_UP, path, behavior_path),
        scale_down=_parse_rules(behavior, "scaleDown", DEFAULT_SCALE_DOWN, path, behavior_path),
    )


def _deployment_containers(path: Path) -> list[dict[str, Any]]:
    deployment_spec = _mapping(_find_kind(path, "Deployment"), "spec", path, "spec", required=True)
    template = _mapping(deployment_spec, "template", path, "spec.template", required=True)
    pod_spec = _mapping(template, "spec", path, "spec.template.spec", required=True)
    containers = pod_spec.get("containers")
    if not isinstance(containers, list) or not all(isinstance(container, dict) for container in containers):
        raise ManifestError(f"invalid spec.template.spec.containers {containers!r} in {path}: expected a list of containers")
    return containers


def read_worker_concurrency(ops_dir: Path = OPS_DIR) -> int:
    """Return `--concurrency N` from the worker container's args in worker-deployment.yaml.

    Raises ManifestError when N is not an integer >= 1, or when the args set no concurrency: the Deployment
    then runs Celery's default of one pool process per CPU, which the simulation cannot know.
    """
    path = ops_dir / "k8s" / "worker-deployment.yaml"
    command_lines = []
    for container_index, container in enumerate(_deployment_containers(path)):
        arguments = [str(argument) for argument in [*container.get("command", []), *container.get("args", [])]]
        field_path = f"spec.template.spec.containers[{container_index}] --concurrency"
        for index, argument in enumerate(arguments):
            if argument == "--concurrency" and index + 1 < len(arguments):
                return _integer(arguments[index + 1], path, field_path, minimum=1)
            if argument.startswith("--concurrency="):
                return _integer(argument.split("=", 1)[1], path, field_path, minimum=1)
        command_lines.append(shlex.join(arguments))
    raise ManifestError(
        f"no --concurrency in the containers of {path} ({'; '.join(command_lines)}); "
        "add `--concurrency N` to the worker container's args"
    )


class _ConfigMapSettings(Settings):
    """Settings from keyword arguments only, so this process's CLIPFLEET_* variables do not leak in."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, **sources: Any) -> tuple[Any, ...]:
        return (init_settings,)


def _configmap_settings(path: Path) -> Settings:
    """Return the ConfigMap's CLIPFLEET_* values over Settings' defaults; raise ManifestError for an invalid one."""
    data = _mapping(_find_kind(path, "ConfigMap"), "data", path, "data")
    values = {name.removeprefix("CLIPFLEET_").lower(): value for name, value in data.items() if name.startswith("CLIPFLEET_")}
    try:
        return _ConfigMapSettings(**values)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        name = "CLIPFLEET_" + str(error["loc"][0]).upper() if error["loc"] else "data"
        raise ManifestError(f"invalid data.{name} {error.get('input')!r} in {path}: {error['msg']}") from e


def read_fleet_settings(ops_dir: Path = OPS_DIR) -> FleetSettings:
    """Read the worker's concurrency, the ConfigMap's CLIPFLEET_* values over Settings' defaults, and the
    prefetch multiplier that producer.queue.celery_config sets. Raises ManifestError for an invalid value."""
    settings = _configmap_settings(ops_dir / "k8s" / "configmap.yaml")
    return FleetSettings(
        concurrency=read_worker_concurrency(ops_dir),
        prefetch_multiplier=int(celery_config(settings)["worker_prefetch_multiplier"]),
        shutdown_grace_s=settings.shutdown_grace_s,
        batch_size=settings.batch_size,
        queue_ahead_s=settings.queue_ahead_s,
        queue_low_water=settings.queue_low_water,
        queue_max_tasks=settings.queue_max_tasks,
        queue_high_water=settings.queue_high_water,
    )


# Workload


def bursty_workload(
    seed: int,
    bursts: int = 8,
    max_jobs_per_burst: int = 4,
    min_images: int = 5_000,
    max_images: int = 3_000_000,
    burst_spread_s: float = 900.0,
    day_s: float = DAY_S,
) -> tuple[Job, ...]:
    """Return jobs in `bursts` bursts at random times of the first 20/24 of a day, the same for the same seed.

    Each burst has 1 to `max_jobs_per_burst` jobs arriving within `burst_spread_s` of its start. Job sizes are
    log-uniform between `min_images` and `max_images`, so most jobs are small and a few hold most images.
    """
    rng = random.Random(seed)
    starts = sorted(rng.uniform(0.0, day_s * 20 / 24) for _ in range(bursts))
    jobs = []
    for burst, start_s in enumerate(starts):
        for _ in range(rng.randint(1, max_jobs_per_burst)):
            images = int(math.exp(rng.uniform(math.log(min_images), math.log(max_images))))
            jobs.append(Job(round(start_s + rng.uniform(0.0, burst_spread_s)), images, burst))
    return tuple(sorted(jobs, key=lambda job: job.arrival_s))


# Simulation state


@dataclass(frozen=True)
class Batch:
    """One task: `images` images of the job with index `job`."""

    job: int
    images: int


@dataclass
class Slot:
    """One pool process's batch and its seconds of work left."""

    batch: Batch
    remaining_s: float


@dataclass
class Pod:
    created_s: float
    ready_s: float
    slots: list[Slot | None]
    reserved: deque[Batch] = field(default_factory=deque)  # reserved but not started
    terminating_since_s: float | None = None


@dataclass
class Totals:
    """Pod-seconds by state, summed over pods."""

    pod_s: float = 0.0
    startup_s: float = 0.0
    busy_s: float = 0.0
    idle_s: float = 0.0
    handed_back: int = 0
    peak_replicas: int = 0
    scale_ups_from_zero: int = 0
    peak_queued: int = 0


@dataclass
class Producer:
    """A job's producer: sends its batches while its Backpressure allows."""

    job: int
    batches_left: int
    backpressure: Backpressure


class Simulation:
    """The fleet, the queue, the producers, KEDA and the HPA, advanced by `step`. Not thread-safe."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.now_s = 0.0
        self.queue: deque[Batch] = deque()  # the Redis list, the next batch to be taken on the left
        self.pods: list[Pod] = []
        self.replicas = scenario.scaler.min_replicas  # KEDA keeps at least this many, from the start
        self.last_active_s: float | None = None
        self.recommendations: list[tuple[float, int]] = []  # (time, replicas) the HPA computed
        self.scale_events: list[tuple[float, int]] = []  # (time, change in replicas) the HPA made
        self.totals = Totals()
        fleet = scenario.fleet
        self.batches_total = [math.ceil(job.images / fleet.batch_size) for job in scenario.jobs]
        self.batches_done = [0] * len(scenario.jobs)
        self.finished_s: list[float | None] = [None] * len(scenario.jobs)
        self.producers: list[Producer] = []
        self.next_job = 0
        self.replica_trace: list[tuple[float, int]] = []
        self.random = random.Random(scenario.seed)

    # Time

    def run(self) -> None:
        """Step until every job is done and the fleet is back at its minimum, or max_simulated_s passes."""
        while not self.done():
            if self.now_s >= self.scenario.max_simulated_s:
                logger.warning("scenario %s stopped at %.0f s with work left", self.scenario.name, self.now_s)
                break
            self.skip_quiet_time()
            self.step()

    def done(self) -> bool:
        """Return whether every job is finished and the fleet is back at minReplicaCount."""
        if self.next_job < len(self.scenario.jobs) or self.producers or self.queue or None in self.finished_s:
            return False
        if self.scenario.scaler.min_replicas == 0:
            return self.quiet()
        return self.replicas == self.scenario.scaler.min_replicas

    def quiet(self) -> bool:
        return not self.queue and not self.pods and not self.producers and self.replicas == 0

    def skip_quiet_time(self) -> None:
        """Jump to the next arrival while nothing runs: no pod, no queued batch, no producer."""
        if self.quiet() and self.next_job < len(self.scenario.jobs):
            self.now_s = max(self.now_s, math.floor(self.scenario.jobs[self.next_job].arrival_s))

    def step(self) -> None:
        self.start_arrivals()
        self.send_batches()
        tick = round(self.now_s)
        if tick % self.scenario.scaler.polling_interval_s == 0:
            self.poll_keda()
        if tick % HPA_SYNC_PERIOD_S == 0 and self.replicas > 0:
            self.sync_hpa()
        self.reconcile_pods()
        self.run_pods()
        self.totals.peak_replicas = max(self.totals.peak_replicas, self.replicas)
        self.now_s += STEP_S

    # Producers

    def start_arrivals(self) -> None:
        jobs = self.scenario.jobs
        while self.next_job < len(jobs) and jobs[self.next_job].arrival_s <= self.now_s:
            fleet = self.scenario.fleet
            backpressure = Backpressure(fleet.queue_high_water, fleet.queue_low_water, fleet.queue_ahead_s, fleet.queue_max_tasks, clock=lambda: self.now_s)
            self.producers.append(Producer(self.next_job, self.batches_total[self.next_job], backpressure))
            self.next_job += 1

    def send_batches(self) -> None:
        """Let the producers send in turn, one batch each per round and up to a step's worth each. Each reads the
        queue's length whenever its Backpressure requires. Taking turns stands for producers that run at once."""
        budget = int(MEASURED_PRODUCER_TASKS_PER_S * STEP_S)
        sent = dict.fromkeys(range(len(self.producers)), 0)
        sending = list(range(len(self.producers)))
        while sending:
            still_sending = []
            for index in sending:
                producer = self.producers[index]
                backpressure = producer.backpressure
                if backpressure.needs_check() and backpressure.should_wait(len(self.queue)):
                    continue
                self.queue.append(self.next_batch(producer))
                backpressure.sent()
                producer.batches_left -= 1
                sent[index] += 1
                if producer.batches_left > 0 and sent[index] < budget:
                    still_sending.append(index)
            sending = still_sending
        self.totals.peak_queued = max(self.totals.peak_queued, len(self.queue))
        self.producers = [producer for producer in self.producers if producer.batches_left > 0]

    # KEDA and the HPA

    def poll_keda(self) -> None:
        """Activate from zero above activationListLength; scale to zero after cooldownPeriod without activity."""
        scaler = self.scenario.scaler
        if len(self.queue) > scaler.activation_list_length:
            self.last_active_s = self.now_s
            if self.replicas == 0:
                self.set_replicas(max(scaler.min_replicas, 1))
                self.totals.scale_ups_from_zero += 1
        elif self.replicas > scaler.min_replicas and scaler.min_replicas == 0:
            if self.last_active_s is None or self.now_s - self.last_active_s >= scaler.cooldown_s:
                self.set_replicas(0)

    def sync_hpa(self) -> None:
        """Run one HPA sync: recommend for the AverageValue target, stabilize, limit by the policies, clamp."""
        scaler = self.scenario.scaler
        queued = len(self.queue)
        recommendation = self.replicas
        if abs(queued / (scaler.list_length * self.replicas) - 1.0) > HPA_TOLERANCE:
            recommendation = math.ceil(queued / scaler.list_length)
        self.recommendations.append((self.now_s, recommendation))
        desired = stabilize(self.recommendations, self.now_s, self.replicas, scaler)
        oldest_kept_s = self.now_s - max(scaler.scale_up.stabilization_window_s, scaler.scale_down.stabilization_window_s)
        self.recommendations = [item for item in self.recommendations if item[0] >= oldest_kept_s]
        desired = limit_rate(desired, self.replicas, self.now_s, self.scale_events, scaler)
        desired = min(max(desired, max(scaler.min_replicas, 1)), scaler.max_replicas)
        if desired != self.replicas:
            self.scale_events.append((self.now_s, desired - self.replicas))
            self.set_replicas(desired)

    def set_replicas(self, replicas: int) -> None:
        self.replicas = replicas
        self.replica_trace.append((self.now_s, replicas))

    # Pods

    def reconcile_pods(self) -> None:
        """Create or terminate pods until the live ones match the replica count.

        Like the ReplicaSet controller, remove pods that are not ready first, then the youngest.
        """
        worker = self.scenario.worker
        live = [pod for pod in self.pods if pod.terminating_since_s is None]
        for _ in range(self.replicas - len(live)):
            ready_s = self.now_s + worker.extra_startup_s + worker.startup_s
            self.pods.append(Pod(self.now_s, ready_s, [None] * self.scenario.fleet.concurrency))
        surplus = len(live) - self.replicas
        if surplus > 0:
            victims = sorted(live, key=lambda pod: (pod.ready_s <= self.now_s, -pod.created_s))[:surplus]
            for pod in victims:
                self.terminate(pod)

    def terminate(self, pod: Pod) -> None:
        """Send SIGTERM: the pod takes no more batches and hands its reserved ones back at once."""
        pod.terminating_since_s = self.now_s
        self.totals.handed_back += len(pod.reserved)
        self.queue.extendleft(reversed(pod.reserved))
        pod.reserved.clear()

    def run_pods(self) -> None:
        kept = []
        for pod in self.pods:
            if self.run_pod(pod):
                kept.append(pod)
        self.pods = kept

    def run_pod(self, pod: Pod) -> bool:
        """Advance one pod by a step and add its time to the totals. Return whether it is still alive."""
        step_end_s = self.now_s + STEP_S
        if pod.terminating_since_s is not None:
            return self.run_terminating_pod(pod, step_end_s)
        start_s = max(self.now_s, pod.created_s)
        ready_from_s = min(max(pod.ready_s, start_s), step_end_s)
        self.totals.pod_s += step_end_s - start_s
        self.totals.startup_s += ready_from_s - start_s
        busy_s = self.work(pod, ready_from_s, step_end_s, take=True)
        self.totals.busy_s += busy_s
        self.totals.idle_s += step_end_s - ready_from_s - busy_s
        return True

    def run_terminating_pod(self, pod: Pod, step_end_s: float) -> bool:
        """Finish running batches until the shutdown grace ends, then hand the rest back and exit."""
        if pod.ready_s > self.now_s:  # still starting: it exits at once
            return False
        grace_end_s = pod.terminating_since_s + self.scenario.fleet.shutdown_grace_s
        busy_s = self.work(pod, self.now_s, min(step_end_s, grace_end_s), take=False)
        self.totals.pod_s += busy_s
        self.totals.busy_s += busy_s
        running = [slot for slot in pod.slots if slot is not None]
        if running and step_end_s >= grace_end_s:
            self.totals.handed_back += len(running)
            self.queue.extendleft(slot.batch for slot in running)
            return False
        return bool(running)

    def work(self, pod: Pod, start_s: float, end_s: float, take: bool) -> float:
        """Run each pool process from `start_s` to `end_s`, taking new batches when `take`. Return the seconds in
        which the pod had at least one batch, taken as the longest time that any one process had one."""
        available_s = end_s - start_s
        if available_s <= 0:
            return 0.0
        busy_s = 0.0
        for index, slot in enumerate(pod.slots):
            if slot is not None and slot.remaining_s > available_s:  # the common case, kept fast
                slot.remaining_s -= available_s
                busy_s = available_s
            else:
                busy_s = max(busy_s, self.work_slot(pod, index, start_s, available_s, take))
        if take:
            self.reserve(pod)
        return busy_s

    def work_slot(self, pod: Pod, index: int, start_s: float, available_s: float, take: bool) -> float:
        occupied_s = 0.0
        while available_s - occupied_s > 1e-9:
            slot = pod.slots[index]
            if slot is None:
                batch = self.take_batch(pod) if take else None
                if batch is None:
                    break
                slot = pod.slots[index] = Slot(batch, self.batch_seconds(batch))
            used_s = min(available_s - occupied_s, slot.remaining_s)
            slot.remaining_s -= used_s
            occupied_s += used_s
            if slot.remaining_s <= 1e-9:
                pod.slots[index] = None
                self.finish_batch(slot.batch.job, start_s + occupied_s)
        return occupied_s

    def take_batch(self, pod: Pod) -> Batch | None:
        if pod.reserved:
            return pod.reserved.popleft()
        return self.queue.popleft() if self.queue else None

    def reserve(self, pod: Pod) -> None:
        """Start a batch on each free pool process, then reserve more up to concurrency × prefetch multiplier.

        Celery counts running batches in its prefetch limit, because with acks_late they are unacknowledged.
        """
        fleet = self.scenario.fleet
        running = 0
        for index, slot in enumerate(pod.slots):
            if slot is None:
                batch = self.take_batch(pod)
                if batch is None:
                    continue
                pod.slots[index] = Slot(batch, self.batch_seconds(batch))
            running += 1
        while self.queue and running + len(pod.reserved) < fleet.concurrency * fleet.prefetch_multiplier:
            pod.reserved.append(self.queue.popleft())

    def next_batch(self, producer: Producer) -> Batch:
        """Return the producer's next batch: batch_size images, the rest of the job for the last one."""
        batch_size = self.scenario.fleet.batch_size
        sent = self.batches_total[producer.job] - producer.batches_left
        return Batch(producer.job, min(batch_size, self.scenario.jobs[producer.job].images - sent * batch_size))

    def batch_seconds(self, batch: Batch) -> float:
        """Seconds one pool process needs for a batch: each process runs at 1/concurrency of the worker's rate."""
        mean_s = batch.images * self.scenario.fleet.concurrency / self.scenario.worker.images_per_s
        jitter = self.scenario.batch_time_jitter
        return mean_s * self.random.uniform(1 - jitter, 1 + jitter) if jitter else mean_s

    def finish_batch(self, job: int, at_s: float) -> None:
        self.batches_done[job] += 1
        if self.batches_done[job] == self.batches_total[job]:
            self.finished_s[job] = at_s


def stabilize(recommendations: list[tuple[float, int]], now_s: float, current: int, scaler: ScalerSettings) -> int:
    """Return the stabilized replica count as the HPA does: scale up to the lowest recommendation of the scale-up
    window, down to the highest of the scale-down window, and otherwise keep `current`."""
    up_from_s = now_s - scaler.scale_up.stabilization_window_s
    down_from_s = now_s - scaler.scale_down.stabilization_window_s
    up = min(replicas for at_s, replicas in recommendations if at_s >= up_from_s)
    down = max(replicas for at_s, replicas in recommendations if at_s >= down_from_s)
    desired = current
    if desired < up:
        desired = up
    if desired > down:
        desired = down
    return desired


def limit_rate(desired: int, current: int, now_s: float, events: list[tuple[float, int]], scaler: ScalerSettings) -> int:
    """Apply the HPA's scaling policies to a change from `current` to `desired` replicas."""
    if desired > current:
        limit = _policy_limit(current, now_s, events, scaler.scale_up, up=True)
        return min(desired, limit)
    if desired < current:
        limit = _policy_limit(current, now_s, events, scaler.scale_down, up=False)
        return max(desired, limit)
    return desired


def _policy_limit(current: int, now_s: float, events: list[tuple[float, int]], rules: ScalingRules, up: bool) -> int:
    if rules.select_policy == "Disabled":
        return current
    limits = []
    for policy in rules.policies:
        changed = sum(change for at_s, change in events if at_s > now_s - policy.period_s and (change > 0) == up)
        period_start = current - changed  # for scale-down `changed` is negative
        if policy.kind == "Pods":
            limits.append(period_start + policy.value if up else period_start - policy.value)
        elif up:
            limits.append(math.ceil(period_start * (1 + policy.value / 100)))
        else:
            limits.append(int(period_start * (1 - policy.value / 100)))
    # "Max" selects the policy that allows the largest change.
    largest_change = rules.select_policy == "Max"
    return (max if up == largest_change else min)(limits)


# Results


def simulate(scenario: Scenario) -> dict[str, Any]:
    """Run a scenario and return its report: worker-minutes by state, idle share, drain times, replicas."""
    simulation = Simulation(scenario)
    simulation.run()
    return summarize(simulation)


def summarize(simulation: Simulation) -> dict[str, Any]:
    scenario = simulation.scenario
    totals = simulation.totals
    ready_s = totals.busy_s + totals.idle_s
    unfinished = [index for index, finished in enumerate(simulation.finished_s) if finished is None]
    return {
        "scenario": scenario.name,
        "images": sum(job.images for job in scenario.jobs),
        "jobs": len(scenario.jobs),
        "worker_images_per_s": scenario.worker.images_per_s,
        "startup_s": scenario.worker.startup_s + scenario.worker.extra_startup_s,
        "drain_s": _drain_seconds(scenario.jobs, simulation.finished_s),
        "burst_drain_s": _burst_drain_seconds(scenario.jobs, simulation.finished_s),
        "worker_minutes": totals.pod_s / 60,
        "busy_minutes": totals.busy_s / 60,
        "idle_minutes": totals.idle_s / 60,
        "startup_minutes": totals.startup_s / 60,
        "idle_share": totals.idle_s / ready_s if ready_s else 0.0,
        "peak_replicas": totals.peak_replicas,
        "scale_ups_from_zero": totals.scale_ups_from_zero,
        "handed_back_batches": totals.handed_back,
        "peak_queued_batches": totals.peak_queued,
        "unfinished_jobs": len(unfinished),
        "end_s": simulation.now_s,
    }


def _drain_seconds(jobs: Iterable[Job], finished_s: list[float | None]) -> float | None:
    jobs = list(jobs)
    if not jobs or any(finished is None for finished in finished_s):
        return None
    return max(finished_s) - min(job.arrival_s for job in jobs)  # type: ignore[type-var]


def _burst_drain_seconds(jobs: tuple[Job, ...], finished_s: list[float | None]) -> list[float | None]:
    """Seconds from each burst's first arrival to its last batch's end, None for a burst with unfinished jobs."""
    drains = []
    for burst in sorted({job.burst for job in jobs}):
        indexes = [index for index, job in enumerate(jobs) if job.burst == burst]
        ends = [finished_s[index] for index in indexes]
        first_s = min(jobs[index].arrival_s for index in indexes)
        drains.append(None if None in ends else max(ends) - first_s)  # type: ignore[type-var]
    return drains


# Scenarios


def default_worker(extra_startup_s: float = ASSUMED_EXTRA_STARTUP_S, images_per_s: float = MEASURED_CPU_IMAGES_PER_S) -> WorkerModel:
    return WorkerModel(images_per_s, MEASURED_STARTUP_S, extra_startup_s)


def default_scenario(ops_dir: Path = OPS_DIR, seed: int = 1) -> Scenario:
    """Return the documented default scenario: the ops/ settings, the measured CPU worker, 60 s of extra
    start-up, the bursty day, and batch times within ±DEFAULT_BATCH_TIME_JITTER of their mean."""
    return Scenario(
        "default", read_scaler_settings(ops_dir), read_fleet_settings(ops_dir), default_worker(), bursty_workload(seed),
        batch_time_jitter=DEFAULT_BATCH_TIME_JITTER, seed=seed,
    )


def all_scenarios(ops_dir: Path = OPS_DIR, seed: int = 1) -> list[Scenario]:
    """Return the default scenario, the extra start-up sensitivity and the unmeasured GPU-like worker."""
    base = default_scenario(ops_dir, seed)
    scenarios = [base]
    for extra_s in EXTRA_STARTUP_SENSITIVITY_S:
        if extra_s != ASSUMED_EXTRA_STARTUP_S:
            scenarios.append(dataclasses.replace(base, name=f"extra start-up {extra_s:.0f} s", worker=default_worker(extra_s)))
    gpu_worker = default_worker(images_per_s=ASSUMED_GPU_IMAGES_PER_S)
    scenarios.append(dataclasses.replace(base, name=f"GPU-like {ASSUMED_GPU_IMAGES_PER_S:.0f} images/s (unmeasured)", worker=gpu_worker))
    return scenarios


def format_table(reports: list[dict[str, Any]]) -> str:
    """Return the reports as a Markdown table, one row per scenario."""
    header = (
        "| scenario | time to drain | worker-min | busy | idle | start-up | idle share | peak replicas | handed back |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = [header]
    for report in reports:
        drain = f"{report['drain_s'] / 3600:.2f} h" if report["drain_s"] is not None else "not drained"
        rows.append(
            f"| {report['scenario']} | {drain} | {report['worker_minutes']:.0f} | {report['busy_minutes']:.0f} "
            f"| {report['idle_minutes']:.0f} | {report['startup_minutes']:.0f} | {100 * report['idle_share']:.1f}% "
            f"| {report['peak_replicas']} | {report['handed_back_batches']} |"
        )
    return "\n".join(rows)


def format_bursts(scenario: Scenario, report: dict[str, Any]) -> str:
    """Return a Markdown table of each burst's jobs, images and time to drain."""
    rows = ["| burst | first arrival | jobs | images | time to drain |", "| --- | --- | --- | --- | --- |"]
    for burst, drain_s in enumerate(report["burst_drain_s"]):
        jobs = [job for job in scenario.jobs if job.burst == burst]
        first_s = min(job.arrival_s for job in jobs)
        drain = f"{drain_s / 60:.1f} min" if drain_s is not None else "not drained"
        rows.append(
            f"| {burst} | {time.strftime('%H:%M', time.gmtime(first_s))} | {len(jobs)} | {sum(job.images for job in jobs):,} | {drain} |"
        )
    return "\n".join(rows)


# Start-up measurement


def measure_startup(concurrency: int, repeats: int, model_dir: Path | None = None) -> list[dict[str, float]]:
    """Start `python -m producer.cli worker` `repeats` times and time each start to /readyz returning 200.

    Builds the ViT-B/32-sized random checkpoint unless `model_dir` is given, and runs a private
    redis-server on 127.0.0.1. Each result has `ready_s` and the worker's own `model_load_s`.
    Raises TimeoutError when a worker is not ready within STARTUP_TIMEOUT_S.
    """
    from benchmarks import _model
    from tests.support.servers import RedisServer

    with tempfile.TemporaryDirectory(prefix="clipfleet-startup-") as temporary:
        directory = Path(temporary)
        if model_dir is None:
            model_dir = _model.build_vit_b32(directory / "vit-b32")
        with RedisServer() as redis_server:
            return [_time_one_start(directory, redis_server.url, model_dir, concurrency, attempt) for attempt in range(repeats)]


def _time_one_start(directory: Path, redis_url: str, model_dir: Path, concurrency: int, attempt: int) -> dict[str, float]:
    from benchmarks import _stack
    from producer.embedded import ManagedProcess, free_port

    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLIPFLEET_")}
    env.update(CLIPFLEET_REDIS_URL=redis_url, CLIPFLEET_MODEL=str(model_dir), CLIPFLEET_DEVICE="cpu", CLIPFLEET_METRICS_PORT=str(port))
    argv = [sys.executable, "-m", "producer.cli", "worker", "--concurrency", str(concurrency)]
    started = time.monotonic()
    worker = ManagedProcess(f"startup-{attempt}", argv, directory / f"worker-{attempt}.log", env)
    try:
        ready_s = _wait_ready(worker, f"http://127.0.0.1:{port}/readyz", started)
        load_s = _stack.model_load_s(worker.log_path.read_text(errors="replace"))
    finally:
        worker.stop()
    return {"ready_s": ready_s, "model_load_s": load_s if load_s is not None else float("nan")}


def _wait_ready(worker: Any, url: str, started: float) -> float:
    while time.monotonic() - started < STARTUP_TIMEOUT_S:
        if not worker.running():
            raise RuntimeError(f"worker exited with code {worker.process.returncode} while starting:\n{worker.log_tail(40)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 until the model is loaded
        time.sleep(READY_POLL_S)
    raise TimeoutError(f"worker not ready at {url} within {STARTUP_TIMEOUT_S} s:\n{worker.log_tail(40)}")


# Command line


def non_negative_int(text: str) -> int:
    """Parse an integer argument >= 0; argparse reports the ValueError with the option's name."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


non_negative_int.__name__ = "non-negative integer"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops-dir", type=Path, default=OPS_DIR, help="folder with k8s/scaledobject.yaml and the other manifests (default: ops/)")
    # Negative seeds are rejected because random.Random seeds with the absolute value, so -1 gives seed 1's day.
    parser.add_argument("--seed", type=non_negative_int, default=1, help="seed of the bursty workload, an integer >= 0 (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON instead of tables")
    parser.add_argument("--measure-startup", action="store_true", help="time real worker starts instead of simulating")
    parser.add_argument("--concurrency", type=positive_int, help="pool processes of the measured worker (default: the Deployment's)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="worker starts to time (default: 3)")
    parser.add_argument("--model-dir", type=Path, help="checkpoint for --measure-startup (default: build a ViT-B/32-sized one)")
    return parser.parse_args(argv)


def check_ops_dir(ops_dir: Path) -> None:
    """Raise ManifestError when `ops_dir` is not a directory."""
    if not ops_dir.is_dir():
        raise ManifestError(
            f"--ops-dir {ops_dir} is not a directory: pass a copy of the repository's ops/ folder "
            f"(with k8s/scaledobject.yaml, k8s/worker-deployment.yaml and k8s/configmap.yaml), or leave it out to read {OPS_DIR}"
        )


class ModelDirError(ValueError):
    """A --model-dir that is not a checkpoint directory."""


def check_model_dir(model_dir: Path) -> None:
    """Raise ModelDirError when `model_dir` is not a directory with a config.json, so no worker starts on it."""
    if not model_dir.is_dir():
        raise ModelDirError(
            f"--model-dir {model_dir} is not a directory: pass a CLIP checkpoint directory saved with save_pretrained, "
            "or leave --model-dir out to build a ViT-B/32-sized one"
        )
    if not (model_dir / "config.json").is_file():
        raise ModelDirError(
            f"--model-dir {model_dir} has no config.json: pass a CLIP checkpoint directory saved with save_pretrained, "
            "or leave --model-dir out to build a ViT-B/32-sized one"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Returns 0, or 2 after printing `error: ...` for an invalid --ops-dir, manifest or --model-dir."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    try:
        check_ops_dir(args.ops_dir)
        if args.model_dir is not None:
            check_model_dir(args.model_dir)
        return _run(args)
    except (ManifestError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.measure_startup:
        concurrency = args.concurrency or read_worker_concurrency(args.ops_dir)
        results = measure_startup(concurrency, args.repeats, args.model_dir)
        print(json.dumps({"concurrency": concurrency, "starts": results}, indent=2) if args.json else _format_starts(concurrency, results))
        return 0
    scenarios = all_scenarios(args.ops_dir, args.seed)
    reports = [simulate(scenario) for scenario in scenarios]
    if args.json:
        print(json.dumps({"settings": _settings_summary(scenarios[0]), "reports": reports}, indent=2))
        return 0
    print(_format_settings(scenarios[0]))
    print()
    print(format_table(reports))
    print()
    print(f"Bursts of the {scenarios[0].name} scenario:")
    print(format_bursts(scenarios[0], reports[0]))
    return 0


def _settings_summary(scenario: Scenario) -> dict[str, Any]:
    return {"scaler": dataclasses.asdict(scenario.scaler), "fleet": dataclasses.asdict(scenario.fleet), "worker": dataclasses.asdict(scenario.worker)}


def _format_settings(scenario: Scenario) -> str:
    scaler, fleet, worker = scenario.scaler, scenario.fleet, scenario.worker
    return (
        f"KEDA: pollingInterval {scaler.polling_interval_s} s, cooldownPeriod {scaler.cooldown_s} s, replicas "
        f"{scaler.min_replicas}-{scaler.max_replicas}, listLength {scaler.list_length}, activationListLength "
        f"{scaler.activation_list_length}; HPA scale-down window {scaler.scale_down.stabilization_window_s} s\n"
        f"Worker: concurrency {fleet.concurrency}, prefetch multiplier {fleet.prefetch_multiplier}, shutdown grace "
        f"{fleet.shutdown_grace_s:.0f} s, {worker.images_per_s:g} images/s, start-up {worker.startup_s:g} s + "
        f"{worker.extra_startup_s:g} s assumed for scheduling and the image pull\n"
        f"Producer: {fleet.batch_size} images per batch, queue ahead {fleet.queue_ahead_s:g} s, at most "
        f"{fleet.queue_max_tasks} tasks; workload: {len(scenario.jobs)} jobs, {sum(job.images for job in scenario.jobs):,} images"
    )


def _format_starts(concurrency: int, results: list[dict[str, float]]) -> str:
    lines = [f"worker --concurrency {concurrency}: seconds from start to /readyz 200 (model load in the worker's log)"]
    lines += [f"  start {index + 1}: {result['ready_s']:.1f} s (model load {result['model_load_s']:.1f} s)" for index, result in enumerate(results)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
