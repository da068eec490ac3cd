"""An agent: a pure core on a bus, with an optional JSON-lines trace.

The agent is deliberately thin: the ack policy decodes, deduplicates and
steps the core; the agent publishes what the core returns and records every
message in and out. A trace starts with a header naming the role, the agent
and what its core needs to be rebuilt (the random seed, the data file, the
key file), so ``deltaml replay`` can feed the inputs to a fresh core and
compare the outputs. A trace holds the seed: it is as secret as a key file
and is written with mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import structlog
from eth_account import Account

from ..protocol import messages as m
from ..protocol.auth import Keyring, sign_encoded
from .bus import Bus
from .checkpoint import Checkpoint
from .policy import AckPolicy
from .precompute import Precomputer

log = structlog.get_logger()


class Trace:
    """Appends ``{"dir": ..., "message": ...}`` lines after a header line."""

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.handle = os.fdopen(fd, "a", buffering=1)
        self.handle.write(json.dumps({"trace": 1, **header}) + "\n")

    def tick(self, seconds: float) -> None:
        self._write({"dir": "tick", "seconds": seconds})

    def record(self, direction: str, env: m.Envelope) -> None:
        self._write({"dir": direction, "message": env.model_dump(mode="json")})

    def _write(self, line: dict) -> None:
        """One line; a trace that cannot be written (a full disk) ends there, said once, and the
        agent goes on: it is a record of the work, not part of it."""
        if self.handle is None:
            return
        try:
            self.handle.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.error("trace stopped: cannot write it", path=str(self.path), reason=exc.strerror or str(exc))
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()


class Agent:
    """A party running on a bus: it signs what it sends and checks who signed what it gets.

    The signing key is the party's Ethereum key (its wallet's, or a throwaway
    one for a party without a wallet); ``pinned`` names parties whose address
    is known beforehand (the aggregator and ledger an operator trusts).
    """

    def __init__(self, role: str, name: str, core: Any, bus: Bus, trace: Trace | None = None,
                 key: bytes | None = None, pinned: dict[str, str] | None = None, tick_seconds: float = 1.0,
                 checkpoint: Checkpoint | None = None, precompute: bool = False) -> None:
        self.role, self.name, self.core, self.bus, self.trace = role, name, core, bus, trace
        wallet = getattr(getattr(core, "ctx", None), "wallet", None)
        self.key = key or (wallet.private_key if wallet is not None else os.urandom(32))
        self.keyring = Keyring(pinned=dict(pinned or {}))
        self.policy = AckPolicy(core.handle, self.publish, trace.record if trace else lambda d, e: None,
                                keyring=self.keyring, checkpoint=checkpoint,
                                snapshot=getattr(core, "snapshot", None),
                                statuses=getattr(core, "statuses", None), agent=name,
                                fault=getattr(core, "fault", None), holds=getattr(core, "holds", None))
        self.resumed = False
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:  # a restarted daemon: its jobs, who signs for whom, its recent answers
            state, bound, answers = saved
            core.restore(state)
            self.keyring.bound.update(bound)
            self.policy.answers.update(answers)
            self.resumed = True
        self.tick_seconds = tick_seconds
        self.ticker: asyncio.Task | None = None
        rng = getattr(getattr(core, "ctx", None), "rng", None)
        self.precomputer = Precomputer(rng, self.policy.idle) if precompute and hasattr(rng, "streams") else None

    @property
    def address(self) -> str:
        """The address this agent signs as."""
        return Account.from_key(self.key).address

    async def publish(self, env: m.Envelope) -> None:
        """Sign one envelope and send it to its recipient."""
        await self.bus.publish(env.recipient, sign_encoded(env, self.key), env.message_id)

    async def start(self) -> None:
        """Begin consuming this agent's queue; a core that keeps deadlines is ticked every ``tick_seconds``."""
        await self.bus.consume(self.role, self.name, self.policy, self.address)
        if hasattr(self.core, "tick") and self.ticker is None:
            self.ticker = asyncio.create_task(self._tick_forever())
        if self.precomputer is not None and not self.precomputer.thread.is_alive():
            self.precomputer.start()

    async def _tick_forever(self) -> None:
        record = self.trace.tick if self.trace else lambda s: None
        while True:
            await asyncio.sleep(self.tick_seconds)
            try:
                await self.policy.tick(self.core.tick, record)
            except Exception as exc:  # the broker away: deadlines are checked again at the next tick
                log.warning("tick not published", reason=f"{type(exc).__name__}: {exc}")

    async def stop(self) -> None:
        """Stop ticking and precomputing (the bus is closed by its owner)."""
        if self.precomputer is not None:
            self.precomputer.stop()
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.gather(self.ticker, return_exceptions=True)
            self.ticker = None

    async def act(self, step: Callable[[], list[m.Envelope]], direction: str) -> list[m.Envelope]:
        """Step the core on a decision of its own, outside any delivery (a buyer opening or giving up
        a job), and publish what it says. It waits for a delivery being handled: those step the
        core under the same lock, in another thread. The trace names the decision by ``direction``
        so a replay can take it again."""
        async with self.policy.lock:
            outgoing = step()
        await self.send_all(outgoing, direction)
        return outgoing

    async def send_all(self, envelopes: list[m.Envelope], direction: str = "out") -> None:
        """Publish messages the core produced outside a delivery."""
        for env in envelopes:
            if self.trace:
                self.trace.record(direction, env)
            await self.publish(env)
