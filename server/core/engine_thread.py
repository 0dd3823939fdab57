"""The one thread of a process that runs torch's parallel CPU work: engines are built on it, then the schedulers'
loops run on it; every other thread of the process runs torch ops on itself alone.

Why. torch runs the parallel part of a CPU op on an OpenMP team of the calling thread (libgomp on Linux), and a
thread that ever ran one keeps its team's workers until it exits. Once a process holds more such threads than it has
CPUs, libgomp lets an idle worker spin only 100 rounds (instead of 300,000: its GOMP_SPINCOUNT documentation) before
it sleeps, and every later parallel op waits for a sleeping worker to be woken. On a 2-CPU VM that made a small op
(`index_add_` of [76, 576]) take 490 us instead of 12 once a second thread had run one parallel op, and a server's
prefill step 2.5x as long as the same step of the engine alone (the engine built on the main thread, its steps run
on the scheduler's). So a server keeps one team: this thread's, of `threads` threads. The thread that starts the
server and the server's helper threads (adapter loaders, tokenizers, constraint masks) run torch ops on one thread
(`cpu_threads.single_threaded`: the calling thread's count alone, not torch's default for new threads, which every
library built against torch, our kernels too, reads when a thread first runs one of its parallel ops).

The thread is shared by every server of the process (`acquire`, `release`; tests and benchmarks run several):
each scheduler runs its loop as a series of tasks on it (one plan and step each), and work such as a benchmark
driving an engine directly is submitted between them. A process that ran parallel torch work on another thread
before (a test or a benchmark building models on its main thread) already holds that thread's team: such work
belongs on a thread that ends before the server starts (or on this one).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

from loraplex.server.engine.cpu_threads import single_threaded, use_threads_here

T = TypeVar("T")




class EngineThread:
    """A single (daemon) thread that runs what is submitted to it in order (the engine's construction, then the
    scheduler's loop), with torch on `threads` threads (default: the count in force where it is created)."""

    def __init__(self, threads: int | None = None, name: str = "loraplex-engine") -> None:
        self.threads = threads or torch.get_num_threads()
        self._caller_threads = torch.get_num_threads()
        self._tasks: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        use_threads_here(self.threads)
        while (task := self._tasks.get()) is not None:
            future, function, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as error:  # the submitter sees it
                    future.set_exception(error)

    def submit(self, function: Callable[..., T], *args) -> Future[T]:
        """Run `function(*args)` on the thread after what was submitted before (RuntimeError once closed)."""
        if self._closed:
            raise RuntimeError("the engine thread is closed")
        future: Future[T] = Future()
        self._tasks.put((future, function, args))
        return future

    async def run(self, function: Callable[..., T], *args) -> T:
        """`submit`, awaited."""
        return await asyncio.wrap_future(self.submit(function, *args))

    def others_single_threaded(self) -> None:
        """From the thread that starts the server: the caller runs torch ops on one thread from now on (`close` gives
        it its count back); the server's helper threads do so from their start (`cpu_threads.single_threaded`)."""
        single_threaded()

    def close(self) -> None:
        """Wait for what was submitted to end, end the thread (its team with it), restore the caller's count."""
        self._closed = True
        self._tasks.put(None)
        self._thread.join()
        use_threads_here(self._caller_threads)

    @classmethod
    def acquire(cls) -> EngineThread:
        """The process's engine thread, started (with `others_single_threaded`) by the first of its users."""
        global _shared, _users
        with _shared_lock:
            if _shared is None:
                _shared = cls()
                _shared.others_single_threaded()
            _users += 1
            return _shared

    def release(self) -> None:
        """One user of `acquire` is done with it; the last one ends the thread (`close`)."""
        global _shared, _users
        with _shared_lock:
            if self is not _shared or _users == 0:
                raise RuntimeError("release without a matching acquire")
            _users -= 1
            if _users:
                return
            _shared = None
        self.close()


_shared: EngineThread | None = None
_users = 0
_shared_lock = threading.Lock()
