"""The `clipfleet` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from producer.client import Client, Job, check_error_codes, make_spec
from producer.constants import FINAL_STATES
from producer.embeddings import DEFAULT_EMBEDDING_DTYPE, EMBEDDING_DTYPES
from producer.enqueue import detached_log_path
from producer.errors import ClipfleetError, InvalidJobSpec
from producer.formats import SHARD_FORMATS
from producer.jobs import (
    JOB_STATES,
    cancel_job,
    format_jobs,
    format_status,
    status_dict,
)
from producer.redact import redact_url
from producer.settings import Settings
from producer.spec import JobSpec, local_root
from producer.state import JobStatus
from producer.templates import TEMPLATE_SETS

logger = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Settings whose values may contain a password, so error messages show them through redact_url.
URL_SETTINGS = ("redis_url", "s3_endpoint_url")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGHUP, _raise_keyboard_interrupt)
    try:
        return int(args.handler(args) or 0)
    except ValidationError as e:
        print(f"error: {describe_settings_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except redis.exceptions.AuthenticationError as e:
        print(
            f"error: Redis{_redis_location()} rejected the credentials: {str(e).rstrip('.')}. Check the user name and "
            "password in CLIPFLEET_REDIS_URL, and percent-encode any of : / ? # @ % in them",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except redis.exceptions.ConnectionError as e:
        print(f"error: cannot reach Redis{_redis_location()}: {str(e).rstrip('.')}. Check CLIPFLEET_REDIS_URL and that the server is running", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of our output (for example `head`) went away; stop quietly as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except InvalidJobSpec as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ClipfleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def describe_settings_error(error: ValidationError) -> str:
    """Name each invalid `CLIPFLEET_*` variable with its value and the problem. URL values are redacted."""
    parts = []
    for item in error.errors():
        name = "CLIPFLEET_" + "_".join(str(part) for part in item["loc"]).upper()
        value = item.get("input")
        if item["loc"] and item["loc"][0] in URL_SETTINGS and isinstance(value, str):
            value = redact_url(value)
        parts.append(f"{name}={value!r} is invalid: {item['msg']}")
    return "; ".join(parts)


def _redis_location() -> str:
    """Return " at URL" for the CLIPFLEET_REDIS_URL of the environment, redacted, or "" when it is unset."""
    url = os.environ.get("CLIPFLEET_REDIS_URL")
    return f" at {redact_url(url)}" if url else ""


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _configure_logging(args: argparse.Namespace) -> None:
    level = "INFO" if getattr(args, "verbose", False) else "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _installed_version() -> str:
    try:
        return importlib.metadata.version("clipfleet")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipfleet", description="Classify images in object storage with CLIP zero-shot prompts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job on this machine with a private Redis and worker")
    _add_job_arguments(run)
    run.set_defaults(handler=cmd_run)

    submit = commands.add_parser("submit", help="enqueue a job for the workers of CLIPFLEET_REDIS_URL")
    _add_job_arguments(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish and print its summary")
    submit.add_argument(
        "--detach", action="store_true",
        help="return once the job exists and enqueue its batches from a background producer process (see --log-file)",
    )
    submit.add_argument("--log-file", type=Path, help="with --detach, where the background producer logs (default ~/.local/state/clipfleet/producer-JOB.log)")
    submit.add_argument(
        "--resume", action="store_true",
        help="if Redis has an earlier job with exactly this spec and output, run it again, enqueueing only the batches that have no shard",
    )
    submit.add_argument(
        "--skip-existing", metavar="PREFIX",
        help="leave out images that earlier jobs under this S3 prefix or folder classified without error, with the same model, labels, templates, top-k, threshold and multi-label mode",
    )
    submit.set_defaults(handler=cmd_submit)

    resume = commands.add_parser("resume", help="continue enqueueing a job whose producer stopped, without sending any batch twice")
    resume.add_argument("job_id", metavar="JOB")
    resume.add_argument("--wait", action="store_true", help="wait for the job to finish and print its summary")
    resume.add_argument("--detach", action="store_true", help="continue from a background producer process and return at once")
    resume.add_argument("--log-file", type=Path, help="with --detach, where the background producer logs")
    # The token of a lease handed over by `submit --detach` to the process it starts.
    resume.add_argument("--lease-token", help=argparse.SUPPRESS)
    resume.set_defaults(handler=cmd_resume)

    for name, handler, text in (
        ("status", cmd_status, "print a job's state, counters, rate over the last minute and ETA"),
        ("wait", cmd_wait, "wait for a job to finish"),
        ("results", cmd_results, "print a job's result rows as JSON lines"),
        ("cancel", cmd_cancel, "cancel a job; workers drop its remaining batches"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id", metavar="JOB")
        command.set_defaults(handler=handler)
        if name == "status":
            command.add_argument("--json", action="store_true", help="print the status as a JSON object")
        if name == "wait":
            command.add_argument("--timeout-s", type=float, default=None, help="give up after this many seconds")
            progress = command.add_mutually_exclusive_group()
            progress.add_argument("--progress", action="store_true", help="draw the progress line on stderr even when it is not a terminal")
            progress.add_argument("--no-progress", action="store_true", help="do not draw a progress line")

    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", choices=JOB_STATES, default=None, help="list only jobs in this state")
    jobs.add_argument("--limit", type=_positive_int, default=20, help="list at most this many jobs (default 20)")
    jobs.add_argument("--json", action="store_true", help="print a JSON array of job statuses")
    jobs.set_defaults(handler=cmd_jobs)

    retry = commands.add_parser("retry", help="enqueue the failed images of a finished job again and merge them into its results")
    retry.add_argument("job_id", metavar="JOB")
    retry.add_argument(
        "--codes", type=_error_code_list, default=None,
        help="comma-separated error codes to retry, for example not_found,fetch_timeout (default: every failed image)",
    )
    retry.add_argument("--wait", action="store_true", help="wait for the retry to finish and print the job's summary")
    retry.add_argument("--timeout-s", type=float, default=None, help="with --wait, give up waiting after this many seconds")
    retry.set_defaults(handler=cmd_retry)

    _add_relabel_command(commands)
    _add_eval_command(commands)

    compact = commands.add_parser("compact", help="merge a finished job's shards into a few large files under OUTPUT/JOB_ID/compacted/")
    compact.add_argument("job_id", metavar="JOB")
    compact.add_argument("--target-size-mb", type=_positive_float, default=256.0, help="size at which a compacted file is closed, in MiB (default 256)")
    compact.add_argument("--format", choices=SHARD_FORMATS, default=None, help="format of the compacted files (default: the job's format)")
    compact.add_argument("--delete-shards", action="store_true", help="delete the shards once the files and _MANIFEST.json are written")
    compact.set_defaults(handler=cmd_compact)

    worker = commands.add_parser(
        "worker", help="start a Celery worker with production defaults",
        description="Start a Celery worker that loads CLIPFLEET_MODEL and runs the tasks (image classification, embeddings) of the "
        "batch and realtime queues of CLIPFLEET_REDIS_URL, until it is stopped with SIGINT or SIGTERM.",
    )
    worker.add_argument("--concurrency", type=int, default=1, help="pool processes (default 1); several processes may share one GPU, see docs/benchmarks.md")
    worker.add_argument(
        "--queue", default=None,
        help="batch queue to consume (default: CLIPFLEET_QUEUE); CLIPFLEET_REALTIME_QUEUE, unless empty, is read before it",
    )
    worker.add_argument(
        "--realtime-only", action="store_true",
        help="read only the realtime queue (CLIPFLEET_REALTIME_QUEUE) and no batch queue; same as CLIPFLEET_REALTIME_ONLY=true",
    )
    worker.set_defaults(handler=cmd_worker)

    serve = commands.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API (models, embeddings, files, batches) in front of the workers",
        description="Serve the OpenAI-compatible HTTP API in front of the workers of CLIPFLEET_REDIS_URL: /v1/models, "
        "/v1/embeddings, and with CLIPFLEET_API_FILES_URI set, /v1/files and /v1/batches. docs/api.md describes it.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 listens on every interface)")
    serve.add_argument("--port", type=_tcp_port, default=8000, help="TCP port to listen on (default 8000)")
    serve.add_argument("--workers", type=_positive_int, default=1, help="server processes (default 1); each reads the CLIPFLEET_* settings itself")
    serve.set_defaults(handler=cmd_serve)
    return parser


def _error_code_list(text: str) -> frozenset[str]:
    try:
        return check_error_codes([code.strip() for code in text.split(",") if code.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number greater than 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _tcp_port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; use 1 to 65535")
    return value


def _add_job_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "source", metavar="SOURCE", nargs="+",
        help="one or more of: s3://bucket/prefix/, a manifest (.txt .csv .jsonl .parquet, text also .gz), "
        "an S3 Inventory manifest.json, or a local folder; listed in the order given",
    )
    _add_label_options(command, "OUTPUT/JOB_ID/")
    command.add_argument("--model", help="hub id or local directory of a CLIP checkpoint (default: CLIPFLEET_MODEL)")
    command.add_argument("--batch-size", type=int, help="images per task (default: CLIPFLEET_BATCH_SIZE, 64)")
    command.add_argument("--top-k", type=int, default=5, help="labels kept per image, best first (default 5)")
    command.add_argument(
        "--threshold", type=float, default=None,
        help="keep only top-k labels scoring at least this: 0 to 1 for probabilities, -1 to 1 with --multi-label (default: keep all)",
    )
    command.add_argument(
        "--multi-label", action="store_true",
        help="score each label by its raw cosine similarity to the image instead of a softmax over the labels",
    )
    command.add_argument("--extensions", help="comma-separated image extensions to list (default .jpg,.jpeg,.png,.webp,.gif,.bmp,.tif,.tiff)")
    command.add_argument("--format", choices=SHARD_FORMATS, default="jsonl", help="result shard format: jsonl (default) or parquet")
    command.add_argument(
        "--store-embeddings", action="store_true",
        help="also write each image's normalised embedding next to its shard, as part-NNNNNN.embeddings.parquet, for `clipfleet relabel`",
    )
    command.add_argument(
        "--embeddings-dtype", choices=EMBEDDING_DTYPES, default=DEFAULT_EMBEDDING_DTYPE,
        help="with --store-embeddings, the stored type: float16 (default, 2 bytes per value) or float32",
    )


def read_labels(args: argparse.Namespace) -> list[str] | dict[str, list[str]]:
    """Return the labels of `--labels` or `--labels-file`. Raises InvalidJobSpec for an unreadable file."""
    if args.labels is not None:
        return [label for label in args.labels.split(",")]
    path: Path = args.labels_file
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InvalidJobSpec(f"--labels-file {str(path)!r} cannot be read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise InvalidJobSpec(f"--labels-file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidJobSpec(f"--labels-file {str(path)!r} is not valid JSON: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _spec(settings: Settings, args: argparse.Namespace) -> JobSpec:
    extensions = args.extensions.split(",") if args.extensions else None
    return make_spec(
        settings,
        source=args.source[0] if len(args.source) == 1 else args.source,
        labels=read_labels(args),
        output=args.output,
        templates=args.templates,
        model=args.model,
        batch_size=args.batch_size,
        top_k=args.top_k,
        extensions=extensions,
        format=args.format,
        template_set=args.template_set,
        threshold=args.threshold,
        multi_label=args.multi_label,
        store_embeddings=args.store_embeddings,
        embeddings_dtype=args.embeddings_dtype,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job end to end with a private Redis and one worker, then stop both."""
    from producer.embedded import EmbeddedStack

    settings = Settings()
    if settings.redis_url:
        print("CLIPFLEET_REDIS_URL is set: submitting to that Redis and waiting", file=sys.stderr)
        return cmd_submit(args, wait=True)
    spec = _spec(settings, args)  # invalid input fails before any process starts
    started = time.monotonic()
    with EmbeddedStack(spec.model, local_roots=_local_folders(spec)) as stack:
        client = Client(settings.model_copy(update={"redis_url": stack.redis_url}))
        job = client.submit_spec(spec)
        try:
            status = job.wait(progress=True, on_poll=lambda _: stack.check_worker())
        except BaseException:
            _cancel_quietly(job)
            raise
        _print_summary(job, status, time.monotonic() - started)
    return _exit_code(status)


