"""`clipfleet eval` on real components: redis-server, moto's S3 server and a Celery worker process.

The labelled samples are local folders and a CSV of copies of the test photos. Every metric in the report
is checked against scikit-learn run here on the job's own result rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from producer import Client
from producer.cli import main
from producer.constants import JOBS_INDEX_KEY
from producer.evaluate import (
    InvalidSample,
    Variant,
    _slice_gap,
    evaluate,
    read_labels_file,
)
from tests.support.worker import stack_client, worker_stack

DATA = Path(__file__).resolve().parent / "data"
# Six classes, so the top_k of 5 does not hold every class and top-5 accuracy can be below 1.
FOLDER_SAMPLE = {
    "cat": ["chelsea.jpg", "chelsea.jpg"],
    "kitten": ["chelsea.jpg"],
    "rocket": ["rocket.jpg"],
    "spaceship": ["rocket.jpg"],
    "coffee": ["coffee.jpg"],
    "astronaut": ["astronaut.jpg"],
}
CSV_ROWS = [
    ("cat", "chelsea.jpg", "indoor"),
    ("cat", "chelsea.jpg", "outdoor"),
    ("rocket", "rocket.jpg", "outdoor"),
    ("rocket", "astronaut.jpg", "indoor"),
    ("coffee", "coffee.jpg", "indoor"),
    ("coffee", "coffee.jpg", "outdoor"),
]
COMPARE_WORDINGS = {"cat": "tabby cat", "coffee": ["a cup of coffee", "an espresso"], "rocket": "space rocket"}
S3_SAMPLE = {"cat/a.jpg": "chelsea.jpg", "cat/b.jpg": "coffee.jpg", "rocket/a.jpg": "rocket.jpg", "rocket/b.jpg": "astronaut.jpg"}
S3_INPUT, S3_OUTPUT = "clipfleet-eval-input", "clipfleet-eval-output"
WAIT_S = 120.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, aws_test_environment: None) -> Iterator[dict[str, Any]]:
    env = {"CLIPFLEET_DTYPE": "float32", "CLIPFLEET_JPEG_DRAFT": "false"}
    with worker_stack(tmp_path_factory.mktemp("eval-logs"), tiny_clip_dir, env) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: dict[str, Any], tiny_clip_dir: Path) -> Client:
    return stack_client(stack, tiny_clip_dir)


@pytest.fixture(scope="module")
def folder_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder per class of copied test photos, plus one corrupt image in class coffee."""
    root = tmp_path_factory.mktemp("eval-folder")
    for name, photos in FOLDER_SAMPLE.items():
        (root / name).mkdir()
        for number, photo in enumerate(photos):
            shutil.copy(DATA / photo, root / name / f"{number}-{photo}")
    (root / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    (root / "README.txt").write_text("not an image, so neither the sample nor the job lists it\n")
    return root


@pytest.fixture(scope="module")
def csv_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV manifest `uri,label,group` with relative paths, so they resolve against its folder."""
    root = tmp_path_factory.mktemp("eval-csv")
    lines = ["uri,label,group"]
    for number, (label, photo, group) in enumerate(CSV_ROWS):
        shutil.copy(DATA / photo, root / f"{number}-{photo}")
        lines.append(f"{number}-{photo},{label},{group}")
    path = root / "sample.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def folder_report(client: Client, folder_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("eval-out")
    report = evaluate(
        client, str(folder_sample), str(output), templates=["a photo of a {}."],
        compare=[Variant("template-set photo", template_set="photo")], timeout_s=WAIT_S,
    )
    return {"report": report, "output": output}


@pytest.fixture(scope="module")
def csv_run(stack: dict[str, Any], tiny_clip_dir: Path, csv_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`clipfleet eval` on the CSV sample through the command line."""
    output = tmp_path_factory.mktemp("eval-csv-out")
    wordings = tmp_path_factory.mktemp("eval-labels") / "wordings.json"
    wordings.write_text(json.dumps(COMPARE_WORDINGS))
    argv = ["eval", str(csv_sample), "--output", str(output), "--timeout-s", str(WAIT_S), "--compare-labels-file", str(wordings)]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        set_stack_environment(patch, stack, tiny_clip_dir)
        code = main(argv)
    report_paths = list(output.glob("*/eval/report.json"))
    report = json.loads(report_paths[0].read_text()) if len(report_paths) == 1 else None
    return {"code": code, "report": report, "reports": len(report_paths), "stdout": stdout.getvalue()}


def set_stack_environment(patch: pytest.MonkeyPatch, stack: dict[str, Any], model_dir: Path) -> None:
    patch.setenv("CLIPFLEET_REDIS_URL", stack["redis_url"])
    patch.setenv("CLIPFLEET_S3_ENDPOINT_URL", stack["s3"].endpoint_url)
    patch.setenv("CLIPFLEET_MODEL", str(model_dir))


def scored_rows(client: Client, job_id: str) -> list[dict[str, Any]]:
    return [row for row in client.job(job_id).results() if row["error"] is None]


def true_class(uri: str) -> str:
    return Path(uri).parent.name


def test_folder_report_counts(folder_report: dict[str, Any]) -> None:
    report = folder_report["report"]
    assert report["classes"] == sorted(FOLDER_SAMPLE)
    assert report["images"] == 8
    assert report["failed_images"] == 1
    assert len(report["variants"]) == 2


def test_folder_report_matches_sklearn(client: Client, folder_report: dict[str, Any]) -> None:
    variant = folder_report["report"]["variants"][0]
    classes = folder_report["report"]["classes"]
    rows = scored_rows(client, variant["job_id"])
    true = [true_class(row["uri"]) for row in rows]
    predicted = [row["label"] for row in rows]
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=classes, zero_division=0)

    assert variant["top1_accuracy"] == pytest.approx(accuracy_score(true, predicted))
    assert variant["macro_f1"] == pytest.approx(f1_score(true, predicted, labels=classes, average="macro", zero_division=0))
    assert [variant["per_class"][name]["precision"] for name in classes] == pytest.approx(list(precision))
    assert [variant["per_class"][name]["recall"] for name in classes] == pytest.approx(list(recall))
    assert [variant["per_class"][name]["f1"] for name in classes] == pytest.approx(list(f1))
    assert [variant["per_class"][name]["support"] for name in classes] == list(support)
    assert variant["confusion"]["matrix"] == confusion_matrix(true, predicted, labels=classes).tolist()


