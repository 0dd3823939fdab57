"""The process's C library allocator told to keep the memory a CPU step frees, for the next step to reuse.

A prefill step's activations are large tensors ([tokens, intermediate] float32: 12.6 MiB for 2048 tokens of
SmolLM2), allocated and freed dozens of times a step. glibc's malloc serves a block above its mmap threshold
(128 KiB at first, raised up to 32 MiB as such blocks are freed) with a fresh mmap, returns it to the kernel on
free, and trims a heap's free top above its trim threshold: each new block then costs a page fault per 4 KiB
when first written. On the 2-core VMs here a fault costs ~4.5 us, and one 2048-token prefill of SmolLM2 took
75 000 to 320 000 of them (0.3-1.5 s of a 3-4 s step). With the mmap threshold at its maximum and trimming
off below TRIM_THRESHOLD, freed blocks stay in the process's heaps and the same sizes come back without a
fault (decode steps' small tensors were already served from the heaps). The process keeps its peak
activation memory, as a caching allocator would.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks up to this come from the heaps.
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of a heap is returned to the kernel only beyond this.
TRIM_THRESHOLD = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed blocks (see the module docstring), once; False (and nothing
    changed) where the C library has no glibc `mallopt` or refuses the values."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own C library (as cpu_threads finds OpenMP)
    if mallopt is None:
        return False
    kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not kept:
        log.warning("mallopt refused the thresholds: freed tensors go back to the kernel")
    return kept