def _local_folders(spec: JobSpec) -> list[str]:
    """Return the job's local source folder and local output folder, the only ones its worker may use."""
    folders = [] if spec.source_is_s3 else [str(local_root(spec))]
    if not spec.output_is_s3:
        folders.append(spec.output)
    return folders


def _cancel_quietly(job: Job) -> None:
    """Cancel a job while another error is propagating, logging instead of raising a second error."""
    try:
        job.cancel()
    except Exception:
        logger.warning("Could not cancel job %s", job.id, exc_info=True)


def _exit_code(status: JobStatus) -> int:
    """Return 0 for a succeeded job, even with failed images (the summary counts them), else 1."""
    return 0 if status.state == "succeeded" else EXIT_ERROR


def cmd_submit(args: argparse.Namespace, wait: bool = False) -> int:
    settings = Settings()
    detach = getattr(args, "detach", False)
    if getattr(args, "log_file", None) is not None and not detach:
        raise InvalidJobSpec("--log-file applies only with --detach, where a background producer writes it")
    spec = _spec(settings, args)  # invalid input fails before Redis is contacted
    client = Client(settings)
    started = time.monotonic()
    created: list[str] = []

    def report_created(job_id: str) -> None:
        created.append(job_id)
        print(f"job {job_id}: enqueueing its batches", file=sys.stderr)

    try:
        job = client.submit_spec(
            spec,
            on_created=report_created,
            detach=detach,
            resume=getattr(args, "resume", False),
            skip_existing=getattr(args, "skip_existing", None),
            log_path=getattr(args, "log_file", None),
        )
    except KeyboardInterrupt:
        if created:
            print(
                f"job {created[0]}: enqueueing interrupted; the batches already enqueued still run. Continue with "
                f"`clipfleet resume {created[0]}`, or stop the job with `clipfleet cancel {created[0]}`",
                file=sys.stderr,
            )
        raise
    if detach:
        log_path = args.log_file or detached_log_path(job.id)
        print(f"job {job.id}: a background producer enqueues its batches; log: {log_path}", file=sys.stderr)
    print(job.id)
    if wait or getattr(args, "wait", False):
        status = job.wait(progress=sys.stderr.isatty())
        _print_summary(job, status, time.monotonic() - started)
        return _exit_code(status)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue enqueueing a job; with --wait, follow it and print the summary like `submit --wait`."""
    client = Client(Settings())
    job = client.resume(args.job_id, detach=args.detach, lease_token=args.lease_token, log_path=args.log_file)
    if args.detach:
        print(f"job {job.id}: a background producer continues enqueueing; log: {args.log_file or detached_log_path(job.id)}", file=sys.stderr)
    print(job.id)
    if not args.wait:
        return 0
    started = time.monotonic()
    status = job.wait(progress=sys.stderr.isatty())
    _print_summary(job, status, time.monotonic() - started)
    return _exit_code(status)


def cmd_status(args: argparse.Namespace) -> int:
    job = Client(Settings()).job(args.job_id)
    status = job.status()
    if args.json:
        print(json.dumps(status_dict(status), indent=2))
    else:
        print(format_status(status, job.output))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    job = Client(Settings()).job(args.job_id)
    progress = args.progress or (not args.no_progress and sys.stderr.isatty())
    status = job.wait(timeout_s=args.timeout_s, progress=progress)
    print(json.dumps(status_dict(status), indent=2))
    return _exit_code(status)


def cmd_jobs(args: argparse.Namespace) -> int:
    statuses = Client(Settings()).jobs(limit=args.limit, state=args.state)
    if args.json:
        print(json.dumps([status_dict(status) for status in statuses], indent=2))
    else:
        print(format_jobs(statuses))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    job = Client(Settings()).job(args.job_id)
    for row in job.results():
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job and print what it finished: images done of total, failed, and where the results are."""
    client = Client(Settings())
    job = client.job(args.job_id)
    cancelled = cancel_job(client.store, client.storage, job.id)
    if cancelled is None:
        state = job.status().state
        reason = f"had already ended ({state})" if state in FINAL_STATES else "has counted every batch and is finishing"
        print(f"job {job.id} {reason}; nothing was cancelled", file=sys.stderr)
        return EXIT_ERROR
    summary = cancelled.summary
    done = summary["succeeded"] + summary["failed"]
    of_total = f"of {summary['total']:,} " if summary["total"] is not None else ""
    listing = " (the total is unknown because the producer was still listing)" if summary["total"] is None else ""
    print(f"cancelled {job.id}: {done:,} images done {of_total}with {summary['failed']:,} failed{listing}; workers drop the remaining batches")
    print(f"  results so far: {summary['output']}")
    if cancelled.written:
        print(f"  summary: {cancelled.location}")
    else:
        print(f"  summary: writing {cancelled.location} failed; see the warning above", file=sys.stderr)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Start a retry round of a finished job; with --wait, follow it and print the summary like `run`."""
    job = Client(Settings()).job(args.job_id)
    retry_round = job.retry(args.codes)
    if retry_round.round is None:
        print(f"job {job.id} has no failed images to retry; nothing was enqueued", file=sys.stderr)
        return 0
    print(f"job {job.id}: retry round {retry_round.round} enqueued {retry_round.images} failed images in {retry_round.batches} batches", file=sys.stderr)
    if not args.wait:
        return 0
    started = time.monotonic()
    status = job.wait(timeout_s=args.timeout_s, progress=sys.stderr.isatty())
    _print_summary(job, status, time.monotonic() - started)
    return _exit_code(status)


def _add_label_options(command: argparse.ArgumentParser, results_folder: str) -> None:
    """Add the options that `submit`, `run` and `relabel` share: labels, output and templates."""
    labels = command.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated class names, for example cat,dog,car")
    labels.add_argument("--labels-file", type=Path, help="file with one class name per line, or a .json list or {label: [prompts]} mapping")
    command.add_argument("--output", required=True, help=f"s3://bucket/prefix/ or a local folder; results go under {results_folder}")
    templates = command.add_mutually_exclusive_group()
    templates.add_argument("--template", action="append", dest="templates", help="prompt template with {} for the label; repeat for an ensemble (default 'a photo of a {}.')")
    templates.add_argument(
        "--template-set", choices=sorted(TEMPLATE_SETS), default=None,
        help="use a built-in set of templates instead of --template: 'default' (one template) or 'photo' (21 photo-style wordings)",
    )


def _add_relabel_command(commands: Any) -> None:
    relabel = commands.add_parser("relabel", help="score a finished job's stored embeddings against new labels, without reading any image")
    relabel.add_argument("job_id", metavar="JOB", help="a succeeded job run with --store-embeddings")
    _add_label_options(relabel, "OUTPUT/NEW_JOB_ID/")
    relabel.add_argument("--top-k", type=int, default=5, help="labels kept per image, best first (default 5)")
    relabel.add_argument("--threshold", type=float, default=None, help="keep only top-k labels scoring at least this, as for `submit`")
    relabel.add_argument("--multi-label", action="store_true", help="score each label by its raw cosine similarity, as for `submit`")
    relabel.add_argument("--format", choices=SHARD_FORMATS, default="jsonl", help="result shard format: jsonl (default) or parquet")
    relabel.add_argument("--model", help="must be the source job's model, which is the default; any other is rejected")
    relabel.add_argument("--wait", action="store_true", help="wait for the job to finish and print its summary")
    relabel.set_defaults(handler=cmd_relabel)


def cmd_relabel(args: argparse.Namespace) -> int:
    """Submit a relabel job of a finished job's stored embeddings; with --wait, print its summary like `submit --wait`."""
    client = Client(Settings())
    started = time.monotonic()
    job = client.relabel(
        args.job_id, read_labels(args), args.output, templates=args.templates, top_k=args.top_k, format=args.format,
        model=args.model, template_set=args.template_set, threshold=args.threshold, multi_label=args.multi_label,
    )
    print(job.id)
    if not args.wait:
        return 0
    status = job.wait(progress=sys.stderr.isatty())
    _print_summary(job, status, time.monotonic() - started)
    return _exit_code(status)