def test_folder_top5_matches_sklearn(client: Client, folder_report: dict[str, Any]) -> None:
    variant = folder_report["report"]["variants"][0]
    classes = folder_report["report"]["classes"]
    rows = scored_rows(client, variant["job_id"])
    # Classes outside a row's top_k get score 0, below every softmax score that the row keeps.
    scores = np.zeros((len(rows), len(classes)))
    for i, row in enumerate(rows):
        for entry in row["top_k"]:
            scores[i, classes.index(entry["label"])] = entry["score"]
    true = [true_class(row["uri"]) for row in rows]
    assert all(len(row["top_k"]) == 5 for row in rows)
    assert variant["top5_accuracy"] == pytest.approx(top_k_accuracy_score(true, scores, k=5, labels=classes))


def test_confusion_matrix_shape_and_sum(folder_report: dict[str, Any]) -> None:
    matrix = np.array(folder_report["report"]["variants"][0]["confusion"]["matrix"])
    assert matrix.shape == (6, 6)
    assert matrix.sum() == 7  # 8 images, one corrupt


def test_worst_pairs_follow_confusion(folder_report: dict[str, Any]) -> None:
    variant = folder_report["report"]["variants"][0]
    classes = variant["confusion"]["classes"]
    matrix = variant["confusion"]["matrix"]
    for pair in variant["worst_pairs"]:
        assert pair["count"] == matrix[classes.index(pair["true"])][classes.index(pair["predicted"])]
        assert len(pair["examples"]) == min(3, pair["count"])
    off_diagonal = sum(matrix[i][j] for i in range(len(classes)) for j in range(len(classes)) if i != j)
    assert sum(pair["count"] for pair in variant["worst_pairs"]) == off_diagonal


def test_report_written_next_to_results(folder_report: dict[str, Any]) -> None:
    report = folder_report["report"]
    path = folder_report["output"] / report["job_id"] / "eval" / "report.json"
    assert json.loads(path.read_text()) == report


