"""Offline checks of the Grafana dashboard, the Prometheus alert rules and ops/README.md.

Every PromQL expression is parsed with promql-parser (Python bindings of the Rust promql-parser crate). It
may name only series that the workers expose, collected from `workers.metrics.WorkerMetrics` and
`workers.health.WorkerStateCollector`, or the external series in EXTERNAL_METRICS, and only labels that
those series carry. ops/README.md's table of values quoted from the manifests is compared with the YAML
files and with the product's own time limits. Nothing here starts Prometheus or Grafana.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from producer.settings import Settings
from workers.app import COLD_SHUTDOWN_LIMIT_S, delivery_limits
from workers.health import WorkerState, WorkerStateCollector
from workers.metrics import WorkerMetrics

REPO_ROOT = Path(__file__).resolve().parent.parent
OPS_DIR = REPO_ROOT / "ops"
K8S_DIR = OPS_DIR / "k8s"
DASHBOARD_PATH = OPS_DIR / "grafana" / "clipfleet-workers.json"
ALERTS_PATH = OPS_DIR / "prometheus" / "alerts.yaml"
OPS_README_PATH = OPS_DIR / "README.md"

# Series from outside the workers, with the label names each carries and where it comes from. The workers
# cannot serve the queue's length, because KEDA scales them to zero.
EXTERNAL_METRICS = {
    # oliver006/redis_exporter started with --check-single-keys (REDIS_EXPORTER_CHECK_SINGLE_KEYS): the LLEN
    # of the queue list, 0 when the list does not exist. Registered in its exporter/keys.go.
    "redis_key_size": {"db", "key"},
    # The KEDA operator's /metrics on port 8080: the value the ScaledObject's scaler last read. Registered in
    # KEDA 2's pkg/metricscollector/prommetrics.go.
    "keda_scaler_metrics_value": {"namespace", "metric", "scaledObject", "scaler", "triggerIndex", "type"},
}
# Labels that Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Grafana variables in the dashboard's expressions, replaced by a value of the same kind before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$queue": "clipfleet"}
SEVERITIES = {"critical", "warning"}
# Grafana migrates a dashboard with an older schemaVersion when it loads it, so this only rejects stale exports.
MIN_SCHEMA_VERSION = 39
GRID_WIDTH = 24
QUOTED_VALUES_HEADING = "Values quoted from the manifests"


# The series that the workers expose


def expose_series(name: str, kind: str, labels: set[str]) -> dict[str, set[str]]:
    """Return the series names of one metric in the text exposition format, each with its label names."""
    if kind == "counter":
        return {f"{name}_total": labels, f"{name}_created": labels}
    if kind == "histogram":
        return {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels, f"{name}_created": labels}
    if kind == "gauge":
        return {name: labels}
    raise ValueError(f"metric {name} has type {kind!r}, which this test does not expand; add it to expose_series")


def worker_metric_series() -> dict[str, set[str]]:
    """Return the series of `WorkerMetrics`, read from the metric objects it creates.

    Labelled metrics without a child have no samples yet, so the label names come from prometheus_client's
    `_labelnames` and the type from `_type`.
    """
    metrics = WorkerMetrics(CollectorRegistry())
    series: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            series.update(expose_series(metric._name, metric._type, set(metric._labelnames)))
    return series


def worker_state_series(folder: Path) -> dict[str, set[str]]:
    """Return the series of `WorkerStateCollector`, from one collection with an empty metrics folder."""
    state = WorkerState(folder, Settings())
    series: dict[str, set[str]] = {}
    for family in WorkerStateCollector(state).collect():
        labels = {name for sample in family.samples for name in sample.labels}
        series.update(expose_series(family.name, family.type, labels))
    return series


@pytest.fixture(scope="module")
def known_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    series = worker_metric_series()
    series.update(worker_state_series(tmp_path_factory.mktemp("metrics")))
    series.update(EXTERNAL_METRICS)
    return series


# PromQL analysis


@dataclass
class References:
    """The metric names and label names that one PromQL expression uses."""

    selectors: list[tuple[str | None, set[str]]] = field(default_factory=list)  # (metric name, matcher labels)
    grouping_labels: set[str] = field(default_factory=set)  # by, without, on, ignoring, group_left, group_right


def substitute_grafana_variables(expression: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace("${" + variable[1:] + "}", value).replace(variable, value)
    return expression


def collect_references(expression: str) -> References:
    """Parse `expression` and return what it references. Raises ValueError when it does not parse."""
    references = References()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = list(node.matchers.matchers) + [m for group in node.matchers.or_matchers for m in group]
            references.selectors.append((node.name, {matcher.name for matcher in matchers}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            references.grouping_labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                references.grouping_labels.update(node.modifier.matching.labels)
            references.grouping_labels.update(node.modifier.group_labels or [])

    promql_parser.walk(promql_parser.parse(substitute_grafana_variables(expression)), visit)
    return references


def expression_problems(expression: str, known: dict[str, set[str]]) -> list[str]:
    """Return what is wrong with `expression`: a syntax error, an unknown metric, or a label it lacks."""
    try:
        references = collect_references(expression)
    except ValueError as e:
        return [f"does not parse: {e}"]
    problems = []
    used_labels = set(TARGET_LABELS)
    for name, matcher_labels in references.selectors:
        if name is None or name not in known:
            problems.append(f"metric {name!r} is neither served by the workers nor in EXTERNAL_METRICS")
            continue
        used_labels |= known[name]
        for label in sorted(matcher_labels - known[name] - TARGET_LABELS):
            problems.append(f"label {label!r} is not a label of {name} (it has {sorted(known[name])})")
    for label in sorted(references.grouping_labels - used_labels):
        problems.append(f"grouping label {label!r} is on none of the metrics in the expression")
    return problems


# The dashboard


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the dashboard's panels, rows included, with the panels of collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{panel['title']} {target['refId']}", target) for panel in data_panels(load_dashboard()) for target in panel["targets"]]


def template_variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    variables = [variable for variable in dashboard["templating"]["list"] if variable["name"] == name]
    assert len(variables) == 1, f"the dashboard has {len(variables)} template variables named {name!r}, expected 1"
    return variables[0]


def test_dashboard_identity():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "clipfleet-workers"
    assert dashboard["title"] == "clipfleet workers"
    assert dashboard["schemaVersion"] >= MIN_SCHEMA_VERSION


def test_dashboard_panel_ids_unique():
    ids = [panel["id"] for panel in all_panels(load_dashboard())]
    assert len(ids) == len(set(ids)), f"repeated panel ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}"


def test_dashboard_panel_titles_unique():
    titles = [panel["title"] for panel in all_panels(load_dashboard())]
    assert len(titles) == len(set(titles)), f"repeated titles: {sorted(t for t in set(titles) if titles.count(t) > 1)}"


def test_dashboard_panels_have_descriptions():
    missing = [panel["title"] for panel in data_panels(load_dashboard()) if not panel.get("description")]
    assert missing == []


def test_dashboard_panels_inside_grid():
    outside = [panel["title"] for panel in all_panels(load_dashboard()) if panel["gridPos"]["x"] + panel["gridPos"]["w"] > GRID_WIDTH]
    assert outside == []


def test_dashboard_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    overlaps = []
    for panel in all_panels(load_dashboard()):
        grid = panel["gridPos"]
        for row in range(grid["y"], grid["y"] + grid["h"]):
            for column in range(grid["x"], grid["x"] + grid["w"]):
                if (row, column) in cells:
                    overlaps.append((cells[(row, column)], panel["title"]))
                cells[(row, column)] = panel["title"]
    assert sorted(set(overlaps)) == []


def test_dashboard_datasource_variable():
    variable = template_variable(load_dashboard(), "datasource")
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"


def test_dashboard_queue_variable_is_configmap_queue():
    variable = template_variable(load_dashboard(), "queue")
    assert variable["query"] == config_data()["CLIPFLEET_QUEUE"]


def test_dashboard_panels_use_datasource_variable():
    for panel in data_panels(load_dashboard()):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], f"{panel['title']} {target['refId']}"


def test_dashboard_names_no_other_uid():
    # A data source uid from one Grafana would break the import into another.
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD_PATH.read_text(encoding="utf-8")))
    assert uids == {"${datasource}", "clipfleet-workers"}


@pytest.mark.parametrize(("target_id", "target"), dashboard_targets(), ids=[name for name, _ in dashboard_targets()])
def test_dashboard_expression_valid(target_id, target, known_series):
    assert expression_problems(target["expr"], known_series) == []


def test_dashboard_reads_queue_length():
    expressions = " ".join(target["expr"] for _, target in dashboard_targets())
    assert 'redis_key_size{key="$queue"}' in expressions


# The alert rules


def load_alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS_PATH.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_rule(name: str) -> dict[str, Any]:
    rules = [rule for rule in load_alert_rules() if rule.get("alert") == name]
    assert len(rules) == 1, f"{len(rules)} rules named {name}, expected 1"
    return rules[0]


ALERT_NAMES = [rule["alert"] for rule in load_alert_rules()]


def test_alert_groups_named():
    document = yaml.safe_load(ALERTS_PATH.read_text(encoding="utf-8"))
    assert [group["name"] for group in document["groups"]] == ["clipfleet-workers"]


def test_alert_names_unique():
    assert len(ALERT_NAMES) == len(set(ALERT_NAMES))


def test_required_alerts_present():
    assert {"ClipfleetNoWorkers", "ClipfleetImageFailureRate", "ClipfleetQueueWaitHigh"} <= set(ALERT_NAMES)


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_rule_fields(name):
    rule = alert_rule(name)
    assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
    assert rule["labels"]["severity"] in SEVERITIES
    assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
    assert rule["annotations"]["summary"].strip()
    assert rule["annotations"]["description"].strip()


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_for_is_duration(name):
    duration = alert_rule(name)["for"]
    assert re.fullmatch(r"\d+[smh]", duration), f"for: {duration!r} is not a duration such as 15m"
    assert promql_parser.parse_duration(duration).total_seconds() > 0


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_expression_valid(name, known_series):
    assert expression_problems(alert_rule(name)["expr"], known_series) == []


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_runbook_is_readme_heading(name):
    path, _, anchor = alert_rule(name)["annotations"]["runbook_url"].partition("#")
    assert path == "ops/README.md"
    assert anchor in heading_anchors(OPS_README_PATH.read_text(encoding="utf-8"))


def test_alerts_read_configmap_queue():
    queue = config_data()["CLIPFLEET_QUEUE"]
    keys = re.findall(r'redis_key_size\{key="([^"]*)"\}', ALERTS_PATH.read_text(encoding="utf-8"))
    assert keys != []
    assert set(keys) == {queue}


def test_slow_batch_threshold_is_product_warning():
    expression = promql_parser.parse(alert_rule("ClipfleetSlowBatches")["expr"])
    limits = delivery_limits(Settings(visibility_timeout_s=int(config_data()["CLIPFLEET_VISIBILITY_TIMEOUT_S"])))
    assert isinstance(expression.rhs, promql_parser.NumberLiteral)
    assert expression.rhs.val == limits.slow_batch_s


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_listed_in_readme_table(name):
    rows = {row[0]: row for row in markdown_table_rows(OPS_README_PATH.read_text(encoding="utf-8"), "Alerts")}
    rule = alert_rule(name)
    row = rows.get(f"`{name}`")
    assert row is not None, f"{name} is missing from the table under 'Alerts' in ops/README.md"
    assert row[1] == rule["labels"]["severity"]
    assert row[3] == rule["for"]


# The checker itself


@pytest.mark.parametrize(
    "expression",
    [
        "sum(rate(clipfleet_images_total[5m])",  # syntax
        "rate(clipfleet_images[5m])",  # a counter without its _total suffix is not exposed
        "rate(clipfleet_unknown_total[5m])",
        'sum(rate(clipfleet_images_total{code="not_found"}[5m]))',  # code is a label of images_failed
        "sum by (pod) (clipfleet_worker_ready)",  # no such label without relabelling
        "sum by (le) (rate(clipfleet_batch_duration_seconds_count[5m]))",  # le is on _bucket only
        "clipfleet_worker_ready unless on (queue) clipfleet_device_memory_allocated_bytes",
        "rate(clipfleet_images_total[$__interval])",  # a Grafana variable without a substitute
    ],
)
def test_checker_rejects(expression, known_series):
    assert expression_problems(expression, known_series) != []


def test_checker_accepts_info_join(known_series):
    expression = "sum by (queue) (clipfleet_worker_ready * on (instance) group_left (queue) clipfleet_worker_info)"
    assert expression_problems(expression, known_series) == []


def test_worker_series_include_queue_wait(known_series):
    assert known_series["clipfleet_batch_queue_wait_seconds_bucket"] == {"le"}


def test_worker_series_include_info_labels(known_series):
    assert known_series["clipfleet_worker_info"] == {"version", "model", "device", "queue"}


# ops/README.md against the manifests


def load_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / name).read_text(encoding="utf-8"))


def config_data() -> dict[str, str]:
    return load_yaml("configmap.yaml")["data"]


def format_number(value: float | int | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quoted_values() -> dict[str, str]:
    """Return the values that ops/README.md quotes, keyed by the first cell of its table row."""
    pod_spec = load_yaml("worker-deployment.yaml")["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    arguments = container["args"]
    resources = container["resources"]
    scaled_object = load_yaml("scaledobject.yaml")["spec"]
    trigger = scaled_object["triggers"][0]["metadata"]
    config = config_data()
    limits = delivery_limits(Settings(visibility_timeout_s=int(config["CLIPFLEET_VISIBILITY_TIMEOUT_S"])))
    values = {
        "`--concurrency`": arguments[arguments.index("--concurrency") + 1],
        "`nvidia.com/gpu` limit": resources["limits"]["nvidia.com/gpu"],
        "CPU request": resources["requests"]["cpu"],
        "memory request": resources["requests"]["memory"],
        "memory limit": resources["limits"]["memory"],
        "`terminationGracePeriodSeconds`": pod_spec["terminationGracePeriodSeconds"],
        "`CLIPFLEET_SHUTDOWN_GRACE_S`": config["CLIPFLEET_SHUTDOWN_GRACE_S"],
        "`CLIPFLEET_VISIBILITY_TIMEOUT_S`": config["CLIPFLEET_VISIBILITY_TIMEOUT_S"],
        "`CLIPFLEET_QUEUE`": config["CLIPFLEET_QUEUE"],
        "`listLength`": trigger["listLength"],
        "`activationListLength`": trigger["activationListLength"],
        "`stabilizationWindowSeconds` (HPA scale-down)": scaled_object["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
            "scaleDown"
        ]["stabilizationWindowSeconds"],
        "soft time limit": limits.soft_time_limit_s,
        "hard time limit": limits.hard_time_limit_s,
        "slow-batch warning": limits.slow_batch_s,
        "cold shutdown limit": COLD_SHUTDOWN_LIMIT_S,
    }
    for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        values[f"`{key}`"] = scaled_object[key]
    return {key: format_number(value) for key, value in values.items()}


def heading_anchors(markdown: str) -> set[str]:
    """Return the anchors that GitHub derives from the Markdown headings: lower case, punctuation dropped, spaces as '-'."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def markdown_table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Return the cells of the first table after `heading`, without its header and separator rows."""
    match = re.search(rf"^#+ {re.escape(heading)}$", markdown, flags=re.MULTILINE)
    assert match is not None, f"heading {heading!r} not found"
    rows = []
    for line in markdown[match.end():].lstrip("\n").splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[2:]


