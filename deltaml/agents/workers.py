"""Every core for one party's per-model work: the process pool behind a handler's ``ctx.map``.

A handler that does the same costly, independent computation for each model
(the aggregator's gradient steps, the buyer's refreshes and masked products)
hands a pure function and the list of
inputs to ``ctx.map``. In tests and replays that is a plain loop; a daemon
gives its context this pool instead, so a party on a multi-core machine
uses all its cores while the other parties wait for it. The results are
the same either way: the function is pure and gets everything it needs in
its input.

The workers are forked when the pool is made, before the daemon starts any
thread (forking a threaded process can copy a lock some other thread held),
and each asks the kernel to stop it if its parent dies, so a killed daemon
leaves no workers behind. A worker that dies (the kernel's out-of-memory
killer, an operator's ``kill``) breaks its pool for good; the next ``map``
then starts new workers — spawned, as the daemon has threads by then — and
does its work again, instead of every later message failing the same way.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, TypeVar

import structlog

from ..protocol.randomness import KEPT_TABLES, warm_obfuscators
from .precompute import lowest_priority

T = TypeVar("T")
R = TypeVar("R")
PR_SET_PDEATHSIG = 1
log = structlog.get_logger()


def _stop_with_parent(started) -> None:
    # Ctrl-C reaches the whole process group: the parent stops its pool, a worker must not die of
    # it mid-task (each printed a KeyboardInterrupt traceback under the buyer's last line)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # Linux; elsewhere a worker outlives a killed parent until it reads its closed queue
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    started.wait(timeout=60)  # no task runs before every worker is this far (see Workers)


def _ready(_: int) -> bool:
    return True


def _warm(pool: ProcessPoolExecutor, count: int, pub) -> None:
    for _ in range(count):
        pool.submit(_warm_in_background, pub)


def _warm_in_background(pub) -> None:
    def build() -> None:
        lowest_priority()
        warm_obfuscators(pub)

    threading.Thread(target=build, name="obfuscator-table", daemon=True).start()
    time.sleep(0.05)  # stay busy a moment, so the next such request goes to another worker


def workers_for(count: int, pub=None) -> "Workers | None":
    """A pool of ``count`` processes (0: one per core), or None where one process is all there is."""
    count = count or os.cpu_count() or 1
    if count < 2:
        return None
    workers = Workers(count)
    if pub is not None:
        workers.warm(pub)
    return workers


class Workers:
    """``count`` worker processes and a ``map`` that spreads a list over them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.warmed: list = []  # the keys whose tables new workers build too
        self.lock = threading.Lock()
        self.pool = self._start("fork")

    def _start(self, method: str) -> ProcessPoolExecutor:
        context = multiprocessing.get_context(method)
        # the barrier holds every worker in its initializer until all have set their signals: the first
        # tasks return only then, so none is left that a Ctrl-C at start would kill (one worker
        # could take every ready task while another had not yet reached its initializer)
        pool = ProcessPoolExecutor(self.count, mp_context=context, initializer=_stop_with_parent,
                                   initargs=(context.Barrier(self.count),))
        list(pool.map(_ready, range(self.count)))  # start them all now (forked: while this process has one thread)
        for pub in self.warmed:
            _warm(pool, self.count, pub)
        return pool

    def warm(self, pub) -> None:
        """Have each worker build ``pub``'s obfuscator table on a low-priority thread: in time
        nobody else wants while a job starts, where five daemons and a key compete for the cores."""
        self.warmed = [*self.warmed, pub][-KEPT_TABLES:]  # the tables a process keeps
        _warm(self.pool, self.count, pub)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]``, in the workers (also a single item: this process then never
        needs the tables the work uses); once more in new workers if one of the pool's died."""
        items, pool = list(items), self.pool
        try:
            return list(pool.map(fn, items))
        except BrokenProcessPool:
            with self.lock:  # one new pool, whichever thread finds the old one broken first
                if self.pool is pool:
                    log.warning("a worker process died: starting new workers", workers=self.count)
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._start("spawn")
            return list(self.pool.map(fn, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
