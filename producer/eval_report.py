"""The HTML page of an evaluation report: one self-contained file with no external CSS, scripts or fonts.

`render_html` takes the report dict that `clipfleet eval` writes as JSON and returns the page. The page has a
header and a table comparing the variants. Each variant then gets its confusion matrix as an inline SVG heat
map, the per-class metrics, the slice tables and the most confused class pairs with example images. Class names, prompts and
URIs are user data, so every string goes through `html.escape` before it reaches the page.

`make_thumbnails` reads example images through `producer.storage` and shrinks them into `data:` URIs, so the
page shows them without any access to the bucket. Pillow is imported inside that function only.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from producer.errors import StorageError
from producer.storage import Storage

logger = logging.getLogger(__name__)

# Above this many classes the SVG would hold more than 10,000 cells, so the page points to the JSON instead.
MAX_MATRIX_CLASSES = 100
MATRIX_CELL_PX = 36
MATRIX_LABEL_CHAR_PX = 7
MATRIX_MAX_LABEL_PX = 180
THUMBNAIL_JPEG_QUALITY = 85

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #1a1a1a; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
caption { caption-side: top; text-align: left; padding-bottom: 0.3em; }
section.variant { border-top: 2px solid #888; margin-top: 2em; }
img.example { max-width: 96px; max-height: 96px; margin-right: 0.3em; vertical-align: middle; }
span.uri { font-family: monospace; font-size: 0.85em; display: block; }
"""


def render_html(report: Mapping[str, Any], thumbnails: Mapping[str, str] | None = None) -> str:
    """Render an evaluation report dict as one self-contained HTML page.

    `report` has the shape that `clipfleet eval` writes (job_id, model, classes, images, failed_images and a
    list of variants with metrics, confusion matrix, slices and worst pairs). `thumbnails` maps an example
    image URI to a `data:` URI. Examples without a thumbnail appear as their URI in text.
    Raises KeyError or TypeError when a required field of the report is missing or has the wrong type.
    """
    thumbnails = thumbnails or {}
    title = f"Evaluation of job {report['job_id']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title>",
        f"<style>{PAGE_STYLE}</style>",
        "</head><body>",
        f"<h1>{_text(title)}</h1>",
        _render_header(report),
        _render_variant_summary(report["variants"]),
    ]
    for index, variant in enumerate(report["variants"]):
        parts.append(_render_variant(index, variant, thumbnails))
    parts.append("</body></html>")
    return "\n".join(parts)


def make_thumbnails(storage: Storage, uris: Iterable[str], max_side: int = 96) -> dict[str, str]:
    """Read each image at `uris` and return {uri: JPEG `data:` URI} with its longer side at most `max_side` px.

    An image that cannot be read or decoded is logged and left out, so the page shows its URI instead.
    Raises ValueError when `max_side` is not positive.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side!r}")
    from PIL import Image, UnidentifiedImageError

    thumbnails: dict[str, str] = {}
    for uri in dict.fromkeys(uris):
        try:
            data = storage.get_bytes(uri)
            with Image.open(io.BytesIO(data)) as image:
                image.thumbnail((max_side, max_side))
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
        except (StorageError, UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
            logger.warning("no thumbnail for %s: %s", uri, e)
            continue
        thumbnails[uri] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return thumbnails


def example_uris(report: Mapping[str, Any]) -> list[str]:
    """Return the example image URIs of every variant's worst pairs, in page order and without repeats."""
    uris: dict[str, None] = {}
    for variant in report["variants"]:
        for pair in variant.get("worst_pairs", []):
            uris.update(dict.fromkeys(pair.get("examples", [])))
    return list(uris)


def build_html_report(storage: Storage, report: Mapping[str, Any], max_side: int = 96) -> str:
    """Render `report` with thumbnails of its example images read through `storage`."""
    return render_html(report, make_thumbnails(storage, example_uris(report), max_side=max_side))


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):.{digits}f}"


