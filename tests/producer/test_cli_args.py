"""Tests for the `clipfleet` command line's argument handling, and for the producer's light imports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.cli import EXIT_ERROR, EXIT_USAGE, build_parser, main, read_labels
from producer.errors import InvalidJobSpec
from producer.spec import build_spec
from producer.state import JobStore

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
IMPORT_TIMEOUT_S = 120


def parse_labels_file(path: Path) -> list[str] | dict[str, list[str]]:
    args = build_parser().parse_args(["submit", "s3://photos/in/", "--labels-file", str(path), "--output", "s3://results/"])
    return read_labels(args)


@pytest.fixture
def cli_environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the CLI at the test Redis, clear other CLIPFLEET_* settings, and restore the SIGTERM handler.

    `main` installs its own SIGTERM handler, which would otherwise outlive the test.
    """
    for name in list(os.environ):
        if name.startswith("CLIPFLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLIPFLEET_REDIS_URL", redis_url)
    previous_handler = signal.getsignal(signal.SIGTERM)
    yield redis_url
    signal.signal(signal.SIGTERM, previous_handler)


# --- labels ---------------------------------------------------------------------------------------


def test_labels_option_split_on_commas() -> None:
    args = build_parser().parse_args(["submit", "s3://photos/in/", "--labels", "cat,dog,red car", "--output", "s3://results/"])

    assert read_labels(args) == ["cat", "dog", "red car"]


def test_labels_file_skips_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("# animals\ncat\n\n  dog  \n   \n  # indented comment\nred car\n", encoding="utf-8")

    assert parse_labels_file(path) == ["cat", "dog", "red car"]


def test_labels_file_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n", encoding="utf-8-sig")  # as Windows Notepad saves UTF-8

    assert parse_labels_file(path) == ["cat", "dog"]


def test_labels_file_non_ascii(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("chat\n\u732b\ncaf\u00e9\n", encoding="utf-8")

    assert parse_labels_file(path) == ["chat", "\u732b", "caf\u00e9"]


def test_json_labels_file_mapping(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    labels = {"cat": ["a photo of a cat", "a kitten"], "dog": ["a photo of a dog"]}
    path.write_text(json.dumps(labels), encoding="utf-8")

    assert parse_labels_file(path) == labels


def test_json_labels_file_list(tmp_path: Path) -> None:
    path = tmp_path / "labels.JSON"
    path.write_text('["cat", "dog"]', encoding="utf-8")

    assert parse_labels_file(path) == ["cat", "dog"]


def test_json_labels_mapping_builds_prompts(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text('{"cat": ["a photo of a cat", "a kitten"]}', encoding="utf-8")

    spec = build_spec(source="s3://photos/in/", labels=parse_labels_file(path), output="s3://results/")

    assert spec.prompts == {"cat": ["a photo of a cat", "a kitten"]}


def test_invalid_json_labels_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text('{"cat": ["a kitten"', encoding="utf-8")

    with pytest.raises(InvalidJobSpec, match="labels.json' is not valid JSON"):
        parse_labels_file(path)


def test_labels_and_labels_file_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(
            ["submit", "s3://photos/in/", "--labels", "cat", "--labels-file", str(tmp_path / "l.txt"), "--output", "s3://r/"]
        )

    assert caught.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


# --- main -----------------------------------------------------------------------------------------


def test_missing_labels_file_exits_usage(tmp_path: Path, cli_environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-labels.txt"

    code = main(["submit", "s3://photos/in/", "--labels-file", str(missing), "--output", "s3://results/"])

    assert code == EXIT_USAGE
    assert f"--labels-file '{missing}' cannot be read" in capsys.readouterr().err


def test_status_unknown_job_exits_error(cli_environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "20260101-000000-deadbeef"])

    assert code == EXIT_ERROR
    assert "'20260101-000000-deadbeef' not found" in capsys.readouterr().err


def test_status_known_job_prints_json(cli_environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = JobStore.from_url(cli_environment)
    store.create("20260101-000000-0123abcd", build_spec(source="s3://photos/in/", labels=["cat"], output="s3://results/"))
    store.redis.close()

    code = main(["status", "20260101-000000-0123abcd", "--json"])

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["state"] == "queued"
    assert printed["total"] is None


def test_cancel_unknown_job_exits_error(cli_environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["cancel", "20260101-000000-deadbeef"])

    assert code == EXIT_ERROR
    assert "'20260101-000000-deadbeef' not found" in capsys.readouterr().err


def test_submit_without_redis_url_exits_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CLIPFLEET_REDIS_URL", raising=False)
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["submit", "s3://photos/in/", "--labels", "cat", "--output", "s3://results/"])
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    assert code == EXIT_ERROR
    assert "CLIPFLEET_REDIS_URL is not set" in capsys.readouterr().err


# --- imports --------------------------------------------------------------------------------------

HEAVY_MODULES = ("torch", "transformers", "workers")
IMPORT_CHECK = (
    "import sys\n"
    "import producer, producer.cli, producer.client, producer.embedded\n"
    f"print(sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules))\n"
)


def test_producer_import_stays_light() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT_S,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
