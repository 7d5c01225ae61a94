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


def prepare_images_and_checkpoint(quick: bool, images: int, workdir: Path) -> tuple[dict[str, object], list[tuple[str, bytes]], Path]:
    """Print the machine, generate `images` photo-like JPEGs and save a checkpoint under `workdir`.

    The checkpoint is the tiny test CLIP with `quick`, else the ViT-B/32-sized one with random weights.
    Returns the machine's description, the named JPEGs and the checkpoint folder.
    """
    from benchmarks import _images, _model

    info = _images.machine_info()
    print("== Machine")
    for key, value in info.items():
        print(f"  {key}: {value}")
    photos = _images.generate_photos(images)
    print(f"  images: {_images.describe_photos(photos)}")
    checkpoint = workdir / "checkpoint"
    if quick:
        from tests.support.checkpoints import build_tiny_clip

        build_tiny_clip(checkpoint)
    else:
        _model.build_vit_b32(checkpoint)
    return info, photos, checkpoint


def checkpoint_description(quick: bool) -> str:
    return "tiny test CLIP" if quick else "ViT-B/32 size, random weights"
