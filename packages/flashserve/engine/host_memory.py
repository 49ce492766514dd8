"""Host memory that a CPU engine frees is kept for its next step, not handed back.

glibc serves an allocation above its mmap threshold with a fresh mapping and
unmaps it on free, and it trims the heap's free top back to the kernel. A
prefill step's activations ([tokens, hidden] fp32: several MiB each) are then
new pages every step, which the kernel zeroes on their first touch. With the
threshold at its largest (32 MiB) and a high trim threshold the next step
reuses the same pages; blocks above 32 MiB stay mappings, so a rare huge one
is still returned. `FLASHSERVE_RETAIN_HOST_MEMORY=0` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's upper limit for the mmap threshold on 64-bit hosts.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the heap's top kept rather than trimmed.
TRIM_THRESHOLD_BYTES = 512 << 20


def retain_freed_host_memory() -> bool:
    """Tell glibc malloc to serve blocks up to 32 MiB from its heap and keep freed memory.

    Returns whether the settings took (False off Linux/glibc or when switched off).
    """
    if os.environ.get("FLASHSERVE_RETAIN_HOST_MEMORY", "1") == "0" or sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    retained = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
    if not retained:
        logger.info("host memory: malloc settings not applied (not glibc); defaults kept")
    return retained
