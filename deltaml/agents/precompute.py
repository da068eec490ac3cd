"""Idle time put to use: Paillier obfuscators computed ahead on a low-priority thread.

An obfuscator (``h_s**x mod n**2``) is the costly half of every fresh
encryption, and it does not depend on what is encrypted. A trainer needs
``d`` of them per model per round; between rounds it waits for the
aggregator, the buyer and the chain. This helper fills that wait: while the
agent is not handling a message it computes the next items of each
obfuscator stream of the core's random source
(:class:`~deltaml.protocol.randomness.ObfuscatorStream`), so the protocol
finds them ready. It builds a new key's table of powers first, at the agent's
own priority (the first message needs it), then runs at the lowest scheduling
priority, so on a busy machine it takes only cycles nobody else wants; it
pauses while its own agent works, so it never competes with it for the
interpreter lock.

Only a daemon (one agent per process) uses it: agents sharing a process
would each call the others' busy time idle.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import structlog

from ..protocol.randomness import warm_obfuscators

log = structlog.get_logger()


class Precomputer:
    """One daemon thread serving every obfuscator stream of ``rng`` while ``idle`` is set."""

    def __init__(self, rng, idle: threading.Event, poll: float = 0.05) -> None:
        self.rng, self.idle, self.poll = rng, idle, poll
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="obfuscators", daemon=True)
        self.computed = 0
        self.cpu = 0.0  # CPU seconds of this thread (read once it has stopped)

    def start(self) -> None:
        # the agent's own work takes the interpreter back within a millisecond, not the default five
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    def _next(self):
        for stream in list(self.rng.streams.values()):
            k = stream.claim()
            if k is not None:
                return stream, k
        return None

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self.cpu = time.thread_time()

    def _serve(self) -> None:
        niced = False
        while not self.done.is_set():
            if not self.idle.wait(self.poll):
                continue
            work = self._next()
            if work is None:
                self.done.wait(self.poll)
                continue
            stream, k = work
            try:
                # A key's table first, at the agent's own priority: its first message waits for it
                # (a trainer's first round needs it at once), so it must not be built at the lowest.
                warm_obfuscators(stream.pub)
                if not niced:
                    lowest_priority()
                    niced = True
                stream.offer(k, stream.compute(k))
                self.computed += 1
            except Exception:  # never let the helper take the agent down; the protocol computes its own
                log.exception("obfuscator precomputation failed")
                return


def lowest_priority() -> None:
    """Linux: the nice value of the calling thread alone."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
