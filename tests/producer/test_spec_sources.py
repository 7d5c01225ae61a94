"""Tests for the `source` field of producer.spec.JobSpec: one source or a list, and the checks on lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from producer.cli import build_parser
from producer.errors import InvalidJobSpec
from producer.settings import Settings
from producer.spec import JobSpec, build_spec, local_root
from workers.policy import JobRejected, check_job_locations

OUTPUT = "s3://results/out/"


def build(source: Any, output: str = OUTPUT) -> JobSpec:
    return build_spec(source=source, labels=["cat"], output=output)


def rejection(source: Any) -> str:
    with pytest.raises(InvalidJobSpec) as raised:
        build(source)
    return str(raised.value)


def test_single_string_kept() -> None:
    spec = build("s3://photos/2026/")

    assert spec.source == "s3://photos/2026/"
    assert spec.sources == ["s3://photos/2026/"]


def test_list_kept_in_order() -> None:
    spec = build(["s3://photos/b/", "s3://photos/a/"])

    assert spec.source == ["s3://photos/b/", "s3://photos/a/"]
    assert spec.sources == ["s3://photos/b/", "s3://photos/a/"]


def test_old_spec_json_still_valid() -> None:
    stored = json.dumps({"source": "s3://photos/2026/", "labels": ["cat"], "output": OUTPUT})

    spec = JobSpec.model_validate_json(stored)

    assert spec.sources == ["s3://photos/2026/"]


def test_list_round_trips_through_json() -> None:
    spec = build(["s3://photos/a/", "s3://other/b/"])

    assert JobSpec.model_validate_json(spec.model_dump_json()).source == ["s3://photos/a/", "s3://other/b/"]


def test_empty_list_rejected() -> None:
    assert "source must not be an empty list" in rejection([])


def test_same_source_twice_rejected() -> None:
    assert "source 's3://photos/a/' is listed twice" in rejection(["s3://photos/a/", "s3://photos/a/"])


def test_same_folder_spelled_twice_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()

    message = rejection(["photos", str(tmp_path / "photos")])

    assert f"sources 'photos' and '{tmp_path / 'photos'}' are the same location" in message


@pytest.mark.parametrize(("outer", "inner"), [
    ("s3://photos/a/", "s3://photos/a/x/"),
    ("s3://photos/a", "s3://photos/ab/"),
    ("s3://photos/", "s3://photos/a/"),
])
def test_nested_prefixes_rejected(outer: str, inner: str) -> None:
    message = rejection([inner, outer])

    assert f"sources '{inner}' and '{outer}' overlap" in message


def test_same_key_in_other_buckets_accepted() -> None:
    assert build(["s3://photos/a/", "s3://other/a/"]).sources == ["s3://photos/a/", "s3://other/a/"]


def test_manifest_under_prefix_accepted() -> None:
    assert len(build(["s3://photos/", "s3://photos/lists/list.txt"]).sources) == 2


def test_nested_local_folders_rejected(tmp_path: Path) -> None:
    message = rejection([str(tmp_path), str(tmp_path / "sub")])

    assert f"sources '{tmp_path}' and '{tmp_path / 'sub'}' overlap" in message


def test_two_local_sources_rejected(tmp_path: Path) -> None:
    message = rejection([str(tmp_path / "a"), str(tmp_path / "b")])

    assert "are both local; a job may have one local source" in message


def test_output_equal_to_a_source_rejected() -> None:
    with pytest.raises(InvalidJobSpec, match="must differ from the source"):
        build(["s3://photos/a/", "s3://results/out/"])


def test_buckets_cover_every_source() -> None:
    spec = build(["s3://photos/a/", "s3://other/b/list.txt"])

    assert spec.buckets() == {"photos", "other", "results"}


def test_local_root_of_mixed_sources(tmp_path: Path) -> None:
    spec = build(["s3://photos/a/", str(tmp_path)])

    assert local_root(spec) == tmp_path
    assert spec.source_is_s3 is False


def test_local_root_none_for_s3_only() -> None:
    spec = build(["s3://photos/a/", "s3://other/b/"])

    assert local_root(spec) is None
    assert spec.source_is_s3 is True


def test_worker_checks_every_prefix_bucket() -> None:
    spec = build(["s3://photos/a/", "s3://other/b/"])
    settings = Settings(allowed_buckets=["photos", "results"])

    with pytest.raises(JobRejected, match="'s3://other/b/' is in bucket 'other'"):
        check_job_locations(spec, settings)


def test_worker_skips_inventory_manifest_bucket() -> None:
    spec = build(["s3://photos/a/", "s3://reports/inventory/manifest.json"])
    settings = Settings(allowed_buckets=["photos", "results"])

    check_job_locations(spec, settings)  # the report is read at submit, so the worker needs no access to it


def test_cli_accepts_several_sources() -> None:
    args = build_parser().parse_args(["submit", "s3://photos/a/", "s3://photos/b/", "--labels", "cat", "--output", OUTPUT])

    assert args.source == ["s3://photos/a/", "s3://photos/b/"]