def test_html_report_written_with_thumbnails(folder_report: dict[str, Any]) -> None:
    report = folder_report["report"]
    html = (folder_report["output"] / report["job_id"] / "eval" / "report.html").read_text()
    examples = [uri for variant in report["variants"] for pair in variant["worst_pairs"] for uri in pair["examples"]]
    assert 'id="confusion-0"' in html
    assert examples, "the sample has confused pairs with example images"
    assert html.count('src="data:image/') >= 1


def test_compare_variant_is_relabel_job(client: Client, folder_report: dict[str, Any]) -> None:
    report = folder_report["report"]
    given, photo = report["variants"]
    spec = client.job(photo["job_id"]).spec
    assert photo["name"] == "template-set photo"
    assert spec.relabel is not None
    assert spec.relabel.job_id == report["job_id"]
    assert given["prompts"]["cat"] == ["a photo of a cat."]
    assert photo["prompts"]["cat"][1] == "a snapshot showing a cat."


def test_compare_variant_matches_sklearn(client: Client, folder_report: dict[str, Any]) -> None:
    variant = folder_report["report"]["variants"][1]
    rows = scored_rows(client, variant["job_id"])
    true = [true_class(row["uri"]) for row in rows]
    predicted = [row["label"] for row in rows]
    assert len(rows) == 7
    assert variant["top1_accuracy"] == pytest.approx(accuracy_score(true, predicted))


def test_cli_eval_csv_succeeds(csv_run: dict[str, Any]) -> None:
    assert csv_run["code"] == 0
    assert csv_run["reports"] == 1
    assert csv_run["report"]["classes"] == ["cat", "coffee", "rocket"]
    assert csv_run["report"]["images"] == 6
    assert csv_run["report"]["failed_images"] == 0


def test_cli_eval_prints_summary(csv_run: dict[str, Any]) -> None:
    lines = csv_run["stdout"].splitlines()
    given, wordings = csv_run["report"]["variants"]
    assert lines[1].split() == ["variant", "top-1", "top-5", "macro-F1"]
    assert lines[2].split()[1] == f"{given['top1_accuracy']:.3f}"
    assert any(line.startswith("  worst slice gap: group") for line in lines)
    assert any(line.startswith("labels wordings.json") for line in lines)


def test_cli_compare_labels_file(client: Client, csv_run: dict[str, Any]) -> None:
    report = csv_run["report"]
    variant = report["variants"][1]
    spec = client.job(variant["job_id"]).spec
    assert variant["name"] == "labels wordings.json"
    assert spec.relabel is not None
    assert spec.relabel.job_id == report["job_id"]
    assert variant["prompts"]["coffee"] == ["a cup of coffee", "an espresso"]
    assert all("tabby cat" in prompt for prompt in variant["prompts"]["cat"])
    assert variant["slices"]["group"]["indoor"]["images"] == 3


def test_csv_slices_match_sklearn(client: Client, csv_run: dict[str, Any], csv_sample: Path) -> None:
    variant = csv_run["report"]["variants"][0]
    labels = {str(csv_sample.parent / f"{n}-{photo}"): (label, group) for n, (label, photo, group) in enumerate(CSV_ROWS)}
    rows = scored_rows(client, variant["job_id"])
    slices = variant["slices"]["group"]
    assert sorted(slices) == ["indoor", "outdoor"]
    for group in ("indoor", "outdoor"):
        members = [row for row in rows if labels[row["uri"]][1] == group]
        true = [labels[row["uri"]][0] for row in members]
        predicted = [row["label"] for row in members]
        assert slices[group]["images"] == 3
        assert slices[group]["top1_accuracy"] == pytest.approx(accuracy_score(true, predicted))
        assert slices[group]["macro_f1"] == pytest.approx(f1_score(true, predicted, average="macro", zero_division=0))


def test_csv_slice_gap(csv_run: dict[str, Any]) -> None:
    variant = csv_run["report"]["variants"][0]
    slices = variant["slices"]["group"]
    gap = variant["slice_gaps"]["group"]
    accuracies = {group: values["top1_accuracy"] for group, values in slices.items()}
    assert gap["metric"] == "top1_accuracy"
    assert accuracies[gap["best"]] == max(accuracies.values())
    assert accuracies[gap["worst"]] == min(accuracies.values())
    assert gap["gap"] == pytest.approx(max(accuracies.values()) - min(accuracies.values()))


