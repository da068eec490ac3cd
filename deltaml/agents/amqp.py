"""``AmqpBus``: the bus on RabbitMQ through aio-pika.

A robust connection (it reconnects and restores the consumer after a broker
restart), publisher confirms on every publish, persistent messages, durable
queues, a bounded prefetch and manual acknowledgement driven by the
:class:`~deltaml.agents.bus.Outcome` the ack policy returns. A delivery to
retry waits in the broker, not in the daemon: its copy goes to the retry
exchange for its attempt, whose queue dead-letters it back to the agent's
queue (by the routing key it was published with) once its time is up. Exchanges come
from ``deploy/rabbitmq/definitions.json`` and are looked up passively, so a
role's broker user needs no right to create them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from . import topology as t
from .bus import MAX_ATTEMPTS, RETRY_DELAYS, Delivery, Handler, QueueBusy, Verdict

ATTEMPTS_HEADER = "x-deltaml-attempts"


class BrokerUnavailable(ConnectionError):
    """No broker answers at the given URL."""


class AmqpBus:
    """The RabbitMQ transport."""

    def __init__(self, url: str, prefetch: int = 8, retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self.url = url
        self.prefetch = prefetch
        self.retry_delays = retry_delays  # at most the retry queues' own times (definitions.json)
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.consuming: list = []  # (queue, consumer tag)
        self.in_flight = 0  # deliveries being handled
        self.idle = asyncio.Event()
        self.idle.set()

    async def connect(self) -> "AmqpBus":
        quiet = [logging.getLogger(n) for n in ("aio_pika", "aiormq")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.CRITICAL)  # the first failure is ours to report, in one line
        _require_amqp_url(self.url)
        try:
            self.connection = await aio_pika.connect_robust(self.url, timeout=10)
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            raise BrokerUnavailable(_unreachable(self.url, exc)) from None
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=self.prefetch)
        try:
            self.protocol = await self.channel.get_exchange(t.PROTOCOL_EXCHANGE, ensure=True)
            self.progress = await self.channel.get_exchange(t.PROGRESS_EXCHANGE, ensure=True)
            self.dead = await self.channel.get_exchange(t.DEAD_LETTER_EXCHANGE, ensure=True)
            self.retry = [await self.channel.get_exchange(t.retry_exchange(n), ensure=True)
                          for n in range(1, MAX_ATTEMPTS)]
        except aio_pika.exceptions.ChannelClosed as exc:
            with contextlib.suppress(Exception):  # left open, its tasks were reported at exit as tracebacks
                await self.connection.close()
            raise BrokerUnavailable(
                f"the broker lacks DeltaML's exchanges ({exc}); load deploy/rabbitmq/definitions.json with `make broker`"
            ) from None
        return self

    async def publish(self, recipient: str, body: bytes, message_id: str, headers: dict | None = None) -> None:
        message = aio_pika.Message(body, message_id=message_id, content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers or {})
        if recipient == t.PROGRESS:
            await self.progress.publish(message, routing_key="")
        else:
            await self.protocol.publish(message, routing_key=t.routing_key(recipient))

    async def declare(self, role: str, name: str, address: str | None = None):
        """An agent's durable queue and its bindings, so messages wait for it."""
        queue = await self.channel.declare_queue(t.queue_name(role, name), durable=True,
                                                 arguments=t.QUEUE_ARGUMENTS)
        for key in t.bindings(role, name, address):
            await queue.bind(self.protocol, key)
        return queue

    async def consumers(self, role: str, name: str, refused: int = 1) -> int | None:
        """How many consume an agent's queue; None if there is no such queue (what is sent there is
        dead-lettered as unroutable); ``refused`` if this broker user may not look. On a throwaway
        channel: a refused passive declare closes it."""
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(t.queue_name(role, name), passive=True)
            return queue.declaration_result.consumer_count
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        except aiormq.exceptions.ChannelAccessRefused:
            return refused  # what the caller takes as "nothing amiss", as before the question
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def consume(self, role: str, name: str, handler: Handler, address: str | None = None) -> None:
        queue_name = t.queue_name(role, name)
        queue = await self.declare(role, name, address)

        async def on_message(message: AbstractIncomingMessage) -> None:
            self.in_flight += 1
            self.idle.clear()
            try:
                await self._handle(message, handler, queue_name)
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self.idle.set()

        try:
            # exclusive: a second daemon of the same name is refused instead of taking half the messages
            tag = await queue.consume(on_message, exclusive=True)
        except aiormq.exceptions.ChannelAccessRefused:
            raise QueueBusy(queue_name, role, name) from None
        # aio-pika restores a robust queue's consumer after a reconnect only while the queue object
        # lives (it keeps weak references): hold it for the bus's lifetime
        self.consuming.append((queue, tag))

    async def _handle(self, message: AbstractIncomingMessage, handler: Handler, queue_name: str) -> None:
        headers = dict(message.headers or {})
        attempts = int(headers.get(ATTEMPTS_HEADER, 0))
        outcome = await handler(Delivery(message.body, headers, attempts, bool(message.redelivered)))
        if outcome.verdict is Verdict.HOLD:  # left unacknowledged: redelivered once this connection closes
            return
        if outcome.verdict is Verdict.RETRY and attempts + 1 < MAX_ATTEMPTS:
            headers[ATTEMPTS_HEADER] = attempts + 1
            retry = _copy(message, headers, expiration=self.retry_delays[attempts])
            await self.retry[attempts].publish(retry, routing_key=queue_name)  # back to queue_name when due
        elif outcome.verdict is not Verdict.ACK:
            headers.update({t.REASON_HEADER: outcome.reason[:1000], "x-deltaml-queue": queue_name})
            await self.dead.publish(_copy(message, headers), routing_key=queue_name)
        await message.ack()  # only after the dead letter or retry copy is confirmed

    async def close(self, grace: float = 5.0) -> None:
        """Stop taking deliveries, let those under way finish (answers published, acknowledged)
        for up to ``grace`` seconds, then close; what is left unacknowledged the broker redelivers."""
        if self.connection is None:
            return
        for queue, tag in self.consuming:
            with contextlib.suppress(Exception):  # a closed channel has no consumer to cancel
                await queue.cancel(tag)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), grace)
        connection, self.connection, self.consuming = self.connection, None, []
        await connection.close()  # once: a robust connection closed a second time did not return


