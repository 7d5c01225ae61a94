"""Job specs rejected or warned about at submit, through `Client.submit` and `clipfleet submit`.

Runs against the session's redis-server and moto's S3 server. No worker runs: every rejected case must
leave the queue empty and create no job in Redis.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from botocore.client import BaseClient

from producer import Client, Settings
from producer.constants import JOBS_INDEX_KEY
from producer.errors import InvalidJobSpec
from producer.spec import build_spec, check_job_size
from tests.conftest import TEST_QUEUE as QUEUE

CLI_TIMEOUT_S = 60
MEGABYTE_KEY = "k" * (1024 * 1024)
LONG_LABEL = "x" * 80  # 92 tokens with the default template in the tiny checkpoint's vocabulary


@dataclass
class Places:
    """Where a case's job reads and writes: an input bucket with three images, an output bucket, a temp folder."""

    input_bucket: str
    output_bucket: str
    folder: Path


@dataclass
class Case:
    """A rejected job: its fields, built from `Places`, and texts the one-line error must contain."""

    fields: Callable[[Places], dict[str, Any]]
    expected: tuple[str, ...]


def s3_job(**overrides: Any) -> Callable[[Places], dict[str, Any]]:
    def fields(places: Places) -> dict[str, Any]:
        job = {"source": f"s3://{places.input_bucket}/in/", "labels": ["cat", "dog"], "output": f"s3://{places.output_bucket}/out/"}
        job.update(overrides)
        return job

    return fields


def unwritable_local_output(places: Places) -> dict[str, Any]:
    # Tests run as root, which ignores folder permissions, so the output is a path under a regular file.
    blocker = places.folder / "file.txt"
    blocker.write_text("a regular file")
    return {**s3_job()(places), "output": str(blocker / "out")}


def manifest_with_long_line(places: Places) -> dict[str, Any]:
    manifest = places.folder / "list.txt"
    lines = [f"s3://{places.input_bucket}/in/0.jpg", "", f"s3://{places.input_bucket}/in/{MEGABYTE_KEY}.jpg"]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {**s3_job()(places), "source": str(manifest)}


REJECTED = {
    "labels-empty": Case(s3_job(labels=[]), ("labels must not be empty",)),
    "labels-duplicate-after-strip": Case(s3_job(labels=["cat", " cat "]), ("unique after stripping", "['cat']")),
    "labels-whitespace-only": Case(s3_job(labels=["cat", "   "]), ("'   '", "empty or whitespace only")),
    "labels-over-maximum": Case(
        s3_job(labels=[f"label {i}" for i in range(50_000)]), ("50000 labels", "maximum is 20000", "CLIPFLEET_MAX_LABELS")
    ),
    "template-without-placeholder": Case(s3_job(templates=["a photo"]), ("'a photo'", "exactly once")),
    "template-two-placeholders": Case(s3_job(templates=["a {} next to a {}"]), ("'a {} next to a {}'", "exactly once")),
    "output-bucket-missing": Case(
        s3_job(output="s3://clipfleet-no-such-output-bucket/out/"),
        ("s3://clipfleet-no-such-output-bucket/out/", "not writable", "check that the bucket exists"),
    ),
    "output-under-file": Case(unwritable_local_output, ("file.txt/out", "not writable", "check that the path is a folder")),
    "manifest-megabyte-line": Case(manifest_with_long_line, ("list.txt line 3", "at most 4096 bytes")),
}


@pytest.fixture
def settings(redis_url: str, s3_server: Any, tiny_clip_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        s3_endpoint_url=s3_server.endpoint_url,
        model=str(tiny_clip_dir),
        queue=QUEUE,
        local_roots=[str(tmp_path)],
    )


@pytest.fixture
def places(s3_client: BaseClient, make_bucket: Callable[[], str], tmp_path: Path) -> Places:
    input_bucket = make_bucket()
    for index in range(3):
        s3_client.put_object(Bucket=input_bucket, Key=f"in/{index}.jpg", Body=b"not decoded: no worker runs")
    return Places(input_bucket, make_bucket(), tmp_path)


def assert_nothing_enqueued(client: redis.Redis) -> None:
    assert client.llen(QUEUE) == 0
    assert list(client.scan_iter(match="clipfleet:job:*")) == []
    assert client.zcard(JOBS_INDEX_KEY) == 0


def queued_uris(client: redis.Redis) -> list[str]:
    """Return the URIs of every batch message in the queue, oldest first (kombu pushes with LPUSH)."""
    uris = []
    for raw in reversed(client.lrange(QUEUE, 0, -1)):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        uris.extend(args[0]["uris"])
    return uris


# --- Client.submit ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REJECTED))
def test_api_rejects_and_enqueues_nothing(name: str, settings: Settings, places: Places, redis_client: redis.Redis) -> None:
    case = REJECTED[name]

    with pytest.raises(InvalidJobSpec) as caught:
        Client(settings).submit(**case.fields(places))

    for text in case.expected:
        assert text in str(caught.value)
    assert_nothing_enqueued(redis_client)


def test_max_labels_setting_raises_limit(settings: Settings, places: Places, redis_client: redis.Redis) -> None:
    client = Client(settings.model_copy(update={"max_labels": 50_000}))

    job = client.submit(**s3_job(labels=[f"label {i}" for i in range(50_000)])(places))

    assert redis_client.llen(QUEUE) == 1
    assert job.status().total == 3


