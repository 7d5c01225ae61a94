"""glibc allocator settings for worker processes.

glibc's malloc serves a large request (above M_MMAP_THRESHOLD) with its own mmap and unmaps it on free,
and it returns free memory at the top of the heap to the system (above M_TRIM_THRESHOLD). The threshold
adapts to the sizes freed. But in a worker with 16 fetch threads, the image tower's activations (a few
MB each at 32 images per forward pass) kept being mapped, faulted in page by page and unmapped on every
pass. The worker then used 39 to 46 ms of CPU per image for the bfloat16 ViT-B/32 end to end instead of
29 (benchmarks/throughput.py on the 2-core machine of docs/benchmarks.md). Fixed thresholds keep those
buffers in the heap for reuse. Requests above 32 MiB, such as a decoded 4000 x 3000 photograph, are
still mapped and returned when freed.

NOTE: freed heap memory below the trim threshold stays with the process, in each of glibc's arenas,
so a worker keeps about its peak RSS after a burst of large images instead of shrinking back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def tune_malloc() -> bool:
    """Set fixed mmap and trim thresholds in glibc's malloc for this process. Returns False where the C
    library is not glibc (for example musl or macOS), which is left unchanged."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("The C library has no mallopt; the allocator keeps its default thresholds")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not applied:
        logger.warning("mallopt rejected the mmap or trim threshold; the allocator keeps its defaults")
    return applied
