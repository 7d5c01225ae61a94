"""The job specification: what to classify, against which labels, with which model, and where to write."""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from producer.constants import (
    DEFAULT_IMAGE_EXTENSIONS,
    DEFAULT_MODEL,
    DEFAULT_TEMPLATES,
    MAX_BATCH_SIZE,
)
from producer.embeddings import (
    DEFAULT_EMBEDDING_DTYPE,
    EmbeddingDtype,
    RelabelSource,
    check_embedding_options,
    check_embeddings_dtype,
)
from producer.errors import InvalidJobSpec
from producer.sources import is_read_at_submit
from producer.templates import check_template_choice, expand_template_set
from producer.thresholds import check_threshold
from producer.uris import S3Uri, parse_location

logger = logging.getLogger(__name__)

MAX_TOP_K = 1000
MAX_LABEL_CHARS = 1000


class JobSpec(BaseModel):
    """A validated, immutable job. Labels are stripped and unique; every template contains `{}` once.

    `labels` is either a list of class names, each expanded with every template, or a mapping from class
    name to its own list of prompts (templates are then not applied to that class).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str | list[str]  # one source, or a non-empty list listed in order
    labels: list[str] | dict[str, list[str]]
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    output: str
    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_IMAGE_EXTENSIONS))
    # Result shard format; the Parquet schema is producer.formats.RESULT_SCHEMA.
    format: Literal["jsonl", "parquet"] = "jsonl"
    # The built-in set (producer.templates.TEMPLATE_SETS) that `templates` was filled from, or None.
    template_set: str | None = None
    # Score each label by its raw cosine similarity instead of a softmax over the labels (see workers.rows).
    multi_label: bool = False
    # Lowest score kept in top_k: 0 to 1 for softmax probabilities, -1 to 1 for multi-label cosines.
    threshold: float | None = None
    # Each image's normalised embedding written next to its shard; see producer.embeddings.
    store_embeddings: bool = False
    embeddings_dtype: EmbeddingDtype = DEFAULT_EMBEDDING_DTYPE
    # Set for a relabel job: it scores this job's stored embeddings, and `source` is that job's result folder.
    relabel: RelabelSource | None = None

    @model_validator(mode="after")
    def _check_embedding_fields(self) -> "JobSpec":
        check_embedding_options(self.store_embeddings, self.embeddings_dtype, self.relabel, self.source)
        return self

    @model_validator(mode="before")
    @classmethod
    def _expand_template_set(cls, data: Any) -> Any:
        return expand_template_set(data)

    @field_validator("embeddings_dtype")
    @classmethod
    def _check_embeddings_dtype(cls, value: EmbeddingDtype, info: ValidationInfo) -> EmbeddingDtype:
        check_embeddings_dtype(value, bool(info.data.get("store_embeddings", False)))
        return value

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, value: float | None, info: ValidationInfo) -> float | None:
        return check_threshold(value, bool(info.data.get("multi_label", False)))

    @field_validator("source")
    @classmethod
    def _check_sources(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            return str(parse_location(value))
        return check_sources(value)

    @field_validator("output")
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
            check_text("template", template)
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
    def sources(self) -> list[str]:
        """The job's sources in listing order, a list even when `source` is one string."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @property
    def source_is_s3(self) -> bool:
        """True when every source is in S3, so the job reads no local image."""
        return all(source.startswith("s3://") for source in self.sources)

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
        for value in (*self.sources, self.output):
            location = parse_location(value)
            if isinstance(location, S3Uri):
                found.add(location.bucket)
        return found


def check_sources(values: list[str]) -> list[str]:
    """Return the sources normalised by `parse_location`, for a job with a list of sources.

    Raises ValueError, naming both values where two clash, for an empty list, a source given twice, two
    S3 prefixes or two local folders where one contains the other (their images would be classified
    twice), or more than one local source.
    """
    if not values:
        raise ValueError("source must not be an empty list: give at least one s3:// prefix, manifest or folder")
    cleaned = [str(parse_location(value)) for value in values]
    seen: dict[str, str] = {}
    for raw, value in zip(values, cleaned):
        if value in seen and raw == seen[value]:
            raise ValueError(f"source {raw!r} is listed twice; list each source once")
        if value in seen:
            raise ValueError(f"sources {seen[value]!r} and {raw!r} are the same location {value!r}; list it once")
        seen[value] = raw
    _check_nested(cleaned)
    local = [value for value in cleaned if not value.startswith("s3://")]
    if len(local) > 1:
        # NOTE: workers confine a job's local reads to one folder (workers.policy.allowed_local_root),
        # so a job may name one local folder or manifest.
        raise ValueError(
            f"sources {local[0]!r} and {local[1]!r} are both local; a job may have one local source, "
            "so list the files in one manifest or submit one job per folder"
        )
    return cleaned


