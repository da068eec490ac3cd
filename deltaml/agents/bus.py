"""The transport: a narrow interface, a RabbitMQ implementation and its in-memory twin.

A bus publishes envelopes by recipient and delivers each agent's queue to one
handler. The handler returns an :class:`Outcome`; the bus alone acks, retries
or dead-letters (the ack policy lives in :mod:`deltaml.agents.policy`).
Dead-lettered messages keep their body and carry the reason in a header.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import Awaitable, Callable, Protocol

from . import topology as t


class Verdict(Enum):
    ACK = "ack"
    DEAD_LETTER = "dead-letter"
    RETRY = "retry"
    HOLD = "hold"  # neither: the agent stops, and the broker gives the message to its successor


@dataclass(frozen=True)
class Outcome:
    """What to do with a delivery, and why."""

    verdict: Verdict
    reason: str = ""


@dataclass(frozen=True)
class Delivery:
    """One message as received: body, headers and redelivery count."""

    body: bytes
    headers: dict
    attempts: int = 0
    redelivered: bool = False  # the broker's flag: a consumer died holding it unacknowledged


Handler = Callable[[Delivery], Awaitable[Outcome]]
# seconds a failed delivery waits before its second and third attempt: a fault that passes in
# seconds (a chain node restarting, a database briefly locked) is ridden out instead of ending a
# party's part at once, while one that stays (a bug) is still reported within seconds
RETRY_DELAYS = (2.0, 8.0)
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1


class QueueBusy(RuntimeError):
    """An agent's queue already has a consumer: another daemon of that role and name is running.

    Two consumers of one queue would each get part of its messages, each missing what the other
    took (a job would stall or fail, a ledger would send transactions twice), so a bus consumes
    exclusively and the second daemon is refused."""

    def __init__(self, queue: str, role: str, name: str) -> None:
        hint = "stop it first" if role == "ledger" else "stop it, or give this one another --name"
        super().__init__(f"queue {queue} already has a consumer: {role} {name!r} is running on this broker; {hint}")


class Bus(Protocol):
    """What agents need from a transport."""

    async def publish(self, recipient: str, body: bytes, message_id: str) -> None: ...

    async def consume(self, role: str, name: str, handler: Handler, address: str | None = None) -> None: ...

    async def consumers(self, role: str, name: str, refused: int = 1) -> int | None: ...

    async def close(self) -> None: ...


@dataclass
class DeadLetter:
    """A message the bus gave up on, with its reason."""

    body: bytes
    reason: str
    queue: str


@dataclass
class MemoryBus:
    """The in-memory twin: same routing, same ack policy, real dead letters."""

    queues: dict[str, asyncio.Queue] = field(default_factory=dict)
    routes: dict[str, list[str]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    progress: list[bytes] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    retry_delays: tuple[float, ...] = RETRY_DELAYS
    waiting: set[asyncio.TimerHandle] = field(default_factory=set)  # retries not due yet

    def declare(self, role: str, name: str, address: str | None = None) -> str:
        """Create an agent's queue and its bindings (as the definitions do)."""
        queue = t.queue_name(role, name)
        self.queues.setdefault(queue, asyncio.Queue())
        for key in t.bindings(role, name, address):
            if queue not in self.routes.setdefault(key, []):
                self.routes[key].append(queue)
        return queue

    async def publish(self, recipient: str, body: bytes, message_id: str) -> None:
        if recipient == t.PROGRESS:
            self.progress.append(body)
            return
        targets = self.routes.get(t.routing_key(recipient), [])
        if not targets:
            self.dead.append(DeadLetter(body, f"unroutable: no queue for {recipient}", ""))
        for queue in targets:
            await self.queues[queue].put(Delivery(body, {"message_id": message_id}))

    async def consume(self, role: str, name: str, handler: Handler, address: str | None = None) -> None:
        queue = self.declare(role, name, address)
        if queue in self.consumed:
            raise QueueBusy(queue, role, name)
        self.consumed.add(queue)
        self.tasks.append(asyncio.create_task(self._pump(queue, handler)))

    async def consumers(self, role: str, name: str, refused: int = 1) -> int | None:
        """How many consume an agent's queue (0 or 1); None if there is no such queue (everyone may look)."""
        queue = t.queue_name(role, name)
        return int(queue in self.consumed) if queue in self.queues else None

    async def _pump(self, queue: str, handler: Handler) -> None:
        q = self.queues[queue]
        while True:
            delivery = await q.get()
            outcome = await handler(delivery)
            if outcome.verdict is Verdict.HOLD:  # its consumer is gone: the message waits for the next
                self.consumed.discard(queue)
                await q.put(Delivery(delivery.body, delivery.headers, delivery.attempts, redelivered=True))
                q.task_done()
                return
            if outcome.verdict is Verdict.RETRY and delivery.attempts + 1 < MAX_ATTEMPTS:
                self._later(q, Delivery(delivery.body, delivery.headers, delivery.attempts + 1))
            elif outcome.verdict is not Verdict.ACK:
                self.dead.append(DeadLetter(delivery.body, outcome.reason, queue))
            q.task_done()

    def _later(self, q: asyncio.Queue, delivery: Delivery) -> None:
        """Put a retry back on its queue once its delay has passed (as the broker's retry queues do)."""
        def due() -> None:
            self.waiting.discard(handle)
            q.put_nowait(delivery)
        handle = asyncio.get_running_loop().call_later(self.retry_delays[delivery.attempts - 1], due)
        self.waiting.add(handle)

    async def drain(self) -> None:
        """Wait until every queue is empty, every delivery handled and every retry made."""
        while self.waiting or any(q.qsize() or q._unfinished_tasks for q in self.queues.values()):  # noqa: SLF001
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for handle in self.waiting:
            handle.cancel()
        self.waiting.clear()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.consumed.clear()
