"""The worker's check of a job's source and output against its own settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.settings import Settings
from producer.spec import JobSpec, build_spec
from workers.policy import JobRejected, allowed_local_root, check_job, check_job_locations


def spec_for(source: str, output: str) -> JobSpec:
    return build_spec(source=source, output=output, labels=["cat"])


def settings_with(**fields: object) -> Settings:
    return Settings(**fields)


def test_s3_job_without_limits_passes() -> None:
    check_job_locations(spec_for("s3://photos/in/", "s3://results/out/"), settings_with())


def test_s3_job_in_allowed_buckets_passes() -> None:
    settings = settings_with(allowed_buckets=["photos", "results"])
    check_job_locations(spec_for("s3://photos/in/", "s3://results/out/"), settings)


@pytest.mark.parametrize(
    ("source", "output", "named"),
    [("s3://other/in/", "s3://results/out/", "'other'"), ("s3://photos/in/", "s3://other/out/", "'other'")],
)
def test_bucket_outside_allowed_rejected(source: str, output: str, named: str) -> None:
    settings = settings_with(allowed_buckets=["photos", "results"])
    with pytest.raises(JobRejected) as caught:
        check_job_locations(spec_for(source, output), settings)
    assert named in str(caught.value)
    assert "CLIPFLEET_ALLOWED_BUCKETS" in str(caught.value)


def test_local_paths_rejected_without_roots(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(JobRejected) as caught:
        check_job_locations(spec_for(str(tmp_path / "in"), "s3://results/out/"), settings_with())
    assert "CLIPFLEET_LOCAL_ROOTS" in str(caught.value)


def test_local_paths_under_root_pass(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    settings = settings_with(local_roots=[str(tmp_path)])
    check_job_locations(spec_for(str(tmp_path / "in"), str(tmp_path / "out")), settings)


def test_local_output_outside_root_rejected(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    settings = settings_with(local_roots=[str(tmp_path / "in")])
    with pytest.raises(JobRejected) as caught:
        check_job_locations(spec_for(str(tmp_path / "in"), str(tmp_path / "out")), settings)
    assert "output" in str(caught.value)


def test_symlink_out_of_root_rejected(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere, target_is_directory=True)
    settings = settings_with(local_roots=[str(root)])
    with pytest.raises(JobRejected):
        check_job_locations(spec_for(str(root / "link"), str(root / "out")), settings)


def test_local_roots_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFLEET_LOCAL_ROOTS", "/data/a, /data/b")
    assert Settings().local_roots == ["/data/a", "/data/b"]


def test_local_roots_as_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFLEET_LOCAL_ROOTS", '["/data/a,b", "/data/c"]')
    assert Settings().local_roots == ["/data/a,b", "/data/c"]


def test_too_many_labels_rejected() -> None:
    spec = spec_for("s3://photos/in/", "s3://results/out/").model_copy(update={"labels": ["a", "b", "c"]})
    with pytest.raises(JobRejected) as caught:
        check_job(spec, settings_with(max_labels=2))
    assert "CLIPFLEET_MAX_LABELS" in str(caught.value)


def test_too_many_prompts_rejected() -> None:
    spec = spec_for("s3://photos/in/", "s3://results/out/").model_copy(update={"templates": ["a {}.", "b {}."]})
    with pytest.raises(JobRejected) as caught:
        check_job(spec, settings_with(max_prompts=1))
    assert "CLIPFLEET_MAX_PROMPTS" in str(caught.value)


def test_job_within_limits_passes() -> None:
    check_job(spec_for("s3://photos/in/", "s3://results/out/"), settings_with(max_labels=1, max_prompts=1))


def test_local_manifest_of_s3_uris_passes(tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    manifest.write_text("s3://photos/a.jpg\n", encoding="utf-8")
    check_job_locations(spec_for(str(manifest), "s3://results/out/"), settings_with())


def test_local_manifest_images_need_root(tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    manifest.write_text("a.jpg\n", encoding="utf-8")
    spec = spec_for(str(manifest), "s3://results/out/")
    assert allowed_local_root(spec, settings_with()) is None
    assert allowed_local_root(spec, settings_with(local_roots=[str(tmp_path)])) == tmp_path


def test_s3_job_has_no_local_root() -> None:
    assert allowed_local_root(spec_for("s3://photos/in/", "s3://results/out/"), settings_with(local_roots=["/"])) is None