def _copy(message: AbstractIncomingMessage, headers: dict, expiration: float | None = None) -> aio_pika.Message:
    """A persistent copy of a delivery with new headers (for a retry or a dead letter)."""
    return aio_pika.Message(message.body, message_id=message.message_id, headers=headers, expiration=expiration,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


def _require_amqp_url(url: str) -> None:
    """An ``amqp://`` or ``amqps://`` URL with a host; anything else is refused before connecting
    (a bare word was taken as a path and the connection attempt hung)."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("amqp", "amqps") or not parsed.hostname:
        raise BrokerUnavailable(f"--amqp-url {_redact(url)}: expected amqp://USER:PASSWORD@HOST:PORT/VHOST")


def _unreachable(url: str, exc: Exception) -> str:
    """Why a connection failed, in words that point at the fix."""
    parsed = urlsplit(url)
    where, user = _redact(url), unquote(parsed.username or "guest")
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return f"RabbitMQ at {where} refused user {user!r}: wrong user name or password"
    if isinstance(exc, aiormq.exceptions.ProtocolSyntaxError) and "Connection.Close" in str(exc):
        vhost = unquote(parsed.path.removeprefix("/")) or "/"
        return (f"RabbitMQ at {where} closed the connection as it opened: no virtual host {vhost!r}, "
                f"or user {user!r} may not use it")
    return f"no RabbitMQ at {where} ({exc.__class__.__name__}); start one with `make broker`"


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if scheme else f"{user}:***@{host}"
