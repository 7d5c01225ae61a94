"""Tests for producer.spec: validation of job specs, label and prompt expansion, the prompts digest."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from producer.errors import InvalidJobSpec
from producer.spec import JobSpec, build_spec, check_job_size, find_long_prompts, check_text

SOURCE = "s3://photos/2026/"
OUTPUT = "s3://results/"


def spec_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"source": SOURCE, "labels": ["cat", "dog"], "output": OUTPUT}
    fields.update(overrides)
    return fields


def rejection_message(**overrides: Any) -> str:
    with pytest.raises(InvalidJobSpec) as caught:
        build_spec(**spec_fields(**overrides))
    return str(caught.value)


# Each case: the field set to a bad value, that value, and a text the message must quote.
INVALID_FIELDS = [
    pytest.param("labels", [], "[]", id="labels-empty"),
    pytest.param("labels", ["cat", " cat"], "' cat'", id="labels-duplicate-after-strip"),
    pytest.param("labels", ["cat", "   "], "'   '", id="labels-whitespace-only"),
    pytest.param("labels", "cat,dog", "'cat,dog'", id="labels-plain-string"),
    pytest.param("labels", ["cat", 7], "7", id="labels-not-a-string"),
    pytest.param("labels", {"cat": []}, "[]", id="labels-mapping-empty-prompts"),
    pytest.param("labels", {"cat": "a photo of a cat"}, "'a photo of a cat'", id="labels-mapping-string-prompts"),
    pytest.param("templates", ["a photo"], "'a photo'", id="template-without-placeholder"),
    pytest.param("templates", ["a {} and a {}"], "'a {} and a {}'", id="template-two-placeholders"),
    pytest.param("templates", [], "[]", id="templates-empty"),
    pytest.param("source", "http://x", "'http://x'", id="source-http"),
    pytest.param("source", "file:///x", "'file:///x'", id="source-file-uri"),
    pytest.param("source", "s3://ab/x", "'ab'", id="source-bucket-too-short"),
    pytest.param("source", "s3://Bad_Bucket/x", "'Bad_Bucket'", id="source-bucket-invalid-characters"),
    pytest.param("source", "", "''", id="source-empty"),
    pytest.param("output", "http://x", "'http://x'", id="output-http"),
    pytest.param("output", "s3://ab/x", "'ab'", id="output-bucket-too-short"),
    pytest.param("batch_size", 0, "0", id="batch-size-zero"),
    pytest.param("batch_size", 5000, "5000", id="batch-size-above-maximum"),
    pytest.param("top_k", 0, "0", id="top-k-zero"),
    pytest.param("extensions", ["jpg"], "'jpg'", id="extension-without-dot"),
    pytest.param("extensions", ["."], "'.'", id="extension-dot-only"),
    pytest.param("extensions", [], "[]", id="extensions-empty"),
    pytest.param("model", "  ", "'  '", id="model-blank"),
]


@pytest.mark.parametrize(("field", "value", "quoted"), INVALID_FIELDS)
def test_invalid_field_message_names_field(field: str, value: Any, quoted: str) -> None:
    message = rejection_message(**{field: value})

    assert f"{field}:" in message


@pytest.mark.parametrize(("field", "value", "quoted"), INVALID_FIELDS)
def test_invalid_field_message_quotes_value(field: str, value: Any, quoted: str) -> None:
    message = rejection_message(**{field: value})

    assert quoted in message


def test_invalid_spec_is_value_error() -> None:
    with pytest.raises(ValueError):
        build_spec(**spec_fields(labels=[]))


def test_several_invalid_fields_all_named() -> None:
    message = rejection_message(batch_size=0, top_k=0)

    assert "batch_size:" in message
    assert "top_k:" in message


def test_unknown_field_rejected() -> None:
    message = rejection_message(label=["cat"])

    assert "label:" in message


def test_labels_are_stripped() -> None:
    spec = build_spec(**spec_fields(labels=["  cat", "dog  ", " red car "]))

    assert spec.labels == ["cat", "dog", "red car"]


def test_mapping_labels_stripped() -> None:
    spec = build_spec(**spec_fields(labels={" cat ": [" a photo of a cat ", "a kitten"]}))

    assert spec.labels == {"cat": ["a photo of a cat", "a kitten"]}


def test_valid_s3_source_kept_unchanged() -> None:
    spec = build_spec(**spec_fields(source="s3://photos/2026/"))

    assert spec.source == "s3://photos/2026/"


def test_local_source_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    spec = build_spec(**spec_fields(source="photos/2026"))

    assert spec.source == str(tmp_path / "photos" / "2026")


def test_local_output_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    spec = build_spec(**spec_fields(output="results"))

    assert spec.output == str(tmp_path / "results")


def test_source_equal_to_output_rejected() -> None:
    message = rejection_message(source="s3://photos/2026/", output="s3://photos/2026/")

    assert "'s3://photos/2026/' must differ from the source" in message


def test_relative_and_absolute_same_folder_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    message = rejection_message(source="photos", output=str(tmp_path / "photos"))

    assert "must differ from the source" in message


def test_mapping_labels_give_own_prompts() -> None:
    spec = build_spec(**spec_fields(labels={"cat": ["a photo of a cat", "a kitten"]}))

    assert spec.prompts == {"cat": ["a photo of a cat", "a kitten"]}


def test_mapping_labels_ignore_templates() -> None:
    spec = build_spec(**spec_fields(labels={"cat": ["a kitten"]}, templates=["a drawing of a {}."]))

    assert spec.prompts == {"cat": ["a kitten"]}


def test_list_labels_expand_every_template() -> None:
    spec = build_spec(**spec_fields(labels=["cat", "dog"], templates=["a photo of a {}.", "a drawing of a {}."]))

    assert spec.prompts == {
        "cat": ["a photo of a cat.", "a drawing of a cat."],
        "dog": ["a photo of a dog.", "a drawing of a dog."],
    }


def test_default_template_applied() -> None:
    spec = build_spec(**spec_fields(labels=["cat"]))

    assert spec.prompts == {"cat": ["a photo of a cat."]}


def test_label_names_keep_order() -> None:
    spec = build_spec(**spec_fields(labels={"zebra": ["a zebra"], "ant": ["an ant"]}))

    assert spec.label_names == ["zebra", "ant"]


def test_extensions_lower_cased_and_sorted() -> None:
    spec = build_spec(**spec_fields(extensions=[".PNG", " .Jpg ", ".png"]))

    assert spec.extensions == [".jpg", ".png"]


def digest(**overrides: Any) -> str:
    return build_spec(**spec_fields(**overrides)).prompts_digest()


def test_prompts_digest_stable() -> None:
    assert digest() == digest()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"templates": ["a drawing of a {}."]}, id="template"),
        pytest.param({"labels": ["cat", "wolf"]}, id="label"),
        pytest.param({"labels": ["dog", "cat"]}, id="label-order"),
        pytest.param({"model": "openai/clip-vit-large-patch14"}, id="model"),
        pytest.param({"model_revision": "refs/pr/1"}, id="model-revision"),
        pytest.param({"labels": {"cat": ["a photo of a cat."], "dog": ["a photo of a dog"]}}, id="one-prompt"),
    ],
)
def test_prompts_digest_changes(overrides: dict[str, Any]) -> None:
    assert digest(**overrides) != digest()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"batch_size": 8}, id="batch-size"),
        pytest.param({"top_k": 1}, id="top-k"),
        pytest.param({"source": "s3://other-photos/"}, id="source"),
        pytest.param({"output": "s3://other-results/"}, id="output"),
        pytest.param({"labels": [" cat", "dog "]}, id="label-spaces"),
    ],
)
def test_prompts_digest_ignores_non_prompt_fields(overrides: dict[str, Any]) -> None:
    assert digest(**overrides) == digest()


def test_spec_json_round_trip() -> None:
    spec = build_spec(**spec_fields(labels={"cat": ["a kitten"]}, extensions=[".JPG"]))

    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_buckets_of_source_and_output() -> None:
    spec = build_spec(**spec_fields(source="s3://photos/2026/", output="s3://results/run/"))

    assert spec.buckets() == {"photos", "results"}


# --- label count and prompt length -----------------------------------------------------------------

def test_label_count_at_limit_accepted() -> None:
    spec = build_spec(**spec_fields(labels=[f"label {i}" for i in range(20_000)]))

    check_job_size(spec, 20_000, 100_000)

    assert len(spec.labels) == 20_000


def test_label_count_over_limit_rejected() -> None:
    spec = build_spec(**spec_fields(labels=[f"label {i}" for i in range(50_000)]))

    with pytest.raises(InvalidJobSpec) as caught:
        check_job_size(spec, 20_000, 100_000)

    message = str(caught.value)
    assert "50000 labels" in message
    assert "maximum is 20000" in message
    assert "CLIPFLEET_MAX_LABELS" in message


def test_duplicate_labels_found_among_many() -> None:
    labels = [f"label {i}" for i in range(50_000)] + ["label 7 "]

    message = rejection_message(labels=labels)

    assert "duplicated: ['label 7']" in message


LONG_LABEL = "x" * 80  # one token per character in the tiny checkpoint's merge-free vocabulary


def test_long_prompt_warned(tiny_clip_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = build_spec(**spec_fields(labels=["cat", LONG_LABEL], model=str(tiny_clip_dir)))

    with caplog.at_level(logging.WARNING, logger="producer.spec"):
        long_prompts = find_long_prompts(spec)

    # "a photo of a xxx...x." is 9 letters without spaces, 80 x, a period, then start and end tokens.
    assert long_prompts == [(LONG_LABEL, f"a photo of a {LONG_LABEL}.", 92)]
    assert len(caplog.records) == 1
    assert f"Label {LONG_LABEL!r}" in caplog.records[0].getMessage()
    assert "92 tokens" in caplog.records[0].getMessage()
    assert "at most 77" in caplog.records[0].getMessage()


def test_prompt_at_limit_not_warned(tiny_clip_dir: Path) -> None:
    label = "x" * 65  # 9 + 65 + 1 + 2 = 77 tokens
    spec = build_spec(**spec_fields(labels=[label], model=str(tiny_clip_dir)))

    assert find_long_prompts(spec) == []


def test_prompt_limit_read_from_config(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 16
    (model / "config.json").write_text(json.dumps(config))
    spec = build_spec(**spec_fields(labels=["cat", "xxxxx"], model=str(model)))

    # "a photo of a cat." is 9 + 3 + 1 + 2 = 15 tokens; with "xxxxx" it is 17.
    assert find_long_prompts(spec) == [("xxxxx", "a photo of a xxxxx.", 17)]


def test_prompt_check_skipped_without_tokenizer(tiny_clip_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, model)
    (model / "tokenizer.json").unlink()
    spec = build_spec(**spec_fields(labels=[LONG_LABEL], model=str(model)))

    with caplog.at_level(logging.DEBUG, logger="producer.spec"):
        long_prompts = find_long_prompts(spec)

    assert long_prompts == []
    assert any("the worker checks prompt lengths" in record.getMessage() for record in caplog.records)


def test_prompt_check_skipped_for_uncached_hub_model(caplog: pytest.LogCaptureFixture) -> None:
    spec = build_spec(**spec_fields(labels=[LONG_LABEL], model="clipfleet-tests/model-not-in-cache"))

    with caplog.at_level(logging.DEBUG, logger="producer.spec"):
        long_prompts = find_long_prompts(spec)

    assert long_prompts == []
    assert any("the worker checks prompt lengths" in record.getMessage() for record in caplog.records)


def test_prompt_count_over_limit_rejected() -> None:
    spec = build_spec(**spec_fields(labels=["cat", "dog"], templates=["a {}.", "one {}.", "two {}."]))

    with pytest.raises(InvalidJobSpec) as caught:
        check_job_size(spec, 20_000, 5)

    assert "6 prompts" in str(caught.value)
    assert "CLIPFLEET_MAX_PROMPTS" in str(caught.value)


def test_prompt_count_at_limit_accepted() -> None:
    spec = build_spec(**spec_fields(labels={"cat": ["a cat", "a kitten"], "dog": ["a dog"]}))

    check_job_size(spec, 20_000, 3)

    assert sum(len(prompts) for prompts in spec.prompts.values()) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("labels", ["cat", "\x1b]0;title\x07dog"]),
        ("labels", ["cat", "\ud800"]),
        ("labels", {"cat": ["a cat", "a\x00cat"]}),
        ("labels", {"cat": ["x" * 1001]}),
        ("templates", ["a photo of a {}.\r"]),
        ("templates", ["a photo of a {}." + "x" * 1000]),
    ],
)
def test_unusable_prompt_text_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        build_spec(**spec_fields(**{field: value}))

    assert field in str(caught.value)


def test_control_characters_named() -> None:
    with pytest.raises(ValueError) as caught:
        check_text("label", "cat\x1b\x07")

    assert "U+001B, U+0007" in str(caught.value)


def test_non_ascii_text_accepted() -> None:
    spec = build_spec(**spec_fields(labels=["chat noir", "café", "猫", "🐱"]))

    assert spec.label_names == ["chat noir", "café", "猫", "🐱"]