def table_problems(markdown: str, expected: dict[str, str]) -> list[str]:
    """Return each quoted value that is missing from the README's table or differs from the manifests."""
    table = {row[0]: row[-1] for row in markdown_table_rows(markdown, QUOTED_VALUES_HEADING)}
    problems = []
    for key, value in expected.items():
        if table.get(key) != value:
            problems.append(f"{key}: README has {table.get(key)!r}, the manifests {value!r}")
    return problems


# Settings that the README's prose quotes as "NAME 60", "NAME (60 s)", "NAME of 60" or "NAME: 60".
PROSE_SETTINGS = (
    "--concurrency", "nvidia.com/gpu", "terminationGracePeriodSeconds", "CLIPFLEET_SHUTDOWN_GRACE_S",
    "CLIPFLEET_VISIBILITY_TIMEOUT_S", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
    "listLength", "activationListLength", "stabilizationWindowSeconds",
)


def prose_problems(markdown: str, expected: dict[str, str]) -> list[str]:
    """Return each number written right after a setting's name in the README that differs from the manifests."""
    problems = []
    for name in PROSE_SETTINGS:
        value = next((value for key, value in expected.items() if key.startswith(f"`{name}`")), None)
        if value is None:
            problems.append(f"{name} has no expected value in quoted_values()")
            continue
        pattern = rf"(?<![\w-]){re.escape(name)}`?(?::| of| is| =)?\s+\(?(\d[\d,]*)\b"
        for found in re.findall(pattern, markdown):
            if found.replace(",", "") != value:
                problems.append(f"{name} is quoted as {found}, the manifests have {value}")
    return problems