def _percent(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{100 * float(value):.1f}%"


def _row(cells: Sequence[str], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(cells)
    tds = "".join(
        f'<td class="number">{cell}</td>' if is_number else f"<td>{cell}</td>" for cell, is_number in zip(cells, numeric)
    )
    return f"<tr>{tds}</tr>"


def _table(table_class: str, headers: Sequence[str], rows: Sequence[str], caption: str = "") -> str:
    head = "".join(f"<th>{_text(header)}</th>" for header in headers)
    caption_html = f"<caption>{caption}</caption>" if caption else ""
    return f'<table class="{table_class}">{caption_html}<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _render_header(report: Mapping[str, Any]) -> str:
    fields = [
        ("Job", report["job_id"]),
        ("Source", report.get("source", "")),
        ("Created", report.get("created_at", "")),
        ("Model", report["model"]),
        ("Classes", len(report["classes"])),
        ("Images", report["images"]),
        ("Failed images", report["failed_images"]),
    ]
    rows = "".join(f"<tr><th>{_text(name)}</th><td>{_text(value)}</td></tr>" for name, value in fields)
    return f'<table class="header">{rows}</table>'


def _render_variant_summary(variants: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        _row(
            [
                _text(variant["name"]),
                _text(variant.get("job_id", "")),
                _percent(variant["top1_accuracy"]),
                _percent(variant["top5_accuracy"]),
                _number(variant["macro_f1"]),
            ],
            [False, False, True, True, True],
        )
        for variant in variants
    ]
    return "<h2>Variants</h2>" + _table("variants", ["Variant", "Job", "Top-1", "Top-5", "Macro F1"], rows)


def _render_variant(index: int, variant: Mapping[str, Any], thumbnails: Mapping[str, str]) -> str:
    return "\n".join(
        [
            f'<section class="variant" id="variant-{index}">',
            f"<h2>Variant {_text(variant['name'])}</h2>",
            _render_prompts(variant.get("prompts", {})),
            "<h3>Confusion matrix</h3>",
            _render_confusion(index, variant["name"], variant["confusion"]),
            "<h3>Per class</h3>",
            _render_per_class(variant["per_class"]),
            _render_slices(variant.get("slices", {}), variant.get("slice_gaps", {})),
            "<h3>Most confused pairs</h3>",
            _render_worst_pairs(variant.get("worst_pairs", []), thumbnails),
            "</section>",
        ]
    )


def _render_prompts(prompts: Mapping[str, Sequence[str]]) -> str:
    if not prompts:
        return ""
    rows = [_row([_text(name), "<br>".join(_text(prompt) for prompt in texts)]) for name, texts in prompts.items()]
    return "<details><summary>Prompts</summary>" + _table("prompts", ["Class", "Prompts"], rows) + "</details>"


def _cell_colour(fraction: float) -> str:
    """Interpolate from white (0) to dark blue (1)."""
    fraction = min(max(fraction, 0.0), 1.0)
    red = round(255 - fraction * (255 - 8))
    green = round(255 - fraction * (255 - 48))
    blue = round(255 - fraction * (255 - 107))
    return f"#{red:02x}{green:02x}{blue:02x}"


def _render_confusion(index: int, variant_name: str, confusion: Mapping[str, Any]) -> str:
    classes = list(confusion["classes"])
    matrix = confusion["matrix"]
    if len(classes) > MAX_MATRIX_CLASSES:
        return (
            f'<p class="matrix-omitted">{len(classes)} classes are more than the {MAX_MATRIX_CLASSES} that the '
            "picture shows. The full matrix is under confusion.matrix in the JSON report.</p>"
        )
    return _confusion_svg(index, variant_name, classes, matrix)


def _confusion_svg(index: int, variant_name: str, classes: list[str], matrix: Sequence[Sequence[int]]) -> str:
    """Draw rows as true classes and columns as predicted classes. Each cell's colour is its share of the row."""
    size = len(classes)
    label_px = min(MATRIX_MAX_LABEL_PX, MATRIX_LABEL_CHAR_PX * max((len(name) for name in classes), default=1) + 10)
    width = label_px + size * MATRIX_CELL_PX + 10
    label = f"Confusion matrix of variant {variant_name}: rows are true classes, columns are predicted classes"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="confusion-{index}" class="confusion-matrix" role="img" '
        f'aria-label="{_text(label)}" width="{width}" height="{width}" viewBox="0 0 {width} {width}" '
        'font-family="sans-serif" font-size="11">',
        f"<title>{_text(label)}</title>",
    ]
    for position, name in enumerate(classes):
        centre = label_px + position * MATRIX_CELL_PX + MATRIX_CELL_PX // 2
        parts.append(
            f'<text class="true-label" x="{label_px - 4}" y="{centre + 4}" text-anchor="end">{_text(name)}</text>'
        )
        parts.append(
            f'<text class="predicted-label" x="{centre + 4}" y="{label_px - 4}" text-anchor="start" '
            f'transform="rotate(-90 {centre + 4} {label_px - 4})">{_text(name)}</text>'
        )
    for row, (true_name, counts) in enumerate(zip(classes, matrix)):
        parts.extend(_confusion_row(row, true_name, classes, counts, label_px))
    parts.append("</svg>")
    return "\n".join(parts)


def _confusion_row(row: int, true_name: str, classes: list[str], counts: Sequence[int], label_px: int) -> list[str]:
    row_total = sum(counts)
    cells = []
    for column, (predicted_name, count) in enumerate(zip(classes, counts)):
        fraction = count / row_total if row_total else 0.0
        x = label_px + column * MATRIX_CELL_PX
        y = label_px + row * MATRIX_CELL_PX
        text_colour = "#ffffff" if fraction > 0.5 else "#1a1a1a"
        cells.append(
            f'<g class="cell" data-true="{_text(true_name)}" data-predicted="{_text(predicted_name)}" '
            f'data-count="{int(count)}"><rect x="{x}" y="{y}" width="{MATRIX_CELL_PX}" height="{MATRIX_CELL_PX}" '
            f'fill="{_cell_colour(fraction)}" stroke="#dddddd"/>'
            f'<text class="count" x="{x + MATRIX_CELL_PX // 2}" y="{y + MATRIX_CELL_PX // 2 + 4}" '
            f'text-anchor="middle" fill="{text_colour}">{int(count)}</text></g>'
        )
    return cells


def _render_per_class(per_class: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [
        _row(
            [
                _text(name),
                _number(metrics.get("precision")),
                _number(metrics.get("recall")),
                _number(metrics.get("f1")),
                _text(metrics.get("support", "")),
            ],
            [False, True, True, True, True],
        )
        for name, metrics in per_class.items()
    ]
    return _table("per-class", ["Class", "Precision", "Recall", "F1", "Support"], rows)


def _render_slices(slices: Mapping[str, Mapping[str, Any]], gaps: Mapping[str, Mapping[str, Any]]) -> str:
    if not slices:
        return ""
    tables = ["<h3>Slices</h3>"]
    for column, values in slices.items():
        rows = [
            _row(
                [
                    _text(value),
                    _text(metrics.get("images", "")),
                    _percent(metrics.get("top1_accuracy")),
                    _number(metrics.get("macro_f1")),
                ],
                [False, True, True, True],
            )
            for value, metrics in values.items()
        ]
        caption = f"Slice column {_text(column)}" + _gap_sentence(gaps.get(column))
        tables.append(_table("slice", [str(column), "Images", "Top-1", "Macro F1"], rows, caption))
    return "\n".join(tables)


# Readable names of the report's metric keys.
METRIC_NAMES = {"top1_accuracy": "top-1 accuracy", "top5_accuracy": "top-5 accuracy", "macro_f1": "macro F1"}


def _gap_sentence(gap: Mapping[str, Any] | None) -> str:
    if not gap:
        return ""
    metric = gap.get("metric", "top1_accuracy")
    metric_name = METRIC_NAMES.get(metric, metric)
    if metric == "top1_accuracy":
        gap_text = f"{100 * float(gap['gap']):.1f} percentage points"
    else:
        gap_text = _number(gap["gap"])
    return (
        f'. <span class="gap">Gap in {_text(metric_name)}: {gap_text}, best {_text(gap["best"])}, '
        f'worst {_text(gap["worst"])}.</span>'
    )


def _render_worst_pairs(pairs: Sequence[Mapping[str, Any]], thumbnails: Mapping[str, str]) -> str:
    if not pairs:
        return '<p class="no-pairs">No image was misclassified.</p>'
    rows = [
        _row(
            [
                _text(pair["true"]),
                _text(pair["predicted"]),
                _text(pair["count"]),
                "".join(_example(uri, thumbnails) for uri in pair.get("examples", [])),
            ],
            [False, False, True, False],
        )
        for pair in pairs
    ]
    return _table("worst-pairs", ["True class", "Predicted class", "Images", "Examples"], rows)


def _example(uri: str, thumbnails: Mapping[str, str]) -> str:
    thumbnail = thumbnails.get(uri)
    if thumbnail is None or not thumbnail.startswith("data:image/"):
        return f'<span class="uri">{_text(uri)}</span>'
    return f'<img class="example" src="{_text(thumbnail)}" alt="{_text(uri)}" title="{_text(uri)}">'
