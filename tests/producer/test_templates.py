"""Template sets, the score threshold and multi-label mode: job spec fields, validation, CLI flags and matching."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from producer.cli import EXIT_USAGE, _spec, build_parser, main
from producer.constants import DEFAULT_TEMPLATES
from producer.enqueue import spec_digest
from producer.errors import InvalidJobSpec
from producer.settings import Settings
from producer.skip import matches
from producer.spec import JobSpec, build_spec
from producer.templates import TEMPLATE_SETS, template_set

SUBMIT = ["submit", "s3://photos/in/", "--labels", "cat,dog", "--output", "s3://results/"]


def make_spec(**fields: Any) -> JobSpec:
    return build_spec(**{"source": "s3://photos/in/", "labels": ["cat", "dog"], "output": "s3://results/", **fields})


def summary_of(spec: JobSpec, **changes: Any) -> dict[str, Any]:
    """The fields of a `_SUCCESS.json` that `skip.matches` compares, as `build_summary` writes them."""
    summary = {
        "model": spec.model,
        "model_revision": spec.model_revision,
        "prompts": spec.prompts,
        "top_k": spec.top_k,
        "threshold": spec.threshold,
        "multi_label": spec.multi_label,
    }
    return {**summary, **changes}


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Clear CLIPFLEET_* settings, and restore the signal handlers that `main` replaces."""
    for name in list(os.environ):
        if name.startswith("CLIPFLEET_"):
            monkeypatch.delenv(name)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for number, handler in handlers.items():
        signal.signal(number, handler)


# --- template sets ----------------------------------------------------------------------------------


def test_default_set_is_default_templates() -> None:
    assert list(TEMPLATE_SETS["default"]) == list(DEFAULT_TEMPLATES)
    assert list(TEMPLATE_SETS["default"]) == ["a photo of a {}."]


def test_photo_set_size_and_placeholders() -> None:
    photo = TEMPLATE_SETS["photo"]
    assert 16 <= len(photo) <= 24
    assert len(set(photo)) == len(photo)
    for template in photo:
        assert template.count("{}") == 1, template


def test_every_set_is_a_valid_spec() -> None:
    for name in TEMPLATE_SETS:
        spec = make_spec(template_set=name)
        assert spec.templates == list(TEMPLATE_SETS[name])


def test_template_set_expanded_into_prompts() -> None:
    spec = make_spec(template_set="photo")
    assert spec.template_set == "photo"
    assert spec.prompts["cat"] == [template.replace("{}", "cat") for template in TEMPLATE_SETS["photo"]]


def test_stored_spec_keeps_expanded_templates() -> None:
    stored = make_spec(template_set="photo").model_dump_json()
    read_back = JobSpec.model_validate_json(stored)
    assert read_back.templates == list(TEMPLATE_SETS["photo"])
    assert read_back.template_set == "photo"


def test_stored_templates_win_over_set() -> None:
    # A spec stored before a set's wording changed keeps the templates it was submitted with.
    spec = JobSpec(source="s3://photos/in/", labels=["cat"], output="s3://results/", template_set="photo", templates=["old {}"])
    assert spec.templates == ["old {}"]


def test_unknown_set_names_known_sets() -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        make_spec(template_set="photos")
    assert "'photos'" in str(caught.value)
    assert "known sets: default, photo" in str(caught.value)


def test_unknown_set_lookup_raises() -> None:
    with pytest.raises(InvalidJobSpec, match="unknown template set 'nope'"):
        template_set("nope")


def test_template_set_and_templates_exclusive() -> None:
    with pytest.raises(InvalidJobSpec, match="both template_set 'photo' and templates were given"):
        make_spec(template_set="photo", templates=["a drawing of a {}."])


def test_template_set_rejected_with_prompt_mapping() -> None:
    with pytest.raises(InvalidJobSpec, match="labels are a {label: \\[prompts\\]} mapping"):
        make_spec(template_set="photo", labels={"cat": ["a kitten"]})


def test_old_spec_without_new_fields_readable() -> None:
    old = '{"source": "s3://photos/in/", "labels": ["cat"], "output": "s3://results/", "templates": ["a photo of a {}."]}'
    spec = JobSpec.model_validate_json(old)
    assert (spec.template_set, spec.threshold, spec.multi_label) == (None, None, False)


