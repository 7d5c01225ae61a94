"""The job specification: what to classify, against which labels, with which model, and where to write."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from producer.constants import (
    DEFAULT_IMAGE_EXTENSIONS,
    DEFAULT_MODEL,
    DEFAULT_TEMPLATES,
)
from producer.errors import InvalidJobSpec
from producer.uris import S3Uri, parse_location

MAX_BATCH_SIZE = 4096
MAX_TOP_K = 1000
MAX_LABEL_CHARS = 1000


class JobSpec(BaseModel):
    """A validated, immutable job. Labels are stripped and unique; every template contains `{}` once.

    `labels` is either a list of class names, each expanded with every template, or a mapping from class
    name to its own list of prompts (templates are then not applied to that class).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    labels: list[str] | dict[str, list[str]]
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    output: str
    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_IMAGE_EXTENSIONS))

    @field_validator("source", "output")
    @classmethod
    def _check_location(cls, value: str) -> str:
        location = parse_location(value)
        return str(location)

    @field_validator("labels", mode="before")
    @classmethod
    def _check_labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"labels must be a list of names, not the string {value!r}; split it first")
        if isinstance(value, dict):
            names = _clean_labels(list(value))
            return {name: _clean_prompts(name, value[raw]) for name, raw in zip(names, value)}
        return _clean_labels(list(value))

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("templates must not be empty; the default is ['a photo of a {}.']")
        for template in value:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain '{{}}' exactly once, where the label goes")
        if len(set(value)) != len(value):
            raise ValueError(f"templates contain duplicates: {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must be a Hugging Face hub id or a local directory, not empty")
        return value.strip()

    @field_validator("extensions")
    @classmethod
    def _check_extensions(cls, value: list[str]) -> list[str]:
        cleaned = [ext.strip().lower() for ext in value]
        for ext in cleaned:
            if not ext.startswith(".") or len(ext) < 2:
                raise ValueError(f"extension {ext!r} must start with a dot, like '.jpg'")
        if not cleaned:
            raise ValueError("extensions must not be empty")
        return sorted(set(cleaned))

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    @property
    def prompts(self) -> dict[str, list[str]]:
        """Each label with its prompts: the templates filled in, or the label's own prompt list."""
        if isinstance(self.labels, dict):
            return {name: list(prompts) for name, prompts in self.labels.items()}
        return {name: [template.replace("{}", name) for template in self.templates] for name in self.labels}

    @property
    def source_is_s3(self) -> bool:
        return self.source.startswith("s3://")

    @property
    def output_is_s3(self) -> bool:
        return self.output.startswith("s3://")

    def prompts_digest(self) -> str:
        """Return a hex digest that changes with the model, its revision and any prompt."""
        # Label order matters: cached embeddings are rows in label order.
        payload = json.dumps([self.model, self.model_revision, list(self.prompts.items())], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def buckets(self) -> set[str]:
        """Return the S3 buckets the job reads or writes directly (manifest entries are checked as listed)."""
        found = set()
        for value in (self.source, self.output):
            location = parse_location(value)
            if isinstance(location, S3Uri):
                found.add(location.bucket)
        return found


def _clean_labels(raw: list[Any]) -> list[str]:
    if not raw:
        raise ValueError("labels must not be empty: give at least one class name")
    names = []
    for item in raw:
        if not isinstance(item, str):
            raise ValueError(f"label {item!r} must be a string")
        name = item.strip()
        if not name:
            raise ValueError(f"label {item!r} is empty or whitespace only")
        if len(name) > MAX_LABEL_CHARS:
            raise ValueError(f"label {name[:40]!r}... has {len(name)} characters; the maximum is {MAX_LABEL_CHARS}")
        names.append(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"labels must be unique after stripping spaces; duplicated: {duplicates!r}")
    return names


def _clean_prompts(label: str, raw: Any) -> list[str]:
    if isinstance(raw, str) or not raw:
        raise ValueError(f"label {label!r} must map to a non-empty list of prompts, not {raw!r}")
    prompts = [str(prompt).strip() for prompt in raw]
    if not all(prompts):
        raise ValueError(f"label {label!r} has an empty prompt in {raw!r}")
    return prompts


def build_spec(**fields: Any) -> JobSpec:
    """Validate `fields` into a JobSpec.

    Raises InvalidJobSpec whose message names each invalid field, its value and the fix.
    """
    try:
        spec = JobSpec(**fields)
    except ValidationError as e:
        raise InvalidJobSpec(_describe(e)) from e
    if spec.source == spec.output:
        raise InvalidJobSpec(f"invalid job spec:\n  output: {spec.output!r} must differ from the source")
    return spec


def _describe(error: ValidationError) -> str:
    lines = ["invalid job spec:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {message} (got {_short(item.get('input'))})")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def local_root(spec: JobSpec) -> Path | None:
    """Return the local source folder (or manifest's folder) that local image paths must stay under."""
    if spec.source_is_s3:
        return None
    path = Path(spec.source)
    return path if path.is_dir() else path.parent