def _check_nested(sources: list[str]) -> None:
    """Raise ValueError when one S3 prefix or local folder among `sources` contains another."""
    listed = [source for source in sources if not is_read_at_submit(source)]
    for index, first in enumerate(listed):
        for second in listed[index + 1:]:
            if _contains(first, second) or _contains(second, first):
                raise ValueError(
                    f"sources {first!r} and {second!r} overlap: one contains the other, so their images would "
                    "be classified twice; keep only the outer one"
                )


def _contains(outer: str, inner: str) -> bool:
    outer_location, inner_location = parse_location(outer), parse_location(inner)
    if isinstance(outer_location, S3Uri) and isinstance(inner_location, S3Uri):
        # S3 prefixes are string prefixes: s3://b/a also lists s3://b/ab/.
        return outer_location.bucket == inner_location.bucket and inner_location.key.startswith(outer_location.key)
    if isinstance(outer_location, Path) and isinstance(inner_location, Path):
        return inner_location.is_relative_to(outer_location)
    return False


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
        check_text("label", name)
        names.append(name)
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        listed = repr(duplicates[:10]) + (f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else "")
        raise ValueError(f"labels must be unique after stripping spaces; duplicated: {listed}")
    return names


def _clean_prompts(label: str, raw: Any) -> list[str]:
    if isinstance(raw, str) or not raw:
        raise ValueError(f"label {label!r} must map to a non-empty list of prompts, not {raw!r}")
    prompts = [str(prompt).strip() for prompt in raw]
    if not all(prompts):
        raise ValueError(f"label {label!r} has an empty prompt in {_short(raw)}")
    for prompt in prompts:
        check_text(f"prompt of label {label!r}", prompt)
    return prompts


def check_text(kind: str, text: str) -> None:
    """Raise ValueError naming `kind` when a label, prompt or template cannot be used as prompt text.

    Rejected: more than MAX_LABEL_CHARS characters, unpaired surrogates (text that is not valid Unicode,
    which neither JSON nor the tokenizer accept) and control characters, which would also reach terminals
    through printed summaries.
    """
    if len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"{kind} {text[:40]!r}... has {len(text)} characters; the maximum is {MAX_LABEL_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{kind} {_short(text)} is not valid Unicode ({e.reason}); write it as UTF-8 text") from e
    controls = list(dict.fromkeys(f"U+{ord(char):04X}" for char in text if unicodedata.category(char) == "Cc"))
    if controls:
        raise ValueError(f"{kind} {_short(text)} contains control characters {', '.join(controls)}; remove them")


def build_spec(**fields: Any) -> JobSpec:
    """Validate `fields` into a JobSpec.

    Raises InvalidJobSpec whose message names each invalid field, its value and the fix.
    """
    check_template_choice(fields)
    try:
        spec = JobSpec(**fields)
    except ValidationError as e:
        raise InvalidJobSpec(_describe(e)) from e
    if spec.output in spec.sources:
        raise InvalidJobSpec(f"invalid job spec: output: {spec.output!r} must differ from the source")
    return spec


def check_job_size(spec: JobSpec, max_labels: int, max_prompts: int) -> None:
    """Raise InvalidJobSpec when the job has more labels than `max_labels` (CLIPFLEET_MAX_LABELS) or more
    prompts, counted over all labels, than `max_prompts` (CLIPFLEET_MAX_PROMPTS)."""
    count = len(spec.labels)
    if count > max_labels:
        raise InvalidJobSpec(
            f"invalid job spec: labels: the job has {count} labels; the maximum is {max_labels}. "
            "Split the labels over several jobs, or raise CLIPFLEET_MAX_LABELS"
        )
    prompts = sum(len(label_prompts) for label_prompts in spec.prompts.values())
    if prompts > max_prompts:
        raise InvalidJobSpec(
            f"invalid job spec: the job has {prompts} prompts (labels times templates, or prompts per label); "
            f"the maximum is {max_prompts}. Use fewer templates or labels, or raise CLIPFLEET_MAX_PROMPTS"
        )