# --- threshold ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_probability_threshold_accepted(threshold: float) -> None:
    assert make_spec(threshold=threshold).threshold == threshold


@pytest.mark.parametrize("threshold", [-1.0, -0.2, 0.3, 1.0])
def test_cosine_threshold_accepted(threshold: float) -> None:
    assert make_spec(threshold=threshold, multi_label=True).threshold == threshold


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_probability_threshold_out_of_range(threshold: float) -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        make_spec(threshold=threshold)
    assert f"threshold {threshold!r} is outside 0 to 1" in str(caught.value)
    assert "give a threshold from 0 to 1" in str(caught.value)


def test_negative_threshold_suggests_multi_label() -> None:
    with pytest.raises(InvalidJobSpec, match=r"add --multi-label \(multi_label=True\) to threshold cosine similarities"):
        make_spec(threshold=-0.1)


@pytest.mark.parametrize("threshold", [-1.5, 1.01])
def test_cosine_threshold_out_of_range(threshold: float) -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        make_spec(threshold=threshold, multi_label=True)
    assert f"threshold {threshold!r} is outside -1 to 1" in str(caught.value)


def test_nan_threshold_rejected() -> None:
    with pytest.raises(InvalidJobSpec, match="threshold nan is not a finite number"):
        make_spec(threshold=float("nan"))


# --- CLI flags ----------------------------------------------------------------------------------------


def test_cli_flags_reach_spec(clean_environment: None) -> None:
    args = build_parser().parse_args([*SUBMIT, "--template-set", "photo", "--threshold", "0.25", "--multi-label"])
    spec = _spec(Settings(), args)
    assert spec.template_set == "photo"
    assert spec.templates == list(TEMPLATE_SETS["photo"])
    assert spec.threshold == 0.25
    assert spec.multi_label is True


def test_cli_defaults_unchanged(clean_environment: None) -> None:
    spec = _spec(Settings(), build_parser().parse_args(SUBMIT))
    assert (spec.template_set, spec.threshold, spec.multi_label) == (None, None, False)
    assert spec.templates == list(DEFAULT_TEMPLATES)


def test_cli_template_and_set_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*SUBMIT, "--template", "a {}", "--template-set", "photo"])
    assert caught.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_unknown_set_lists_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*SUBMIT, "--template-set", "nope"])
    assert caught.value.code == EXIT_USAGE
    error = capsys.readouterr().err
    assert "'nope'" in error
    assert "default" in error
    assert "photo" in error


def test_cli_threshold_out_of_range_exits_usage(clean_environment: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*SUBMIT, "--threshold", "2"])
    assert code == EXIT_USAGE
    assert "threshold 2.0 is outside 0 to 1" in capsys.readouterr().err


# --- resume and skip-existing matching ----------------------------------------------------------------


def test_spec_digest_of_default_options_unchanged() -> None:
    # The digest of this spec before the scoring and embedding options existed, so `--resume` still finds
    # jobs submitted then.
    spec = JobSpec(source="s3://photos/2026/", labels=["cat", "dog"], output="s3://results/")

    assert spec_digest(spec) == "5b02e81a29ec1df900c7fcbb09643ac52527e521b333a6ab9696c0c96ad14268"


def test_spec_digest_changes_with_threshold() -> None:
    assert spec_digest(make_spec()) != spec_digest(make_spec(threshold=0.5))


def test_spec_digest_changes_with_multi_label() -> None:
    assert spec_digest(make_spec()) != spec_digest(make_spec(multi_label=True))


def test_skip_matches_same_options() -> None:
    spec = make_spec(threshold=0.3, multi_label=True)
    assert matches(summary_of(spec), spec)


def test_skip_rejects_other_threshold() -> None:
    spec = make_spec(threshold=0.3, multi_label=True)
    assert not matches(summary_of(spec, threshold=0.2), spec)


def test_skip_rejects_other_mode() -> None:
    spec = make_spec(multi_label=True)
    assert not matches(summary_of(spec, multi_label=False), spec)


def test_skip_old_summary_matches_defaults() -> None:
    spec = make_spec()
    old = summary_of(spec)
    del old["threshold"], old["multi_label"]
    assert matches(old, spec)
    assert not matches(old, make_spec(threshold=0.5))
