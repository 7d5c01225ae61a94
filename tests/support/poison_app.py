"""A test-only variant of the worker app whose batches kill or hang their own process for marked URIs.

Start it with `celery -A tests.support.poison_app worker` (`start_worker(..., app_module=POISON_APP_MODULE)`).

- A URI that contains :data:`POISON_MARKER` makes the pool process send itself SIGKILL while it loads that
  image, as a segfault in an image decoder would.
- A batch with a URI that contains :data:`HANG_MARKER` ignores its soft time limit and sleeps, as a call
  stuck in native code would, until the hard time limit kills the pool process.
- :data:`START_DELAY_ENV` in the environment makes each pool process sleep that many seconds before it
  reports to the main process, as a slow model load would.

The product code is unchanged: the patches replace functions of `workers.pipeline` in each pool process
after the fork, so the parent never imports torch.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from workers.app import app

__all__ = ["HANG_MARKER", "POISON_APP_MODULE", "POISON_MARKER", "START_DELAY_ENV", "app"]

POISON_APP_MODULE = __name__
POISON_MARKER = "poison"
HANG_MARKER = "hang"
HANG_S = 3600.0
# Seconds each pool process sleeps after the fork, before it reports to the main process, as a slow model load would.
START_DELAY_ENV = "CLIPFLEET_TEST_POOL_START_DELAY_S"


def _contains_marker(marker: str, values: tuple[Any, ...]) -> bool:
    """Return True when any string in `values`, or in a list among them, contains `marker`."""
    for value in values:
        if isinstance(value, str) and marker in value:
            return True
        if isinstance(value, list) and _contains_marker(marker, tuple(value)):
            return True
    return False


@signals.worker_process_init.connect
def install_faulty_functions(**_: Any) -> None:
    """Replace `load_pixels` and `classify_uris` in this pool process with versions that die or hang on markers."""
    import workers.pipeline as pipeline

    load_pixels = pipeline.load_pixels
    classify_uris = pipeline.classify_uris

    # Matching any string argument keeps the patches independent of where the URIs sit in the signatures.
    def load_pixels_or_die(*args: Any, **kwargs: Any) -> Any:
        if _contains_marker(POISON_MARKER, (*args, *kwargs.values())):
            os.kill(os.getpid(), signal.SIGKILL)
        return load_pixels(*args, **kwargs)

    def classify_uris_or_hang(*args: Any, **kwargs: Any) -> Any:
        if not _contains_marker(HANG_MARKER, (*args, *kwargs.values())):
            return classify_uris(*args, **kwargs)
        try:
            time.sleep(HANG_S)
        except SoftTimeLimitExceeded:
            time.sleep(HANG_S)
        raise RuntimeError(f"the hard time limit did not end a batch within {2 * HANG_S:g} s")

    pipeline.load_pixels = load_pixels_or_die
    pipeline.classify_uris = classify_uris_or_hang
    time.sleep(float(os.environ.get(START_DELAY_ENV, "0")))
