"""One contract, two buses: the in-memory twin and the real RabbitMQ broker."""

import asyncio
import time
import uuid

import aio_pika
import pytest

from deltaml.agents import topology as t
from deltaml.agents.amqp import AmqpBus
from deltaml.agents.bus import MAX_ATTEMPTS, RETRY_DELAYS, MemoryBus, Outcome, QueueBusy, Verdict

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DELAYS = (0.4, 0.8)  # shorter than the daemons' waits before a retry, so the tests wait less


class MemoryHarness:
    async def start(self):
        self.bus = MemoryBus(retry_delays=DELAYS)
        return self.bus

    async def another_process(self):
        """What a second daemon on the same broker would consume through (here: the same memory)."""
        return self.bus

    async def dead_letters(self):
        await self.bus.drain()
        return [(d.body, d.reason) for d in self.bus.dead]

    async def stop(self):
        await self.bus.close()


class AmqpHarness:
    """The real broker; dead letters are read from a private queue bound to the fan-out DLX."""

    async def start(self):
        self.bus = await AmqpBus(AMQP_URL, retry_delays=DELAYS).connect()
        self.spy_conn = await aio_pika.connect_robust(AMQP_URL)
        ch = await self.spy_conn.channel()
        self.spy = await ch.declare_queue(exclusive=True)
        await self.spy.bind(t.DEAD_LETTER_EXCHANGE)
        self.names = []
        self.others = []
        return self.bus

    async def another_process(self):
        """A second connection, as a second daemon on the same broker would open."""
        self.others.append(await AmqpBus(AMQP_URL).connect())
        return self.others[-1]

    async def dead_letters(self):
        await asyncio.sleep(0.5)
        out = []
        while (msg := await self.spy.get(fail=False, timeout=2)) is not None:
            await msg.ack()
            out.append((msg.body, (msg.headers or {}).get(t.REASON_HEADER, "")))
        return out

    async def stop(self):
        for other in self.others:
            await other.close()
        await self.bus.close()
        await self.spy_conn.close()


@pytest.fixture(params=["memory", "amqp"])
async def harness(request):
    h = MemoryHarness() if request.param == "memory" else AmqpHarness()
    await h.start()
    yield h
    await h.stop()


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def collect(bus, role, name, verdict=Verdict.ACK, reason=""):
    got = []

    async def handler(delivery):
        got.append(delivery)
        return Outcome(verdict, reason)

    await bus.consume(role, name, handler)
    return got