def test_readme_table_matches_manifests():
    assert table_problems(OPS_README_PATH.read_text(encoding="utf-8"), quoted_values()) == []


def test_readme_prose_matches_manifests():
    assert prose_problems(OPS_README_PATH.read_text(encoding="utf-8"), quoted_values()) == []


def test_readme_quotes_each_prose_setting():
    markdown = OPS_README_PATH.read_text(encoding="utf-8")
    unquoted = [name for name in PROSE_SETTINGS if not re.search(rf"(?<![\w-]){re.escape(name)}`?(?::| of| is| =)?\s+\(?\d", markdown)]
    assert unquoted == []


def test_table_check_catches_changed_value():
    markdown = OPS_README_PATH.read_text(encoding="utf-8").replace("| `listLength` | `k8s/scaledobject.yaml` | 50 |", "| `listLength` | `k8s/scaledobject.yaml` | 40 |")
    assert table_problems(markdown, quoted_values()) == ["`listLength`: README has '40', the manifests '50'"]


def test_prose_check_catches_changed_value():
    markdown = OPS_README_PATH.read_text(encoding="utf-8") + "\nKEDA waits for `cooldownPeriod` (600 s).\n"
    assert prose_problems(markdown, quoted_values()) == ["cooldownPeriod is quoted as 600, the manifests have 900"]


def test_readme_internal_links_resolve():
    markdown = OPS_README_PATH.read_text(encoding="utf-8")
    anchors = heading_anchors(markdown)
    missing = [link for link in re.findall(r"\]\(#([^)]+)\)", markdown) if link not in anchors]
    assert missing == []


def test_readme_relative_links_exist():
    markdown = OPS_README_PATH.read_text(encoding="utf-8")
    links = [link.partition("#")[0] for link in re.findall(r"\]\((?!#|https?:)([^)]+)\)", markdown)]
    missing = [link for link in links if not (OPS_DIR / link).exists()]
    assert missing == []
