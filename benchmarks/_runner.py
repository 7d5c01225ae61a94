"""The `main` shared by the benchmark scripts: a private temporary folder, SIGTERM handling and the result line."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_benchmark(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], dict[str, Any]], folder_prefix: str) -> int:
    """Call `run(args, workdir)` in a new temporary folder and print its result as one `RESULT {json}` line.

    The folder is removed afterwards, also after SIGTERM, which is raised as KeyboardInterrupt so that the
    servers and workers that `run` started are stopped by its own cleanup. The JSON also goes to `args.json`
    when that is set. Returns the exit status, 0.
    """
    sys.stdout.reconfigure(line_buffering=True)  # show progress when the output goes to a file or pipe
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=folder_prefix))
    try:
        result = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    line = json.dumps(result, sort_keys=True)
    if args.json:
        args.json.write_text(line + "\n")
    print("RESULT " + line, flush=True)
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
