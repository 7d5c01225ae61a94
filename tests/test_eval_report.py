"""The HTML evaluation report, rendered by headless Chromium and read back from the DOM it builds."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.eval_report import (
    build_html_report,
    example_uris,
    make_thumbnails,
    render_html,
)
from producer.storage import Storage

CHROMIUM_TIMEOUT_S = 60
HOSTILE_CLASS = "<script>alert(1)</script> & co"
CLASSES = ["cat", "dog", HOSTILE_CLASS]
BASELINE_MATRIX = [[5, 1, 0], [2, 3, 1], [0, 0, 4]]
COMPARE_MATRIX = [[6, 0, 0], [1, 5, 0], [1, 0, 3]]
THUMBNAILED_URI = "s3://photos/cat/1.jpg"
PLAIN_URI = "s3://photos/dog/7.jpg?a=<b>"
VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.text_parts) + "".join(child.text() for child in self.children)

    def iter(self, tag: str | None = None) -> Iterator[Element]:
        for child in self.children:
            if tag is None or child.tag == tag:
                yield child
            yield from child.iter(tag)

    def find_all(self, tag: str, class_name: str | None = None) -> list[Element]:
        return [
            element
            for element in self.iter(tag)
            if class_name is None or class_name in element.attrs.get("class", "").split()
        ]

    def by_id(self, element_id: str) -> Element:
        matches = [element for element in self.iter() if element.attrs.get("id") == element_id]
        if len(matches) != 1:
            raise LookupError(f"expected one element with id {element_id!r}, found {len(matches)}")
        return matches[0]


class TreeBuilder(HTMLParser):
    """Build an Element tree from the DOM that Chromium serialises, which closes every non-void element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID_ELEMENTS:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text_parts.append(data)


def parse_dom(markup: str) -> Element:
    builder = TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root


def table_rows(table: Element) -> list[list[str]]:
    body = table.find_all("tbody")[0]
    return [[cell.text().strip() for cell in row.find_all("td")] for row in body.find_all("tr")]