def test_s3_folder_sample(client: Client) -> None:
    s3 = client.storage.client
    for bucket in (S3_INPUT, S3_OUTPUT):
        s3.create_bucket(Bucket=bucket)
    for key, photo in S3_SAMPLE.items():
        s3.put_object(Bucket=S3_INPUT, Key=f"sample/{key}", Body=(DATA / photo).read_bytes())
    report = evaluate(client, f"s3://{S3_INPUT}/sample", f"s3://{S3_OUTPUT}/eval/", timeout_s=WAIT_S)
    body = s3.get_object(Bucket=S3_OUTPUT, Key=f"eval/{report['job_id']}/eval/report.json")["Body"].read()
    rows = scored_rows(client, report["job_id"])
    assert report["classes"] == ["cat", "rocket"]
    assert report["images"] == 4
    assert sorted(row["uri"] for row in rows) == [f"s3://{S3_INPUT}/sample/{key}" for key in sorted(S3_SAMPLE)]
    assert json.loads(body) == report


def test_class_mismatch_rejected(client: Client, folder_sample: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidSample, match=r"missing \['spaceship'\], not in the sample \['dog'\]"):
        evaluate(client, str(folder_sample), str(tmp_path), labels=["astronaut", "cat", "coffee", "kitten", "rocket", "dog"])


def test_empty_folder_rejected(client: Client, tmp_path: Path) -> None:
    (tmp_path / "sample" / "cat").mkdir(parents=True)
    with pytest.raises(InvalidSample, match="contains no images"):
        evaluate(client, str(tmp_path / "sample"), str(tmp_path / "out"))


def test_cli_csv_without_label_column(
    stack: dict[str, Any], tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "sample.csv"
    manifest.write_text("uri,group\na.jpg,indoor\n")
    set_stack_environment(monkeypatch, stack, tiny_clip_dir)
    code = main(["eval", str(manifest), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "has no column label" in capsys.readouterr().err


def test_cli_labels_file_mismatch(
    stack: dict[str, Any], tiny_clip_dir: Path, csv_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"cat": "tabby cat", "coffee": ["a cup of coffee"]}))
    set_stack_environment(monkeypatch, stack, tiny_clip_dir)
    code = main(["eval", str(csv_sample), "--output", str(tmp_path / "out"), "--labels-file", str(labels)])
    assert code == 2
    assert "missing ['rocket']" in capsys.readouterr().err


def test_csv_path_outside_its_folder_rejected(client: Client, folder_sample: Path, tmp_path: Path) -> None:
    (tmp_path / "csvs").mkdir()
    manifest = tmp_path / "csvs" / "sample.csv"
    outside = next((folder_sample / "cat").iterdir())
    manifest.write_text(f"uri,label\n{outside},cat\n../b.jpg,dog\n")
    jobs_before = client.store.redis.zcard(JOBS_INDEX_KEY)
    with pytest.raises(InvalidSample, match=r"line 2: .* is outside the CSV's folder"):
        evaluate(client, str(manifest), str(tmp_path / "out"))
    assert client.store.redis.zcard(JOBS_INDEX_KEY) == jobs_before


def test_empty_wording_rejected(tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"cat": " ", "dog": "a dog"}))
    with pytest.raises(InvalidSample, match="with no empty wording"):
        read_labels_file(labels, "--labels-file")


def test_invalid_variant_rejected_before_any_job(client: Client, folder_sample: Path, tmp_path: Path) -> None:
    classes = sorted(path.name for path in folder_sample.iterdir() if path.is_dir())
    bad = Variant("bad templates", labels={name: [] for name in classes})
    jobs_before = client.store.redis.zcard(JOBS_INDEX_KEY)
    with pytest.raises(InvalidSample, match="variant 'bad templates'"):
        evaluate(client, str(folder_sample), str(tmp_path / "out"), compare=[bad])
    assert client.store.redis.zcard(JOBS_INDEX_KEY) == jobs_before


def test_tied_slices_name_two_values() -> None:
    gap = _slice_gap({"phone": {"top1_accuracy": 0.5}, "dslr": {"top1_accuracy": 0.5}})

    assert (gap["best"], gap["worst"], gap["gap"]) == ("dslr", "phone", 0.0)
