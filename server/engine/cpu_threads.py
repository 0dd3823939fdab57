"""How many threads this thread's torch CPU ops use, set for the calling thread alone.

`torch.set_num_threads` also sets the count every thread takes when it first runs a parallel op (each library built
against torch initialises its own threads lazily from it: ours too), so a helper thread must not use it to go
single-threaded: the engine thread's first kernel call would then take 1. `single_threaded` sets the calling
thread's OpenMP count alone (`omp_set_num_threads` on torch's OpenMP runtime), after torch has initialised it.
Where torch has no OpenMP runtime (another build), it does nothing.
"""

from __future__ import annotations

import ctypes

import torch

_omp_set_num_threads = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)


def use_threads_here(threads: int) -> None:
    """The calling thread's torch CPU ops run on `threads` threads; other threads keep theirs."""
    torch.get_num_threads()  # torch's own lazy initialisation of this thread first: it would undo what follows
    if _omp_set_num_threads is not None:
        _omp_set_num_threads(threads)


def single_threaded() -> None:
    """The calling thread runs torch's CPU ops on itself alone and starts no OpenMP team (an executor's
    initializer for threads that convert tensors beside the engine thread: core/engine_thread.py says why)."""
    use_threads_here(1)