async def wait_for(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_messages_reach_the_named_agent_only(harness):
    bus = harness.bus
    a, b = unique("o"), unique("o")
    got_a, got_b = await collect(bus, "owner", a), await collect(bus, "owner", b)
    await bus.publish(a, b"for a", "m1")
    await wait_for(lambda: len(got_a) == 1)
    await asyncio.sleep(0.2)
    assert got_a[0].body == b"for a" and got_b == []


async def test_a_message_to_an_address_reaches_the_agent_that_signs_as_it(harness):
    """The ledger tells a chain event to the addresses the contract names; each queue is bound to
    its agent's address (in lower case, whatever the spelling it was given in)."""
    bus = harness.bus
    a, b = unique("o"), unique("b")
    address_a, address_b = "0x" + uuid.uuid4().hex[:8] + "Ab" * 16, "0x" + uuid.uuid4().hex[:8] + "cd" * 16
    got_a, got_b = [], []
    for role, name, address, got in (("owner", a, address_a, got_a), ("buyer", b, address_b, got_b)):
        async def handler(delivery, got=got):
            got.append(delivery)
            return Outcome(Verdict.ACK, "")
        await bus.consume(role, name, handler, address)
    await bus.publish(t.address_recipient(address_a), b"for a's address", "m1")
    await bus.publish(a, b"for a's name", "m2")
    await wait_for(lambda: len(got_a) == 2)
    await asyncio.sleep(0.2)
    assert [d.body for d in got_a] == [b"for a's address", b"for a's name"] and got_b == []
    body = uuid.uuid4().hex.encode()
    await bus.publish(address_a, body, "m3")  # no queue is bound to that spelling: one word, one key
    assert any(b == body for b, _ in await harness.dead_letters()) and len(got_a) == 2


async def test_owners_broadcast_reaches_every_owner(harness):
    bus = harness.bus
    owners = [unique("o") for _ in range(3)]
    got = [await collect(bus, "owner", o) for o in owners]
    buyer = await collect(bus, "buyer", unique("b"))
    mark = uuid.uuid4().hex.encode()
    await bus.publish(t.BROADCAST_OWNERS, mark, "m2")
    await wait_for(lambda: all(any(d.body == mark for d in g) for g in got))
    assert not any(d.body == mark for d in buyer)


async def test_rejected_message_is_dead_lettered_with_its_reason(harness):
    bus = harness.bus
    name = unique("o")
    await collect(bus, "owner", name, Verdict.DEAD_LETTER, "bad payload: rows must be positive")
    body = uuid.uuid4().hex.encode()
    await bus.publish(name, body, "m3")
    dead = await harness.dead_letters()
    assert (body, "bad payload: rows must be positive") in dead


async def test_transient_failures_are_retried_after_a_wait_then_dead_lettered(harness):
    """Each retry waits its delay (on the broker, in a retry queue whose messages expire back into
    the agent's queue), so a fault that passes in seconds is ridden out; the queue's other messages
    are handled meanwhile."""
    bus = harness.bus
    name = unique("o")
    got, seen = [], []

    async def handler(delivery):
        got.append(delivery)
        seen.append(time.monotonic())
        return Outcome(Verdict.ACK if delivery.body == b"other" else Verdict.RETRY, "database briefly away")

    await bus.consume("owner", name, handler)
    body = uuid.uuid4().hex.encode()
    await bus.publish(name, body, "m4")
    await wait_for(lambda: len(got) == 1)
    await bus.publish(name, b"other", "m5")
    await wait_for(lambda: len(got) == MAX_ATTEMPTS + 1)
    dead = await harness.dead_letters()
    assert (body, "database briefly away") in dead
    tries = [k for k, d in enumerate(got) if d.body == body]
    assert [got[k].attempts for k in tries] == list(range(MAX_ATTEMPTS))
    assert got[1].body == b"other"  # handled while the failed one waited
    waits = [seen[b] - seen[a] for a, b in zip(tries, tries[1:])]
    assert all(wait >= delay * 0.95 for wait, delay in zip(waits, DELAYS)), waits


async def test_a_failure_that_passes_is_handled_on_its_retry_and_not_dead_lettered(harness):
    bus = harness.bus
    name = unique("o")
    got = []

    async def handler(delivery):
        got.append(delivery)
        return Outcome(Verdict.RETRY if delivery.attempts == 0 else Verdict.ACK, "node restarting")

    await bus.consume("owner", name, handler)
    body = uuid.uuid4().hex.encode()
    await bus.publish(name, body, "m6")
    await wait_for(lambda: len(got) == 2)
    assert [d.attempts for d in got] == [0, 1]
    assert not any(b == body for b, _ in await harness.dead_letters())
    await asyncio.sleep(DELAYS[1] + 0.3)
    assert len(got) == 2


async def test_a_held_delivery_goes_to_the_queues_next_consumer(harness):
    """An agent that halts (its checkpoint could not keep a step) holds the delivery under way,
    neither acknowledged nor retried: its successor gets it, marked as redelivered."""
    name, held = unique("o"), []

    async def halting(delivery):
        held.append(delivery)
        return Outcome(Verdict.HOLD, "stopping")

    first = await harness.another_process()
    await first.consume("owner", name, halting)
    body = uuid.uuid4().hex.encode()
    await harness.bus.publish(name, body, "m7")
    await wait_for(lambda: len(held) == 1)
    if first is not harness.bus:  # the broker gives it back when the first connection closes
        await first.close()
    got = await collect(harness.bus, "owner", name)
    await wait_for(lambda: len(got) == 1)
    assert got[0].body == body and got[0].redelivered and not held[0].redelivered
    assert len(held) == 1 and not any(b == body for b, _ in await harness.dead_letters())


def test_the_daemons_wait_longer_before_each_retry():
    assert MAX_ATTEMPTS == len(RETRY_DELAYS) + 1 and list(RETRY_DELAYS) == sorted(RETRY_DELAYS)
    assert RETRY_DELAYS[0] >= 1.0 and sum(RETRY_DELAYS) >= 10.0


async def test_a_second_consumer_of_a_queue_is_refused_and_the_first_keeps_every_message(harness):
    name = unique("o")
    got = await collect(harness.bus, "owner", name)
    other = await harness.another_process()
    with pytest.raises(QueueBusy, match=f"owner '{name}' is running on this broker"):
        await collect(other, "owner", name)
    for k in range(4):
        await harness.bus.publish(name, f"{k}".encode(), f"m-busy-{k}")
    await wait_for(lambda: len(got) == 4)
    assert sorted(d.body for d in got) == [b"0", b"1", b"2", b"3"]


async def test_the_bus_says_whether_a_queue_exists_and_is_consumed(harness):
    """What `buyer train` asks before it sends: no queue (a message would be unroutable), a queue
    nobody consumes (it waits there), a consumed one."""
    name = unique("o")
    assert await harness.bus.consumers("owner", name) is None
    declared = harness.bus.declare("owner", name)  # the memory bus declares at once, the broker's is awaited
    if asyncio.iscoroutine(declared):
        await declared
    assert await harness.bus.consumers("owner", name) == 0
    await collect(harness.bus, "owner", name)
    assert await harness.bus.consumers("owner", name) == 1


async def test_unroutable_messages_are_not_lost(harness):
    body = uuid.uuid4().hex.encode()
    await harness.bus.publish(unique("nobody"), body, "m5")
    assert any(b == body for b, _ in await harness.dead_letters())


async def test_closing_the_broker_bus_lets_a_delivery_under_way_finish_and_be_acknowledged():
    bus = await AmqpBus(AMQP_URL).connect()
    name = f"owner-close-{uuid.uuid4().hex[:6]}"
    started, finished = asyncio.Event(), []

    async def slow(delivery):
        started.set()
        await asyncio.sleep(0.5)
        finished.append(delivery.body)
        return Outcome(Verdict.ACK)

    try:
        await bus.consume("owner", name, slow)
        await bus.publish(name, b"work", "m-1")
        await asyncio.wait_for(started.wait(), 10)
    finally:
        await bus.close()  # while the handler sleeps
    assert finished == [b"work"]
    check = await AmqpBus(AMQP_URL).connect()
    try:
        queue = await check.declare("owner", name)
        assert queue.declaration_result.message_count == 0  # acknowledged, not left for redelivery
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await check.close()