def test_labels_at_default_maximum_accepted() -> None:
    spec = build_spec(source="s3://photos/in/", output="s3://results/", labels=[f"label {i}" for i in range(20_000)])

    check_job_size(spec, Settings().max_labels, Settings().max_prompts)

    assert len(spec.labels) == 20_000


def test_long_prompt_warned_at_submit(
    settings: Settings, places: Places, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="producer.spec"):
        Client(settings).submit(**s3_job(labels=["cat", LONG_LABEL])(places))

    warnings = [record.getMessage() for record in caplog.records if record.name == "producer.spec"]
    assert len(warnings) == 1
    assert repr(LONG_LABEL) in warnings[0]
    assert "92 tokens" in warnings[0]
    assert redis_client.llen(QUEUE) == 1


def test_manifest_repeats_enqueued_once(
    settings: Settings, places: Places, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    uris = [f"s3://{places.input_bucket}/in/{index}.jpg" for index in range(3)]
    manifest = places.folder / "list.txt"
    lines = ["# three images, two of them twice", uris[0], "", uris[1], uris[0], "   ", uris[2], uris[1]]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="producer.sources"):
        job = Client(settings).submit(source=str(manifest), labels=["cat"], output=f"s3://{places.output_bucket}/out/", batch_size=2)

    assert queued_uris(redis_client) == uris
    assert job.status().total == 3
    assert any("repeats URIs 2 times" in record.getMessage() for record in caplog.records)


# --- clipfleet submit -------------------------------------------------------------------------------


def cli_arguments(fields: dict[str, Any], folder: Path) -> list[str]:
    labels_file = folder / "labels.json"
    labels_file.write_text(json.dumps(fields["labels"]), encoding="utf-8")
    arguments = ["submit", fields["source"], "--labels-file", str(labels_file), "--output", fields["output"]]
    for template in fields.get("templates", []):
        arguments += ["--template", template]
    return arguments


def cli_environment(settings: Settings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPFLEET_")}
    env.update(
        CLIPFLEET_REDIS_URL=str(settings.redis_url),
        CLIPFLEET_S3_ENDPOINT_URL=str(settings.s3_endpoint_url),
        CLIPFLEET_MODEL=settings.model,
        CLIPFLEET_QUEUE=QUEUE,
        CLIPFLEET_LOCAL_ROOTS=",".join(settings.local_roots),
    )
    return env


@pytest.mark.parametrize("name", list(REJECTED))
def test_cli_rejects_with_one_line(name: str, settings: Settings, places: Places, redis_client: redis.Redis) -> None:
    case = REJECTED[name]
    arguments = cli_arguments(case.fields(places), places.folder)

    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", *arguments],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=cli_environment(settings),
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for text in case.expected:
        assert text in lines[0]
    assert result.stdout == ""
    assert_nothing_enqueued(redis_client)


# --- no torch in the producer ------------------------------------------------------------------------

NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from producer.cli import main
    code = main(sys.argv[1:])
    loaded = sorted(name for name in ("torch", "transformers") if name in sys.modules)
    print("loaded:", ",".join(loaded) or "none")
    print("exit:", code)
    """
)


def write_hub_cache(cache: Path, model_dir: Path, repo_id: str) -> None:
    """Lay out `model_dir`'s tokenizer and config files as a Hugging Face hub cache entry of `repo_id`."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (snapshot / name).write_bytes((model_dir / name).read_bytes())


@pytest.mark.parametrize("model_from", ["folder", "hub-cache"])
def test_submit_checks_prompts_without_torch(
    model_from: str, settings: Settings, places: Places, tiny_clip_dir: Path, redis_client: redis.Redis
) -> None:
    env = cli_environment(settings)
    if model_from == "hub-cache":
        cache = places.folder / "hub-cache"
        write_hub_cache(cache, tiny_clip_dir, "clipfleet-tests/tiny-clip")
        env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", CLIPFLEET_MODEL="clipfleet-tests/tiny-clip")
    arguments = ["submit", f"s3://{places.input_bucket}/in/", "--labels", f"cat,{LONG_LABEL}", "--output", f"s3://{places.output_bucket}/out/"]

    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, *arguments], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env
    )

    assert "exit: 0" in result.stdout, result.stderr
    assert "loaded: none" in result.stdout
    assert f"Label {LONG_LABEL!r}" in result.stderr
    assert "92 tokens" in result.stderr
    assert redis_client.llen(QUEUE) == 1


def test_worker_counts_match_submit(tiny_clip_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from workers.classify import encode_prompts
    from workers.model import load_model

    loaded = load_model(str(tiny_clip_dir), device="cpu", dtype="float32")
    prompts = ["a photo of a cat.", f"a photo of a {LONG_LABEL}."]

    with caplog.at_level(logging.WARNING, logger="workers.classify"):
        embeddings = encode_prompts(loaded, prompts)

    warnings = [record.getMessage() for record in caplog.records if record.name == "workers.classify"]
    assert embeddings.shape[0] == 2
    assert len(warnings) == 1
    assert repr(prompts[1]) in warnings[0]
    assert "92 tokens" in warnings[0]
    assert "the model's 77" in warnings[0]