def _add_eval_command(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval", help="classify a labelled sample as one job and report accuracy, per-class, confusion and slice metrics"
    )
    evaluate.add_argument("source", metavar="SOURCE", help="folder or s3:// prefix with one subfolder per class, or a .csv with the header uri,label[,extra...]")
    evaluate.add_argument("--output", required=True, help="s3://bucket/prefix/ or a local folder; the report goes to OUTPUT/JOB_ID/eval/report.json")
    labels = evaluate.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names; must be exactly the sample's classes (default: those classes)")
    labels.add_argument("--labels-file", type=Path, help="JSON {class: wording or [prompts]} naming exactly the sample's classes")
    templates = evaluate.add_mutually_exclusive_group()
    templates.add_argument("--template", action="append", dest="templates", help="prompt template with {} for the label; repeat for an ensemble")
    templates.add_argument("--template-set", choices=sorted(TEMPLATE_SETS), default=None, help="use a built-in set of templates instead of --template")
    evaluate.add_argument(
        "--compare-template-set", action="append", default=[], choices=sorted(TEMPLATE_SETS),
        help="also score the same embeddings with this built-in template set (a relabel job); repeatable",
    )
    evaluate.add_argument(
        "--compare-labels-file", action="append", default=[], type=Path,
        help="also score the same embeddings with this JSON {class: wording or [prompts]} (a relabel job); repeatable",
    )
    evaluate.add_argument("--model", help="model for the job (default: CLIPFLEET_MODEL)")
    evaluate.add_argument("--timeout-s", type=_positive_float, default=None, help="give up waiting for each job after this many seconds; the job keeps running")
    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run `clipfleet eval` and print its summary; see producer.evaluate."""
    from producer.evaluate import (
        evaluate,
        format_summary,
        read_labels_file,
        variants_from_args,
    )

    labels = args.labels.split(",") if args.labels is not None else None
    if args.labels_file is not None:
        labels = read_labels_file(args.labels_file, "--labels-file")
    report = evaluate(
        Client(Settings()), args.source, args.output, labels=labels, templates=args.templates, template_set=args.template_set,
        model=args.model, compare=variants_from_args(args.compare_template_set, args.compare_labels_file), timeout_s=args.timeout_s,
    )
    print(format_summary(report))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Compact a finished job's shards and print one line per file written."""
    from producer.compact import compact_job

    client = Client(Settings())
    target_size_bytes = max(1, int(args.target_size_mb * 1024 * 1024))
    compaction = compact_job(client.store, client.storage, args.job_id, target_size_bytes, args.format, args.delete_shards)
    for item in compaction.files:
        print(f"{item.location}\t{item.rows} rows\t{item.size_bytes} bytes\tbatches {item.first_batch}-{item.last_batch}")
    deleted = f"; deleted {compaction.shards_deleted} shards" if args.delete_shards else ""
    print(f"job {compaction.job_id}: {compaction.rows} rows in {len(compaction.files)} files, listed in {compaction.manifest}{deleted}", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker in this process: prefork pool, one task at a time per process, task events on.

    Returns the exit status of Celery's worker: 1 after an unrecoverable error or SIGINT, 0 after SIGTERM.
    """
    from celery.bin.celery import celery as celery_command

    if args.queue:
        # Before workers.app reads its settings, so its queues and its registry entry name this queue too.
        os.environ["CLIPFLEET_QUEUE"] = args.queue
    if args.realtime_only:
        os.environ["CLIPFLEET_REALTIME_ONLY"] = "true"
    from workers.app import consumed_queues, settings

    # The realtime queue comes first, so the worker takes realtime requests before batches (see workers.app).
    queues = ",".join(consumed_queues(settings))
    # `celery worker` ends with click's ctx.exit(status). Celery 5.7's `app.worker_main` and `app.start` drop
    # that status, so a worker stopped by an unrecoverable error would exit 0 and its supervisor would not
    # see the failure. click returns the status when `standalone_mode` is off.
    exit_status = celery_command.main(args=[
        "-A", "workers.app", "worker", f"--concurrency={args.concurrency}", "--pool=prefork", f"--queues={queues}",
        f"--loglevel={settings.log_level}", "--task-events", "--without-gossip", "--without-mingle",
    ], standalone_mode=False)
    if isinstance(exit_status, str):  # SystemExit("message"), as raised by the worker's startup checks
        print(exit_status, file=sys.stderr)
        return EXIT_ERROR
    return int(exit_status or 0)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP API until SIGINT or SIGTERM. Returns EXIT_USAGE when CLIPFLEET_REDIS_URL is not set."""
    settings = Settings()
    if not settings.redis_url:
        print(
            "error: CLIPFLEET_REDIS_URL is not set: `clipfleet serve` sends requests to the workers through their Redis; "
            "set it to that Redis, for example redis://localhost:6379/0", file=sys.stderr,
        )
        return EXIT_USAGE
    from producer.api.app import run  # FastAPI and uvicorn load for this command only

    run(settings, args.host, args.port, workers=args.workers)
    return 0


def _print_summary(job: Job, status: JobStatus, elapsed_s: float) -> None:
    labels: Counter[str] = Counter()
    for row in job.results():
        if not row["error"]:
            labels[row["label"] if row["label"] is not None else "(no label at or above the threshold)"] += 1
    print(f"job {job.id}: {status.state}")
    if status.error:
        print(f"  error: {status.error}")
    already = f", {status.skipped_existing} classified by earlier jobs" if status.skipped_existing else ""
    print(f"  images: {status.total or 0} total, {status.succeeded} classified, {status.failed} failed, {status.skipped} skipped (not images){already}")
    rate = f", {status.images_per_s:.1f} images/s from the first batch on" if status.images_per_s else ""
    print(f"  time: {elapsed_s:.1f} s in all{rate}")
    retries = ", ".join(f"{kind} {count}" for kind, count in status.retries.items())
    giveups = ", ".join(f"{kind} {count}" for kind, count in status.giveups.items())
    print(
        f"  retries: {status.retries_total}{f' ({retries})' if retries else ''}; "
        f"gave up: {sum(status.giveups.values())}{f' ({giveups})' if giveups else ''}; redeliveries: {status.redeliveries}"
    )
    if status.retry_round:
        print(f"  retry rounds: {status.retry_round}")
    for label, count in labels.most_common(20):
        print(f"  {count:>8}  {label}")
    if len(labels) > 20:
        print(f"  ... and {len(labels) - 20} more labels")
    for code, count in sorted(status.errors.items(), key=lambda item: -item[1]):
        print(f"  {count:>8}  error: {code}")
    print(f"  results: {job.output}")


if __name__ == "__main__":
    sys.exit(main())
