"""Evaluation of a taxonomy on a labelled sample: one job, then metrics computed with scikit-learn.

A labelled sample is a folder (local or S3) with one subfolder per class, where the immediate subfolder name
is the image's class, or a CSV manifest with the header `uri,label[,extra...]`. Each extra column (such as
`group`) defines slices: the metrics are computed again for the images of each of its values.

The sample runs as one normal job with stored embeddings. Each `--compare` variant is a relabel job of that
job (see producer.relabel), so the image tower runs once and each variant adds only a text-tower pass.
The report (see `build_variant`) is written to `{output}/{job_id}/eval/report.json`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from producer.constants import (
    DEFAULT_IMAGE_EXTENSIONS,
    DEFAULT_TEMPLATES,
    STATE_SUCCEEDED,
)
from producer.errors import ClipfleetError, InvalidJobSpec
from producer.manifests import manifest_format
from producer.storage import Storage, as_folder, join_location
from producer.templates import template_set as named_template_set
from producer.uris import S3Uri, parse_location

if TYPE_CHECKING:
    from producer.client import Client, Job

logger = logging.getLogger(__name__)

MAX_TOP_K = 5
MAX_WORST_PAIRS = 10
MAX_PAIR_EXAMPLES = 3
REPORT_FOLDER = "eval"
SLICE_METRIC = "top1_accuracy"

# A labels argument: class names, or a mapping from class name to a wording (filled into the templates)
# or to the class's own list of prompts.
Labels = Sequence[str] | Mapping[str, str | Sequence[str]]


class InvalidSample(InvalidJobSpec):
    """The labelled sample or the labels given for it are invalid; no job was submitted."""


class EvaluationFailed(ClipfleetError):
    """A job of the evaluation did not succeed, or its rows do not match the sample."""


@dataclass
class LabelledSample:
    """Images with their true class. `extras` maps each extra CSV column to `{uri: value}`."""

    source: str
    labels: dict[str, str]
    extras: dict[str, dict[str, str]] = field(default_factory=dict)
    # The job's source: the folder, S3 prefix or CSV itself, with a local path made absolute.
    job_source: str = ""

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.values()))


@dataclass(frozen=True)
class Variant:
    """One way to word the classes: `labels` as `Labels`, with `templates` or a built-in `template_set`."""

    name: str
    labels: Labels | None = None
    templates: Sequence[str] | None = None
    template_set: str | None = None


# Reading the sample


def read_sample(source: str, storage: Storage) -> LabelledSample:
    """Read a labelled sample: a `.csv` manifest, or a folder or S3 prefix with one subfolder per class.

    Local paths are made absolute, because result rows name images by the paths the job was given. Raises
    InvalidSample for a sample without images, with fewer than 2 classes, or a malformed CSV, and
    StorageError when the sample cannot be read.
    """
    found = manifest_format(source)
    if found is not None:
        if found != ("csv", False):
            raise InvalidSample(f"labelled sample {source!r} must be an uncompressed .csv with the header uri,label[,extra...], or a folder")
        sample = _read_csv(source, storage)
    else:
        sample = _read_folder(source, storage)
    if not sample.labels:
        raise InvalidSample(f"labelled sample {source!r} contains no images: give one subfolder per class with images in it, or a CSV with rows uri,label")
    if len(sample.classes) < 2:
        raise InvalidSample(f"labelled sample {source!r} has only the class {sample.classes!r}, but an evaluation needs at least 2 classes: add a class")
    return sample


def _read_folder(source: str, storage: Storage) -> LabelledSample:
    location = parse_location(source)
    if isinstance(location, S3Uri):
        prefix = as_folder(location)
        names = (key[len(prefix.key):] for key, _ in storage.iter_objects(prefix))
        pairs = [(name, f"s3://{prefix.bucket}/{prefix.key}{name}") for name in names]
        job_source = str(prefix)
    else:
        if not location.is_dir():
            raise InvalidSample(f"labelled sample {source!r} is not a folder or a .csv manifest: give a folder with one subfolder per class")
        root = location.resolve()
        pairs = [(path.relative_to(root).as_posix(), str(path)) for path in sorted(root.rglob("*")) if path.is_file()]
        job_source = str(root)
    labels = {}
    for relative, uri in pairs:
        if not relative.lower().endswith(DEFAULT_IMAGE_EXTENSIONS):
            continue  # the job lists only files with these extensions too
        parts = PurePosixPath(relative).parts
        if len(parts) < 2:
            raise InvalidSample(f"image {uri!r} is directly in the labelled sample {source!r}, so it has no class; move it into its class's subfolder")
        labels[uri] = parts[0]
    return LabelledSample(source, labels, job_source=job_source)


def _read_csv(source: str, storage: Storage) -> LabelledSample:
    try:
        text = storage.get_bytes(source).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidSample(f"labelled sample {source!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from e
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in ("uri", "label") if name not in columns]
    if missing:
        raise InvalidSample(f"labelled sample {source!r} has no column {', '.join(missing)} in its header {columns!r}: make the first line uri,label[,extra...]")
    reader.fieldnames = columns
    location = parse_location(source)
    base = None if isinstance(location, S3Uri) else location.resolve().parent
    # The CSV is the job's manifest too: the job reads its `uri` column and resolves relative paths alike.
    job_source = source if base is None else str(location.resolve())
    sample = LabelledSample(source, {}, {name: {} for name in columns if name not in ("uri", "label")}, job_source)
    for line, row in enumerate(reader, start=2):
        _add_csv_row(sample, row, base, f"{source} line {line}")
    return sample


def _add_csv_row(sample: LabelledSample, row: dict[str, Any], base: Path | None, where: str) -> None:
    uri, label = (row.get("uri") or "").strip(), (row.get("label") or "").strip()
    if not uri or not label:
        raise InvalidSample(f"{where}: every row needs a uri and a label, got uri={uri!r} label={label!r}")
    if base is not None and not uri.startswith("s3://"):
        path = (base / uri).resolve()
        # The CSV is the job's source, and workers read local images only inside their job's source folder.
        if not path.is_relative_to(base):
            raise InvalidSample(
                f"{where}: {uri!r} is outside the CSV's folder {str(base)!r}, and workers read only images under it; "
                "move the CSV to a folder that holds the images, or list paths inside it"
            )
        uri = str(path)
    if uri in sample.labels:
        raise InvalidSample(f"{where}: {uri!r} is listed twice: list each image once, with one label")
    sample.labels[uri] = label
    for column, values in sample.extras.items():
        values[uri] = (row.get(column) or "").strip()


# Labels and prompts


def resolve_labels(
    classes: Sequence[str], labels: Labels | None, templates: Sequence[str] | None, template_set: str | None
) -> list[str] | dict[str, list[str]]:
    """Return the job labels for `classes`: the class names, or `{class: [prompts]}` for a mapping.

    A mapping's wording is filled into the templates (`templates`, the set `template_set`, or the default
    templates). Raises InvalidSample when `labels` does not name exactly the sample's classes.
    """
    if labels is None:
        return list(classes)
    _check_same_classes(classes, list(labels))
    if not isinstance(labels, Mapping):
        return list(classes)
    filled = list(templates or (named_template_set(template_set) if template_set else DEFAULT_TEMPLATES))
    prompts = {}
    for name in classes:
        value = labels[name]
        prompts[name] = [template.replace("{}", value) for template in filled] if isinstance(value, str) else list(value)
    return prompts


def _check_same_classes(classes: Sequence[str], named: Sequence[str]) -> None:
    missing = sorted(set(classes) - set(named))
    extra = sorted(set(named) - set(classes))
    if missing or extra:
        raise InvalidSample(
            f"the labels must name exactly the sample's classes {list(classes)!r}: missing {missing!r}, "
            f"not in the sample {extra!r}; fix the labels or the sample's class folders or label column"
        )


def read_labels_file(path: Path, option: str) -> dict[str, str | list[str]]:
    """Read a JSON object `{class: wording or [prompts]}` given to `option`.

    Raises InvalidSample for an unreadable file, invalid JSON, or a value of another shape.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise InvalidSample(f"{option} {str(path)!r} cannot be read: {e.strerror}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidSample(f"{option} {str(path)!r} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(data, dict) or not all(_is_wording(value) for value in data.values()):
        raise InvalidSample(f"{option} {str(path)!r} must be a JSON object {{class: wording or [prompts]}} with no empty wording, for example {{\"cat\": \"tabby cat\"}}")
    return data


def _is_wording(value: Any) -> bool:
    """Return whether `value` is a non-blank wording string or a list of prompt strings."""
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


def variants_from_args(template_sets: Sequence[str], labels_files: Sequence[Path]) -> list[Variant]:
    """Return the `--compare` variants: one per template set, then one per labels file, in that order."""
    variants = [Variant(f"template-set {name}", template_set=name) for name in template_sets]
    for path in labels_files:
        variants.append(Variant(f"labels {path.name}", labels=read_labels_file(path, "--compare-labels-file")))
    return variants


# Metrics


def build_variant(name: str, job_id: str, prompts: Mapping[str, list[str]], rows: Sequence[dict[str, Any]], sample: LabelledSample) -> dict[str, Any]:
    """Compute one variant's metrics from its result rows; rows with an error are left out.

    Raises EvaluationFailed for a row whose URI is not in the sample.
    """
    scored = [row for row in rows if row["error"] is None]
    if not scored:
        raise EvaluationFailed(
            f"no image of job {job_id} was classified: all {len(rows)} failed; "
            f"see their error codes with `clipfleet results {job_id}`"
        )
    for row in scored:
        if row["uri"] not in sample.labels:
            raise EvaluationFailed(f"result row {row['uri']!r} of job {job_id} is not in the labelled sample {sample.source!r}")
    classes = sample.classes
    true = [sample.labels[row["uri"]] for row in scored]
    predicted = [row["label"] for row in scored]
    metrics = score_predictions(classes, true, predicted, [_top_labels(row) for row in scored])
    return {
        "name": name, "job_id": job_id, "prompts": {label: list(values) for label, values in prompts.items()},
        **metrics,
        "worst_pairs": worst_pairs(classes, true, predicted, [row["uri"] for row in scored]),
        **slice_metrics(sample, scored, true, predicted),
    }


def _top_labels(row: dict[str, Any]) -> list[str]:
    return [entry["label"] for entry in row["top_k"][:MAX_TOP_K]]


def score_predictions(classes: Sequence[str], true: Sequence[str], predicted: Sequence[str | None], top: Sequence[list[str]]) -> dict[str, Any]:
    """Return top-1 and top-5 accuracy, macro F1, per-class precision, recall, F1 and support, and the
    confusion matrix (rows true, columns predicted, in `classes` order). Scores are 0 for no images."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    if not true:
        empty = {name: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for name in classes}
        matrix = [[0] * len(classes) for _ in classes]
        return {"top1_accuracy": 0.0, "top5_accuracy": 0.0, "macro_f1": 0.0, "per_class": empty, "confusion": {"classes": list(classes), "matrix": matrix}}
    # A row without a label (no top-k entry) counts as wrong; "" is no class name, because spec labels are non-empty.
    predicted = [label or "" for label in predicted]
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=list(classes), zero_division=0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    top5 = sum(label in labels for label, labels in zip(true, top)) / len(true)
    return {
        "top1_accuracy": float(accuracy_score(true, predicted)),
        "top5_accuracy": float(top5),
        "macro_f1": float(f1_score(true, predicted, labels=list(classes), average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": {"classes": list(classes), "matrix": confusion_matrix(true, predicted, labels=list(classes)).tolist()},
    }


def worst_pairs(classes: Sequence[str], true: Sequence[str], predicted: Sequence[str | None], uris: Sequence[str]) -> list[dict[str, Any]]:
    """Return the most frequent confusions (true class, predicted class), most first, at most MAX_WORST_PAIRS,
    each with up to MAX_PAIR_EXAMPLES URIs in result order. Ties are ordered by class names."""
    examples: dict[tuple[str, str], list[str]] = {}
    for label, guess, uri in zip(true, predicted, uris):
        if guess is not None and guess != label and guess in classes:
            examples.setdefault((label, guess), []).append(uri)
    ranked = sorted(examples.items(), key=lambda item: (-len(item[1]), item[0]))
    return [
        {"true": pair[0], "predicted": pair[1], "count": len(found), "examples": found[:MAX_PAIR_EXAMPLES]}
        for pair, found in ranked[:MAX_WORST_PAIRS]
    ]


def slice_metrics(sample: LabelledSample, rows: Sequence[dict[str, Any]], true: Sequence[str], predicted: Sequence[str | None]) -> dict[str, Any]:
    """Return `slices` (per extra column and value: images, top-1 accuracy, macro F1 over the classes in
    the slice) and `slice_gaps` (best and worst value by top-1 accuracy, and their difference)."""
    from sklearn.metrics import accuracy_score, f1_score

    slices: dict[str, dict[str, Any]] = {}
    gaps: dict[str, dict[str, Any]] = {}
    for column, values in sample.extras.items():
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(values[row["uri"]], []).append(index)
        slices[column] = {}
        for value in sorted(groups):
            slice_true = [true[i] for i in groups[value]]
            slice_predicted = [predicted[i] or "" for i in groups[value]]
            slices[column][value] = {
                "images": len(slice_true),
                "top1_accuracy": float(accuracy_score(slice_true, slice_predicted)),
                "macro_f1": float(f1_score(slice_true, slice_predicted, average="macro", zero_division=0)),
            }
        if slices[column]:
            gaps[column] = _slice_gap(slices[column])
    return {"slices": slices, "slice_gaps": gaps}


def _slice_gap(column_slices: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    # Among tied values the best is the first name and the worst the last, so two tied values are both named.
    values = sorted(column_slices)
    best = max(values, key=lambda value: column_slices[value][SLICE_METRIC])
    worst = min(reversed(values), key=lambda value: column_slices[value][SLICE_METRIC])
    gap = column_slices[best][SLICE_METRIC] - column_slices[worst][SLICE_METRIC]
    return {"metric": SLICE_METRIC, "best": best, "worst": worst, "gap": float(gap)}


# Running


def evaluate(
    client: "Client",
    source: str,
    output: str,
    *,
    labels: Labels | None = None,
    templates: Sequence[str] | None = None,
    template_set: str | None = None,
    model: str | None = None,
    compare: Sequence[Variant] = (),
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run the labelled sample `source` as one job, each `compare` variant as a relabel job of it, and return
    the report, also written to `{output}/{job_id}/eval/report.json` (and `report.html` when
    producer.eval_report exists).

    Raises InvalidSample or InvalidJobSpec for bad input before any job is submitted, EvaluationFailed when
    a job does not succeed, and TimeoutError when a job takes longer than `timeout_s` to finish.
    """
    sample = read_sample(source, client.storage)
    base_variant = Variant("given", labels, templates, template_set)
    checked = _check_variants(sample.classes, [base_variant, *compare])
    top_k = min(MAX_TOP_K, len(sample.classes))
    _check_variant_specs(client, sample, output, model, top_k, base_variant, checked)
    job_labels = checked[0][1]
    job = client.submit(
        sample.job_source, job_labels, output, templates=_job_templates(job_labels, templates), model=model,
        top_k=top_k, store_embeddings=True, template_set=_job_template_set(job_labels, template_set),
    )
    _wait(job, timeout_s)
    rows = list(job.results())
    variants = [build_variant(base_variant.name, job.id, job.spec.prompts, rows, sample)]
    for variant, variant_labels in checked[1:]:
        variants.append(_run_variant(client, job.id, output, variant, variant_labels, base_variant, top_k, sample, timeout_s))
    scored = sum(1 for row in rows if row["error"] is None and row["uri"] in sample.labels)
    report = _report(job, sample, len(sample.labels) - scored, variants)
    write_report(client.storage, job.output, report)
    return report


def _check_variants(classes: Sequence[str], variants: Sequence[Variant]) -> list[tuple[Variant, list[str] | dict[str, list[str]]]]:
    """Return each variant with its job labels; `variants[0]` is the base, whose labels the others default to.

    Raises InvalidSample for the first variant whose labels do not name exactly `classes`.
    """
    checked = []
    for variant in variants:
        variant_labels = variant.labels if variant.labels is not None else variants[0].labels
        checked.append((variant, resolve_labels(classes, variant_labels, *_templates_of(variant, variants[0]))))
    return checked


def _check_variant_specs(
    client: "Client", sample: LabelledSample, output: str, model: str | None, top_k: int, base_variant: Variant,
    checked: Sequence[tuple[Variant, Any]],
) -> None:
    """Validate every variant's job spec before the first job runs, so a bad variant costs no image pass.

    Raises InvalidSample naming the variant and what is wrong with its spec.
    """
    from producer.client import (
        make_spec,  # producer.client does not import this module; keep it light
    )

    for variant, job_labels in checked:
        variant_templates, variant_set = _templates_of(variant, base_variant)
        try:
            make_spec(
                client.settings, sample.job_source, job_labels, output, templates=_job_templates(job_labels, variant_templates),
                model=model, top_k=top_k, template_set=_job_template_set(job_labels, variant_set),
            )
        except InvalidJobSpec as e:
            raise InvalidSample(f"variant {variant.name!r}: {e}") from e


def _run_variant(
    client: "Client", job_id: str, output: str, variant: Variant, job_labels: Any, base_variant: Variant,
    top_k: int, sample: LabelledSample, timeout_s: float | None,
) -> dict[str, Any]:
    """Run `variant` as a relabel job of job `job_id`, wait for it, and return its metrics."""
    variant_templates, variant_set = _templates_of(variant, base_variant)
    relabelled = client.relabel(
        job_id, job_labels, output, templates=_job_templates(job_labels, variant_templates), top_k=top_k,
        template_set=_job_template_set(job_labels, variant_set),
    )
    _wait(relabelled, timeout_s)
    return build_variant(variant.name, relabelled.id, relabelled.spec.prompts, list(relabelled.results()), sample)


def _templates_of(variant: Variant, base_variant: Variant) -> tuple[Sequence[str] | None, str | None]:
    """Return a variant's (templates, template_set): its own when it names any, else the base variant's."""
    if variant.templates is not None or variant.template_set is not None:
        return variant.templates, variant.template_set
    return base_variant.templates, base_variant.template_set


def _job_templates(job_labels: Any, templates: Sequence[str] | None) -> Sequence[str] | None:
    return None if isinstance(job_labels, dict) else templates


def _job_template_set(job_labels: Any, template_set: str | None) -> str | None:
    return None if isinstance(job_labels, dict) else template_set


def _wait(job: "Job", timeout_s: float | None) -> None:
    try:
        status = job.wait(timeout_s=timeout_s, progress=False)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; the job keeps running: `clipfleet wait {job.id}` follows it and `clipfleet cancel {job.id}` stops it") from e
    if status.state != STATE_SUCCEEDED:
        raise EvaluationFailed(f"job {job.id} is {status.state}, so its rows are incomplete: see `clipfleet status {job.id}` for the reason")


def _report(job: "Job", sample: LabelledSample, failed_images: int, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the report. `failed_images` counts the sample's images without a result row free of errors."""
    return {
        "job_id": job.id, "source": sample.source, "created_at": datetime.now(timezone.utc).isoformat(),
        "model": job.spec.model, "classes": sample.classes, "failed_images": failed_images,
        "images": len(sample.labels), "variants": variants,
    }


def write_report(storage: Storage, job_folder: str, report: dict[str, Any]) -> str:
    """Write `report.json` and `report.html`, with thumbnails of the example images, under `job_folder/eval/`.

    Returns the location of report.json. Raises StorageError when a file cannot be written.
    """
    from producer.eval_report import build_html_report

    location = join_location(job_folder, REPORT_FOLDER, "report.json")
    storage.put_bytes(location, json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"), "application/json")
    html = build_html_report(storage, report)
    storage.put_bytes(join_location(job_folder, REPORT_FOLDER, "report.html"), html.encode("utf-8"), "text/html; charset=utf-8")
    return location


def format_summary(report: Mapping[str, Any]) -> str:
    """Return a short text summary: top-1 and top-5 accuracy and macro F1 per variant, and the largest slice gap."""
    lines = [f"job {report['job_id']}: {report['images']} images, {report['failed_images']} failed, {len(report['classes'])} classes"]
    width = max(len("variant"), *(len(variant["name"]) for variant in report["variants"]))
    lines.append(f"{'variant'.ljust(width)}  top-1   top-5   macro-F1")
    for variant in report["variants"]:
        lines.append(f"{variant['name'].ljust(width)}  {variant['top1_accuracy']:.3f}   {variant['top5_accuracy']:.3f}   {variant['macro_f1']:.3f}")
        gaps = variant["slice_gaps"]
        if gaps:
            column = max(gaps, key=lambda name: gaps[name]["gap"])
            gap = gaps[column]
            lines.append(f"  worst slice gap: {column} {gap['best']!r} vs {gap['worst']!r}, top-1 gap {gap['gap']:.3f}")
    return "\n".join(lines)