def _describe(error: ValidationError) -> str:
    """Return one line that names each invalid field, the problem and the value, so a CLI prints one line."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message} (got {_short(item.get('input'))})")
    return "invalid job spec: " + "; ".join(problems)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def local_root(spec: JobSpec) -> Path | None:
    """Return the local source folder (or manifest's folder) that local image paths must stay under.

    Returns None when every source is in S3. `check_sources` allows at most one local source per job.
    """
    local = [source for source in spec.sources if not source.startswith("s3://")]
    if not local:
        return None
    path = Path(local[0])
    return path if path.is_dir() else path.parent


# Prompt length check. The workers' tokenizer truncates prompts longer than the text tower's context, so the
# producer warns at submit. It reads `tokenizer.json` with the `tokenizers` package, which does not import
# torch or transformers. It never downloads, so the worker alone checks a model that is neither a local
# directory nor in the Hugging Face cache.

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_CONFIG_FILE = "config.json"
MAX_PROMPT_WARNINGS = 20
# transformers stores a huge placeholder model_max_length when a tokenizer has no limit of its own.
_NO_LIMIT_TOKENS = 1_000_000


def find_long_prompts(spec: JobSpec) -> list[tuple[str, str, int]]:
    """Log a warning for each prompt that the model's tokenizer would truncate, and return them.

    Returns `(label, prompt, token_count)` tuples, where the count includes the start and end tokens.
    Returns an empty list, and logs at debug level, when the tokenizer files are not found locally.
    """
    files = _tokenizer_files(spec.model, spec.model_revision)
    max_tokens = _max_prompt_tokens(files) if files else None
    if files is None or TOKENIZER_FILE not in files or max_tokens is None:
        logger.debug("No local %s or length limit for model %r; the worker checks prompt lengths", TOKENIZER_FILE, spec.model)
        return []
    counts = _count_tokens(files[TOKENIZER_FILE], spec.prompts)
    if counts is None:
        return []
    long_prompts = [(label, prompt, tokens) for label, prompt, tokens in counts if tokens > max_tokens]
    _log_long_prompts(long_prompts, max_tokens)
    return long_prompts


def _log_long_prompts(long_prompts: list[tuple[str, str, int]], max_tokens: int) -> None:
    for label, prompt, tokens in long_prompts[:MAX_PROMPT_WARNINGS]:
        logger.warning(
            "Label %r: prompt %r has %d tokens; the model reads at most %d, so the worker truncates it. "
            "Shorten the label or the template",
            label, _clip(prompt), tokens, max_tokens,
        )
    if len(long_prompts) > MAX_PROMPT_WARNINGS:
        logger.warning("%d more prompts are longer than %d tokens and will be truncated", len(long_prompts) - MAX_PROMPT_WARNINGS, max_tokens)


def _clip(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."


def _tokenizer_files(model: str, revision: str | None) -> dict[str, Path] | None:
    """Return the local paths of the tokenizer and config files that exist, from a folder or the hub cache."""
    names = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, MODEL_CONFIG_FILE)
    folder = Path(model).expanduser()
    if folder.is_dir():
        return {name: folder / name for name in names if (folder / name).is_file()}
    if model.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = {}
    for name in names:
        try:
            path = try_to_load_from_cache(model, name, revision=revision)
        except ValueError:  # huggingface_hub's HFValidationError: the name is not a valid hub id
            return None
        if isinstance(path, str):  # otherwise None (not cached) or a marker that the file is absent
            found[name] = Path(path)
    return found


def _max_prompt_tokens(files: dict[str, Path]) -> int | None:
    """Return the smaller of the tokenizer's model_max_length and the text tower's position embeddings."""
    limits = []
    tokenizer_config = _read_json(files.get(TOKENIZER_CONFIG_FILE))
    model_max_length = tokenizer_config.get("model_max_length")
    if isinstance(model_max_length, int) and 0 < model_max_length < _NO_LIMIT_TOKENS:
        limits.append(model_max_length)
    text_config = _read_json(files.get(MODEL_CONFIG_FILE)).get("text_config") or {}
    positions = text_config.get("max_position_embeddings") if isinstance(text_config, dict) else None
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.debug("Cannot read %s (%s); the worker checks prompt lengths", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _count_tokens(tokenizer_path: Path, prompts: dict[str, list[str]]) -> list[tuple[str, str, int]] | None:
    """Return `(label, prompt, tokens)` for every prompt, or None when the tokenizer file cannot be loaded."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises a plain Exception for unreadable or unsupported files
        logger.debug("Cannot load %s (%s); the worker checks prompt lengths", tokenizer_path, e)
        return None
    tokenizer.no_truncation()
    pairs = [(label, prompt) for label, label_prompts in prompts.items() for prompt in label_prompts]
    encodings = tokenizer.encode_batch([prompt for _, prompt in pairs])
    return [(label, prompt, len(encoding.ids)) for (label, prompt), encoding in zip(pairs, encodings)]
