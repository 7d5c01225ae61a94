"""The autoscaling simulation in benchmarks/autoscale.py: its model of KEDA and the HPA, and the ops/ settings.

Every test runs the simulation in this process. The worker start-up time it uses was measured by
`python benchmarks/autoscale.py --measure-startup`, which starts real workers and is not run here.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from benchmarks import autoscale
from benchmarks.autoscale import Job, Scenario, Simulation, WorkerModel
from producer.queue import celery_config
from producer.settings import Settings

# A worker of round numbers, so expected times can be worked out by hand. Each of its 6 pool processes runs at
# 10 images/s and takes 6.4 s for a batch of 64 images. A pod is ready 80 s after it is created.
ROUND_WORKER = WorkerModel(images_per_s=60.0, startup_s=20.0, extra_startup_s=60.0)


@pytest.fixture(scope="module")
def ops_scenario() -> Scenario:
    return autoscale.default_scenario()


@pytest.fixture(scope="module")
def ops_report(ops_scenario: Scenario) -> dict:
    return autoscale.simulate(ops_scenario)


def copy_ops(tmp_path: Path) -> Path:
    ops_dir = tmp_path / "ops"
    shutil.copytree(autoscale.OPS_DIR / "k8s", ops_dir / "k8s")
    return ops_dir


def edit_yaml(path: Path, kind: str, edit) -> None:
    documents = [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document]
    for document in documents:
        if document["kind"] == kind:
            edit(document)
    path.write_text(yaml.safe_dump_all(documents), encoding="utf-8")


def one_job(scenario: Scenario, images: int, jitter: float = 0.0, **scaler_changes) -> Simulation:
    """Run a job of `images` images submitted at 0 s on ROUND_WORKER pods, with `scaler_changes` to the scaler."""
    scaler = dataclasses.replace(scenario.scaler, **scaler_changes)
    small = dataclasses.replace(
        scenario, scaler=scaler, worker=ROUND_WORKER, jobs=(Job(0, images, 0),), max_simulated_s=7200, batch_time_jitter=jitter
    )
    simulation = Simulation(small)
    simulation.run()
    return simulation


# Settings read from ops/


def test_scaler_settings_from_ops(ops_scenario):
    scaler = ops_scenario.scaler
    spec = yaml.safe_load((autoscale.OPS_DIR / "k8s" / "scaledobject.yaml").read_text(encoding="utf-8"))["spec"]
    assert scaler.polling_interval_s == spec["pollingInterval"]
    assert scaler.cooldown_s == spec["cooldownPeriod"]
    assert scaler.max_replicas == spec["maxReplicaCount"]
    assert scaler.list_length == int(spec["triggers"][0]["metadata"]["listLength"])
    window_s = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert scaler.scale_down.stabilization_window_s == window_s
    assert scaler.scale_up == autoscale.DEFAULT_SCALE_UP


def test_fleet_settings_from_ops(ops_scenario):
    fleet = ops_scenario.fleet
    k8s = autoscale.OPS_DIR / "k8s"
    deployment = yaml.safe_load((k8s / "worker-deployment.yaml").read_text(encoding="utf-8"))
    arguments = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    config = yaml.safe_load((k8s / "configmap.yaml").read_text(encoding="utf-8"))["data"]
    assert fleet.concurrency == int(arguments[arguments.index("--concurrency") + 1])
    assert fleet.prefetch_multiplier == celery_config(Settings())["worker_prefetch_multiplier"]
    assert fleet.shutdown_grace_s == float(config["CLIPFLEET_SHUTDOWN_GRACE_S"])
    # The ConfigMap leaves the images per batch at the product's default.
    assert "CLIPFLEET_BATCH_SIZE" not in config
    assert fleet.batch_size == Settings.model_fields["batch_size"].default


def test_edited_manifests_change_settings(tmp_path):
    ops_dir = copy_ops(tmp_path)
    k8s = ops_dir / "k8s"

    def edit_scaled_object(document):
        document["spec"]["cooldownPeriod"] = 1800
        document["spec"]["triggers"][0]["metadata"]["listLength"] = "20"
        del document["spec"]["advanced"]

    edit_yaml(k8s / "scaledobject.yaml", "ScaledObject", edit_scaled_object)
    edit_yaml(k8s / "worker-deployment.yaml", "Deployment", lambda document: document["spec"]["template"]["spec"]["containers"][0].update(args=["worker", "--concurrency=3"]))
    edit_yaml(k8s / "configmap.yaml", "ConfigMap", lambda document: document["data"].update(CLIPFLEET_SHUTDOWN_GRACE_S="30", CLIPFLEET_BATCH_SIZE="256"))

    scaler = autoscale.read_scaler_settings(ops_dir)
    fleet = autoscale.read_fleet_settings(ops_dir)
    assert scaler.cooldown_s == 1800
    assert scaler.list_length == 20
    assert scaler.scale_down == autoscale.DEFAULT_SCALE_DOWN
    assert fleet.concurrency == 3
    assert fleet.shutdown_grace_s == 30.0
    assert fleet.batch_size == 256


def test_edited_cooldown_changes_result(tmp_path):
    ops_dir = copy_ops(tmp_path)
    edit_yaml(ops_dir / "k8s" / "scaledobject.yaml", "ScaledObject", lambda document: document["spec"].update(cooldownPeriod=1800))
    shipped = one_job(autoscale.default_scenario(), 1000)
    edited = one_job(autoscale.default_scenario(ops_dir), 1000)
    assert edited.replica_trace[-1][0] - shipped.replica_trace[-1][0] == 1800 - shipped.scenario.scaler.cooldown_s


def test_missing_concurrency_rejected(tmp_path):
    ops_dir = copy_ops(tmp_path)
    edit_yaml(ops_dir / "k8s" / "worker-deployment.yaml", "Deployment", lambda document: document["spec"]["template"]["spec"]["containers"][0].update(args=["worker"]))
    with pytest.raises(ValueError, match="no --concurrency"):
        autoscale.read_worker_concurrency(ops_dir)


# The model on small cases


def test_small_job_drains_then_scales_to_zero(ops_scenario):
    simulation = one_job(ops_scenario, 1000)
    report = autoscale.summarize(simulation)
    polling_s = ops_scenario.scaler.polling_interval_s
    cooldown_s = ops_scenario.scaler.cooldown_s
    # 16 batches on one pod ready at 80 s: two rounds of six batches of 6.4 s, then three of 6.4 s and one of 40 images (4 s).
    assert simulation.finished_s == [pytest.approx(80 + 3 * 6.4)]
    assert report["busy_minutes"] == pytest.approx(3 * 6.4 / 60)
    # KEDA last saw a queued batch at the first poll after the pod took the last ones, and scaled to zero one cooldown later.
    assert simulation.last_active_s == 90
    zero_s = polling_s * -(-(simulation.last_active_s + cooldown_s) // polling_s)
    assert simulation.replica_trace == [(0.0, 1), (zero_s, 0)]
    assert report["worker_minutes"] == pytest.approx(zero_s / 60)
    assert report["idle_minutes"] == pytest.approx((zero_s - 80 - 3 * 6.4) / 60)


def test_no_scale_up_at_activation_threshold(ops_scenario):
    # Ten batches: KEDA activates only when the list is longer than activationListLength.
    simulation = one_job(ops_scenario, 640, activation_list_length=10)
    assert simulation.replica_trace == []
    assert simulation.finished_s == [None]


def test_scale_up_above_activation_threshold(ops_scenario):
    simulation = one_job(ops_scenario, 704, activation_list_length=10)
    assert simulation.replica_trace[0] == (0.0, 1)
    assert simulation.finished_s[0] is not None


def test_replicas_capped_at_max(ops_scenario):
    simulation = one_job(ops_scenario, 1_000_000, max_replicas=5)
    replicas = [count for _, count in simulation.replica_trace]
    assert max(replicas) == 5
    assert simulation.totals.peak_replicas == 5


def test_scale_up_follows_default_policies(ops_scenario):
    # The HPA adds at most max(100%, 4 pods) per 15 s, counted from the replicas at the start of the period.
    scaler = ops_scenario.scaler
    assert autoscale.limit_rate(16, 1, 0.0, [], scaler) == 5
    assert autoscale.limit_rate(16, 5, 10.0, [(0.0, 4)], scaler) == 5
    assert autoscale.limit_rate(16, 5, 15.0, [(0.0, 4)], scaler) == 10
    assert autoscale.limit_rate(40, 10, 30.0, [(0.0, 4), (15.0, 5)], scaler) == 20


def test_backpressure_bounds_queue(ops_scenario):
    # Equal batch times would let pods started together take batches in bursts, which inflates the producer's rate.
    simulation = one_job(ops_scenario, 3_000_000, jitter=autoscale.DEFAULT_BATCH_TIME_JITTER)
    assert simulation.totals.peak_queued <= ops_scenario.fleet.queue_max_tasks
    # The producer's auto mark is about queue_ahead_s of the measured drain rate, so far below the job's batches.
    fleet_tasks_per_s = ops_scenario.scaler.max_replicas * ROUND_WORKER.images_per_s / ops_scenario.fleet.batch_size
    assert simulation.totals.peak_queued < 1.2 * fleet_tasks_per_s * ops_scenario.fleet.queue_ahead_s


def test_long_batches_handed_back(ops_scenario):
    # Batches of 4096 images take 410 s on a pool process, longer than the 60 s shutdown grace, so a pod
    # removed by a scale-down hands its running batches back. Every job still finishes.
    fleet = dataclasses.replace(ops_scenario.fleet, batch_size=4096)
    scenario = dataclasses.replace(ops_scenario, fleet=fleet, worker=ROUND_WORKER, jobs=(Job(0, 300_000, 0),))
    report = autoscale.simulate(scenario)
    assert report["handed_back_batches"] > 0
    assert report["unfinished_jobs"] == 0


def test_stabilize_keeps_window_maximum(ops_scenario):
    scaler = dataclasses.replace(ops_scenario.scaler, scale_down=autoscale.DEFAULT_SCALE_DOWN)
    # The HPA stores the recommendation of the current sync before it stabilizes.
    assert autoscale.stabilize([(0.0, 16), (200.0, 3), (290.0, 1)], 290.0, 16, scaler) == 16
    assert autoscale.stabilize([(200.0, 3), (290.0, 1), (301.0, 1)], 301.0, 16, scaler) == 3
    assert autoscale.stabilize([(290.0, 1), (301.0, 8)], 301.0, 3, scaler) == 8


def test_limit_rate_scale_down_percent(ops_scenario):
    # The default scale-down policy removes up to 100% per 15 s, so one step reaches the desired count.
    assert autoscale.limit_rate(1, 16, 100.0, [], ops_scenario.scaler) == 1


# The default workload


def test_workload_deterministic_for_seed():
    assert autoscale.bursty_workload(seed=7) == autoscale.bursty_workload(seed=7)
    assert autoscale.bursty_workload(seed=7) != autoscale.bursty_workload(seed=8)


def test_report_deterministic_for_seed(ops_scenario, ops_report):
    assert autoscale.simulate(ops_scenario) == ops_report


def test_ops_settings_drain_workload(ops_scenario, ops_report):
    assert ops_report["unfinished_jobs"] == 0
    assert ops_report["peak_replicas"] == ops_scenario.scaler.max_replicas
    expected_busy_minutes = ops_report["images"] / ops_scenario.worker.images_per_s / 60
    assert ops_report["busy_minutes"] == pytest.approx(expected_busy_minutes, rel=0.02)


def test_ops_settings_idle_under_ten_percent(ops_report):
    assert ops_report["idle_share"] < 0.10


def test_worker_minutes_add_up(ops_report):
    parts = ops_report["busy_minutes"] + ops_report["idle_minutes"] + ops_report["startup_minutes"]
    assert ops_report["worker_minutes"] == pytest.approx(parts, rel=1e-9)


@pytest.mark.parametrize(
    "changes",
    [{"list_length": 1}, {"cooldown_s": 3600}, {"scale_down": autoscale.DEFAULT_SCALE_DOWN}],
    ids=["list length 1", "cooldown 3600 s", "default scale-down window"],
)
def test_worse_setting_more_idle(ops_scenario, ops_report, changes):
    worse = dataclasses.replace(ops_scenario, scaler=dataclasses.replace(ops_scenario.scaler, **changes))
    assert autoscale.simulate(worse)["idle_share"] > ops_report["idle_share"] + 0.01


def test_table_lists_every_scenario(ops_report):
    table = autoscale.format_table([ops_report])
    assert table.splitlines()[2].startswith("| default | ")
    assert f"{100 * ops_report['idle_share']:.1f}%" in table


# Invalid input


def set_spec(**values):
    return lambda document: document["spec"].update(values)


def set_metadata(**values):
    return lambda document: document["spec"]["triggers"][0]["metadata"].update(values)


def set_scale_down(**values):
    return lambda document: document["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(values)


BEHAVIOR = "spec.advanced.horizontalPodAutoscalerConfig.behavior"


@pytest.mark.parametrize(
    ("edit", "field_path", "shown_value", "allowed"),
    [
        (set_metadata(listLength="abc"), "spec.triggers[0].metadata.listLength", "'abc'", "an integer >= 1"),
        (set_metadata(listLength="0"), "spec.triggers[0].metadata.listLength", "'0'", "an integer >= 1"),
        (set_metadata(activationListLength="-1"), "spec.triggers[0].metadata.activationListLength", "'-1'", "an integer >= 0"),
        (set_spec(pollingInterval=0), "spec.pollingInterval", "0", "an integer >= 1"),
        (set_spec(pollingInterval=1.5), "spec.pollingInterval", "1.5", "an integer >= 1"),
        (set_spec(cooldownPeriod=-1), "spec.cooldownPeriod", "-1", "an integer >= 0"),
        (set_spec(cooldownPeriod=True), "spec.cooldownPeriod", "True", "an integer >= 0"),
        (set_spec(minReplicaCount=-1), "spec.minReplicaCount", "-1", "an integer >= 0"),
        (set_spec(maxReplicaCount=0), "spec.maxReplicaCount", "0", "an integer >= 1"),
        (set_spec(minReplicaCount=20, maxReplicaCount=16), "spec.maxReplicaCount", "16", "an integer >= spec.minReplicaCount (20)"),
        (set_scale_down(stabilizationWindowSeconds=-5), f"{BEHAVIOR}.scaleDown.stabilizationWindowSeconds", "-5", "an integer from 0 to 3600"),
        (set_scale_down(selectPolicy="Biggest"), f"{BEHAVIOR}.scaleDown.selectPolicy", "'Biggest'", "'Max', 'Min' or 'Disabled'"),
        (set_scale_down(policies="fast"), f"{BEHAVIOR}.scaleDown.policies", "'fast'", "a list of policies"),
        (set_scale_down(policies=[{"type": "Nodes", "value": 1, "periodSeconds": 15}]), f"{BEHAVIOR}.scaleDown.policies[0].type", "'Nodes'", "'Pods' or 'Percent'"),
        (set_scale_down(policies=[{"type": "Pods", "value": 0, "periodSeconds": 15}]), f"{BEHAVIOR}.scaleDown.policies[0].value", "0", "an integer >= 1"),
        (set_scale_down(policies=[{"type": "Pods", "value": 1, "periodSeconds": 0}]), f"{BEHAVIOR}.scaleDown.policies[0].periodSeconds", "0", "an integer from 1 to 1800"),
    ],
    ids=[
        "listLength word", "listLength 0", "activationListLength negative", "pollingInterval 0", "pollingInterval fraction",
        "cooldownPeriod negative", "cooldownPeriod boolean", "minReplicaCount negative", "maxReplicaCount 0",
        "min above max", "window negative", "selectPolicy unknown", "policies not list", "policy type unknown",
        "policy value 0", "policy period 0",
    ],
)
def test_invalid_scaler_value_rejected(tmp_path, edit, field_path, shown_value, allowed):
    ops_dir = copy_ops(tmp_path)
    path = ops_dir / "k8s" / "scaledobject.yaml"
    edit_yaml(path, "ScaledObject", edit)
    with pytest.raises(autoscale.ManifestError) as raised:
        autoscale.read_scaler_settings(ops_dir)
    message = str(raised.value)
    assert str(path) in message
    assert f"invalid {field_path} {shown_value} " in message
    assert f"expected {allowed}" in message


def test_invalid_concurrency_rejected(tmp_path):
    ops_dir = copy_ops(tmp_path)
    path = ops_dir / "k8s" / "worker-deployment.yaml"
    edit_yaml(path, "Deployment", lambda document: document["spec"]["template"]["spec"]["containers"][0].update(args=["worker", "--concurrency=0"]))
    with pytest.raises(autoscale.ManifestError) as raised:
        autoscale.read_worker_concurrency(ops_dir)
    assert str(raised.value) == f"invalid spec.template.spec.containers[0] --concurrency '0' in {path}: expected an integer >= 1"


def test_invalid_configmap_value_rejected(tmp_path):
    ops_dir = copy_ops(tmp_path)
    path = ops_dir / "k8s" / "configmap.yaml"
    edit_yaml(path, "ConfigMap", lambda document: document["data"].update(CLIPFLEET_BATCH_SIZE="0"))
    with pytest.raises(autoscale.ManifestError) as raised:
        autoscale.read_fleet_settings(ops_dir)
    message = str(raised.value)
    assert message.startswith(f"invalid data.CLIPFLEET_BATCH_SIZE '0' in {path}: ")
    assert "greater than or equal to 1" in message


def test_invalid_manifest_exits_2(tmp_path, capsys):
    ops_dir = copy_ops(tmp_path)
    path = ops_dir / "k8s" / "scaledobject.yaml"
    edit_yaml(path, "ScaledObject", set_metadata(listLength="abc"))
    assert autoscale.main(["--ops-dir", str(ops_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: invalid spec.triggers[0].metadata.listLength 'abc' in {path}: ")


def test_missing_ops_dir_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-ops"
    assert autoscale.main(["--ops-dir", str(missing)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: --ops-dir {missing} is not a directory: ")
    assert "leave it out" in lines[0]


def test_missing_manifest_exits_2(tmp_path, capsys):
    ops_dir = copy_ops(tmp_path)
    (ops_dir / "k8s" / "configmap.yaml").unlink()
    assert autoscale.main(["--ops-dir", str(ops_dir)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: failed to read the manifest {ops_dir / 'k8s' / 'configmap.yaml'}: ")


def test_negative_seed_rejected(capsys):
    with pytest.raises(SystemExit) as raised:
        autoscale.parse_arguments(["--seed", "-1"])
    assert raised.value.code == 2
    assert "argument --seed: invalid non-negative integer value: '-1'" in capsys.readouterr().err


def test_seed_zero_accepted():
    assert autoscale.parse_arguments(["--seed", "0"]).seed == 0


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "no config.json"])
def test_invalid_model_dir_exits_2(tmp_path, capsys, make_dir):
    model_dir = tmp_path / "checkpoint"
    if make_dir:
        model_dir.mkdir()
    assert autoscale.main(["--measure-startup", "--model-dir", str(model_dir)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --model-dir {model_dir} ")
    assert "leave --model-dir out" in error
    assert "CLIPFLEET_MODEL" not in error