def per_class(matrix: list[list[int]]) -> dict[str, dict[str, Any]]:
    metrics = {}
    for index, name in enumerate(CLASSES):
        predicted = sum(row[index] for row in matrix)
        support = sum(matrix[index])
        precision = matrix[index][index] / predicted
        recall = matrix[index][index] / support
        f1 = 2 * precision * recall / (precision + recall)
        metrics[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return metrics


def variant(name: str, matrix: list[list[int]], top1: float, top5: float, macro_f1: float) -> dict[str, Any]:
    return {
        "name": name,
        "job_id": f"job-{name}",
        "prompts": {class_name: [f"a photo of a {class_name}."] for class_name in CLASSES},
        "top1_accuracy": top1,
        "top5_accuracy": top5,
        "macro_f1": macro_f1,
        "per_class": per_class(matrix),
        "confusion": {"classes": CLASSES, "matrix": matrix},
        "worst_pairs": [
            {"true": "dog", "predicted": "cat", "count": 2, "examples": [THUMBNAILED_URI, PLAIN_URI]},
            {"true": "cat", "predicted": "dog", "count": 1, "examples": [THUMBNAILED_URI]},
        ],
        "slices": {
            "camera": {
                "phone": {"images": 10, "top1_accuracy": 0.9, "macro_f1": 0.88},
                "dslr <b>": {"images": 12, "top1_accuracy": 0.5, "macro_f1": 0.47},
            }
        },
        "slice_gaps": {"camera": {"metric": "top1_accuracy", "best": "phone", "worst": "dslr <b>", "gap": 0.4}},
    }


def build_report() -> dict[str, Any]:
    return {
        "job_id": "eval-1",
        "source": "s3://photos/labels.csv",
        "created_at": "2026-01-02T03:04:05+00:00",
        "model": "openai/clip-vit-base-patch32",
        "classes": CLASSES,
        "failed_images": 1,
        "images": 23,
        "variants": [
            variant("baseline", BASELINE_MATRIX, 12 / 17, 1.0, 0.7),
            variant("renamed & <i>", COMPARE_MATRIX, 14 / 16, 1.0, 0.85),
        ],
    }


def png_data_uri() -> str:
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chromium_command() -> list[str]:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return [path, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    pytest.fail(
        "chromium was not found on PATH, and these tests render the report in it. "
        "Install it with `apt-get install -y --no-install-recommends chromium`."
    )


def run_chromium(arguments: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    command = [*chromium_command(), f"--user-data-dir={profile}", *arguments]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        # A script that escaped into the page can open an alert() dialog, which blocks headless Chromium.
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s (a script in the page may block it): {e}")
    if result.returncode != 0:
        pytest.fail(f"chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="module")
def page_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html(build_report(), {THUMBNAILED_URI: png_data_uri()}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dom(page_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Element:
    profile = tmp_path_factory.mktemp("chromium-profile")
    result = run_chromium(["--dump-dom", page_path.as_uri()], profile)
    return parse_dom(result.stdout)


def matrix_cells(dom: Element, index: int) -> dict[tuple[str, str], Element]:
    svg = dom.by_id(f"confusion-{index}")
    return {(cell.attrs["data-true"], cell.attrs["data-predicted"]): cell for cell in svg.find_all("g", "cell")}


def test_matrix_is_accessible_picture(dom):
    svg = dom.by_id("confusion-0")
    assert svg.tag == "svg"
    assert svg.attrs["role"] == "img"
    assert "baseline" in svg.attrs["aria-label"]


@pytest.mark.parametrize(("index", "matrix"), [(0, BASELINE_MATRIX), (1, COMPARE_MATRIX)])
def test_matrix_cells_show_counts(dom, index, matrix):
    cells = matrix_cells(dom, index)
    assert len(cells) == len(CLASSES) ** 2
    for row, true_name in enumerate(CLASSES):
        for column, predicted_name in enumerate(CLASSES):
            cell = cells[(true_name, predicted_name)]
            assert cell.attrs["data-count"] == str(matrix[row][column])
            assert cell.find_all("text", "count")[0].text() == str(matrix[row][column])


def test_matrix_colour_follows_row_share(dom):
    cells = matrix_cells(dom, 0)
    full_row = cells[(HOSTILE_CLASS, HOSTILE_CLASS)].find_all("rect")[0]
    empty = cells[(HOSTILE_CLASS, "cat")].find_all("rect")[0]
    assert full_row.attrs["fill"] == "#08306b"
    assert empty.attrs["fill"] == "#ffffff"


def test_matrix_axis_labels(dom):
    svg = dom.by_id("confusion-0")
    assert [label.text() for label in svg.find_all("text", "true-label")] == CLASSES
    assert [label.text() for label in svg.find_all("text", "predicted-label")] == CLASSES


def test_variant_summary_rows(dom):
    table = dom.find_all("table", "variants")[0]
    assert table_rows(table) == [
        ["baseline", "job-baseline", "70.6%", "100.0%", "0.700"],
        ["renamed & <i>", "job-renamed & <i>", "87.5%", "100.0%", "0.850"],
    ]


def test_header_counts(dom):
    header = dom.find_all("table", "header")[0]
    fields = {row.find_all("th")[0].text(): row.find_all("td")[0].text() for row in header.find_all("tr")}
    assert fields["Images"] == "23"
    assert fields["Failed images"] == "1"
    assert fields["Model"] == "openai/clip-vit-base-patch32"


def test_per_class_rows(dom):
    table = dom.find_all("table", "per-class")[0]
    assert table_rows(table) == [
        ["cat", "0.714", "0.833", "0.769", "6"],
        ["dog", "0.750", "0.500", "0.600", "6"],
        [HOSTILE_CLASS, "0.800", "1.000", "0.889", "4"],
    ]


def test_slice_rows_and_gap(dom):
    table = dom.find_all("table", "slice")[0]
    assert table_rows(table) == [["phone", "10", "90.0%", "0.880"], ["dslr <b>", "12", "50.0%", "0.470"]]
    gap = table.find_all("span", "gap")[0].text()
    assert gap == "Gap in top-1 accuracy: 40.0 percentage points, best phone, worst dslr <b>."


def test_worst_pairs_examples(dom):
    table = dom.find_all("table", "worst-pairs")[0]
    rows = table.find_all("tbody")[0].find_all("tr")
    assert [cell.text() for cell in rows[0].find_all("td")[:3]] == ["dog", "cat", "2"]
    images = rows[0].find_all("img")
    assert len(images) == 1
    assert images[0].attrs["src"].startswith("data:image/png;base64,")
    assert images[0].attrs["alt"] == THUMBNAILED_URI
    assert [span.text() for span in rows[0].find_all("span", "uri")] == [PLAIN_URI]


def test_hostile_names_stay_text(dom):
    assert list(dom.iter("script")) == []
    assert list(dom.iter("i")) == []
    assert list(dom.iter("b")) == []


def test_page_loads_nothing_external(dom):
    links = [
        element.attrs[name] for element in dom.iter() for name in ("src", "href") if name in element.attrs
    ]
    assert links
    assert all(link.startswith("data:") for link in links)
    assert list(dom.iter("link")) == []


def test_screenshot_not_blank(page_path, tmp_path):
    screenshot = tmp_path / "report.png"
    run_chromium(
        [f"--screenshot={screenshot}", "--window-size=1200,1600", "--hide-scrollbars", page_path.as_uri()],
        tmp_path / "profile",
    )
    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None
    assert len(colours) >= 10
    dark_blue_pixels = sum(count for count, (red, green, blue) in colours if blue > 90 and red < 40 and green < 70)
    assert dark_blue_pixels > 500


def test_thumbnails_from_s3(s3_server, s3_client, make_bucket):
    bucket = make_bucket()
    buffer = io.BytesIO()
    Image.new("RGB", (300, 150), (10, 120, 200)).save(buffer, format="PNG")
    s3_client.put_object(Bucket=bucket, Key="cat/1.png", Body=buffer.getvalue())
    s3_client.put_object(Bucket=bucket, Key="cat/broken.png", Body=b"not an image")
    uris = [f"s3://{bucket}/cat/1.png", f"s3://{bucket}/cat/broken.png", f"s3://{bucket}/cat/missing.png"]

    thumbnails = make_thumbnails(Storage(endpoint_url=s3_server.endpoint_url), uris, max_side=48)

    assert list(thumbnails) == [uris[0]]
    prefix = "data:image/jpeg;base64,"
    assert thumbnails[uris[0]].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(thumbnails[uris[0]][len(prefix) :]))) as thumbnail:
        assert thumbnail.size == (48, 24)


def test_thumbnails_reject_bad_size():
    with pytest.raises(ValueError, match="max_side"):
        make_thumbnails(Storage(), [], max_side=0)


def test_build_report_embeds_local_images(tmp_path):
    image_path = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), (0, 200, 0)).save(image_path)
    report = build_report()
    for item in report["variants"]:
        item["worst_pairs"] = [{"true": "dog", "predicted": "cat", "count": 1, "examples": [str(image_path)]}]

    assert example_uris(report) == [str(image_path)]
    page = build_html_report(Storage(), report)

    assert page.count('src="data:image/jpeg;base64,') == 2


def test_large_matrix_points_to_json():
    report = build_report()
    names = [f"class-{index}" for index in range(101)]
    report["variants"][0]["confusion"] = {"classes": names, "matrix": [[0] * 101 for _ in names]}

    page = render_html(report)

    assert 'id="confusion-0"' not in page
    assert "confusion.matrix in the JSON report" in page
