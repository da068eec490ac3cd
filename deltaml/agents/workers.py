"""Every core for one party's per-model work: the process pool behind a handler's ``ctx.map``.

A handler that does the same costly, independent computation for each model
(the aggregator's gradient steps) hands a pure function and the list of
inputs to ``ctx.map``. In tests and replays that is a plain loop; a daemon
gives its context this pool instead, so a party on a multi-core machine
uses all its cores while the other parties wait for it. The results are
the same either way: the function is pure and gets everything it needs in
its input.

The workers are forked when the pool is made, before the daemon starts any
thread (forking a threaded process can copy a lock some other thread held),
and each asks the kernel to stop it if its parent dies, so a killed daemon
leaves no workers behind.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    try:  # Linux; elsewhere a worker outlives a killed parent until it reads its closed queue
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _ready(_: int) -> bool:
    return True


class Workers:
    """``count`` worker processes and a ``map`` that spreads a list over them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_stop_with_parent)
        list(self.pool.map(_ready, range(count)))  # fork them all now, while this process has one thread

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if len(items) < 2:
            return [fn(x) for x in items]
        return list(self.pool.map(fn, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
