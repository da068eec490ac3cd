"""The one place that decides what happens to a delivery.

Success acks. A message that fails to decode, is not signed by the address
its sender is known by (:mod:`deltaml.protocol.auth`), or breaks the protocol
is dead-lettered with the reason. A message already handled (same message id
from the same sender in the same job) is acknowledged and changes nothing; another
sender's reuse of an id, or the same name's in another job, is judged on its own, so a stranger cannot have an honest
message's id acknowledged in its place. If the broker redelivered it — a consumer
died between handling and acking — its recorded answers are published again,
since they may not all have left; a mere duplicate (a publisher's retry) is
not answered twice, or duplicates would multiply round after round. Any
other exception is a transient failure, retried a bounded number of times; after
the last, the core is told (``fault``) so its party says it failed rather than
going silent. A step the checkpoint cannot keep (a full disk) halts the
agent: nothing of it is published or acknowledged, and every later delivery
is held, so the daemon can stop and its successor, started from the last
saved step, gets the message again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Awaitable, Callable

import structlog

from ..protocol import messages as m
from ..protocol.auth import AuthError, Keyring
from ..protocol.errors import DecodeError, JobOver, ProtocolError, Transient
from .bus import MAX_ATTEMPTS, Delivery, Outcome, Verdict
from .checkpoint import CheckpointError

log = structlog.get_logger()
REMEMBERED = 10_000


class AckPolicy:
    """Decode, deduplicate, step the core, publish, decide the verdict."""

    def __init__(self, step: Callable[[m.Envelope], list[m.Envelope]],
                 publish: Callable[[m.Envelope], Awaitable[None]],
                 record: Callable[[str, m.Envelope], None] = lambda d, e: None,
                 keyring: Keyring | None = None, checkpoint=None,
                 snapshot: Callable[[], bytes] | None = None,
                 statuses: Callable[[], dict[str, dict]] | None = None, agent: str | None = None,
                 fault: Callable[[m.Envelope], list[m.Envelope]] | None = None,
                 holds: Callable[[str], bool] | None = None) -> None:
        self.step = step
        self.holds = holds  # whether the core still holds a job: the keyring keeps only those jobs' signers
        self.fault = fault
        self.log = log.bind(agent=agent) if agent else log  # which party says it, in a shared console
        self.statuses = statuses or (lambda job_id=None: {})
        self.keyring = keyring if keyring is not None else Keyring()
        self.checkpoint, self.snapshot = checkpoint, snapshot
        self.publish = publish
        self.record = record
        self.answers: OrderedDict[str, list[m.Envelope]] = OrderedDict()
        self.lock = asyncio.Lock()
        self.busy: dict[str, float] = {}  # seconds spent stepping the core, per message type
        self.cpu = 0.0  # CPU seconds of the thread stepping the core, all types
        self.mark = time.monotonic()  # end of the core's last step or tick
        self.idle = threading.Event()  # clear while the core steps (a helper thread may work when set)
        self.idle.set()
        self.halted = asyncio.Event()  # set when a step could not be checkpointed: the agent must stop
        self.halted_by: CheckpointError | None = None

    async def tick(self, tick: Callable[[float], list[m.Envelope]],
                   record_tick: Callable[[float], None] = lambda s: None) -> None:
        """Tell the core how long it has been idle since its last step, and publish what it decides.

        Time the core spent working on a delivery is not idle time: a slow
        handler of ours must not count as another party's silence.
        """
        async with self.lock:
            if self.halted.is_set():
                return
            now = time.monotonic()
            seconds, self.mark = now - self.mark, now
            try:
                outgoing, changed = await asyncio.to_thread(self._watched, tick, seconds)
            except Exception:  # a bug in a timeout handler must not stop the agent
                self.log.exception("tick failed")
                return
            record_tick(seconds)
            if not outgoing or not self._save(None, []):
                return
            for out in outgoing:
                self.record("out", out)
                await self.publish(out)
            self.log.info("acted on silence", sent=[o.type for o in outgoing])
            _log_changes(self.log, changed)

    def _watched(self, step: Callable, arg, job_id: str | None = None) -> tuple[list[m.Envelope], dict[str, dict]]:
        """Step the core, timing its thread's CPU; with the jobs whose status the step changed
        (``job_id``'s only, for a message: a tick may act on any job)."""
        started = time.thread_time()
        before = self.statuses(job_id)
        try:
            outgoing = step(arg)
        finally:
            self.cpu += time.thread_time() - started
        after = self.statuses(job_id)
        return outgoing, {job: status for job, status in after.items() if before.get(job) != status}

    async def _give_up(self, env: m.Envelope, bound) -> None:
        """A message its handler failed on for good: the core says so to whom it concerns (a
        failing party replies with a failure instead of going silent, STYLE §4)."""
        if self.fault is None:
            return
        try:
            outgoing, changed = await asyncio.to_thread(self._watched, self.fault, env, env.job_id)
        except Exception:
            bound.exception("could not report the failure")
            return
        self.record("fault", env)
        if not self._save(None, []):
            return
        for out in outgoing:
            self.record("out", out)
            await self.publish(out)
        bound.warning("gave the message up", sent=[o.type for o in outgoing])
        _log_changes(bound, changed, current=env.job_id)

    def _save(self, message_id: str | None, outgoing: list[m.Envelope]) -> bool:
        """Checkpoint the step before anything of it leaves (see :mod:`deltaml.agents.checkpoint`);
        False if it could not be kept: the agent is halted, and nothing of the step may leave."""
        if self.checkpoint is None:
            return True
        try:
            self.checkpoint.save(self.snapshot(), self.keyring.bound, message_id, outgoing)
        except CheckpointError as exc:
            self.log.error("state not saved: stopping", reason=str(exc))
            self.halted_by = exc
            self.halted.set()
            return False
        return True

    async def __call__(self, delivery: Delivery) -> Outcome:
        """Handle one delivery to the end even if the transport gives up waiting (a dropped connection
        cancels its consumers): a step the core took is then recorded with its answers, and the
        broker's redelivery of the unacknowledged message publishes them again instead of finding
        a core that moved on without them."""
        task = asyncio.ensure_future(self._handle(delivery))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retrieve)  # nobody awaits it now: report how it ended
            raise

    async def _handle(self, delivery: Delivery) -> Outcome:
        try:
            env = m.decode(delivery.body)
        except DecodeError as exc:
            self.log.warning("message refused", reason=str(exc))
            return Outcome(Verdict.DEAD_LETTER, f"undecodable: {exc}")
        except Exception as exc:  # whatever the bytes: refuse them, never die of them
            self.log.exception("decoder failed")
            return Outcome(Verdict.DEAD_LETTER, f"undecodable: {type(exc).__name__}: {str(exc)[:200]}")
        bound = self.log.bind(job=env.job_id, round=env.round, message_id=env.message_id, type=env.type,
                         sender=env.sender)
        try:
            address = self.keyring.check(env)
        except AuthError as exc:
            bound.warning("message refused", reason=str(exc))
            return Outcome(Verdict.DEAD_LETTER, f"unauthenticated: {exc}")
        except Exception as exc:
            bound.exception("signature check failed")
            return Outcome(Verdict.DEAD_LETTER, f"unauthenticated: {type(exc).__name__}")
        async with self.lock:
            if self.halted.is_set():  # its core is ahead of its checkpoint: a successor handles the rest
                return Outcome(Verdict.HOLD, "the agent is stopping")
            handled = handled_key(env)
            if handled in self.answers:
                if delivery.redelivered:
                    for out in self.answers[handled]:
                        await self.publish(out)
                bound.info("duplicate delivery acknowledged", answered_again=delivery.redelivered)
                return Outcome(Verdict.ACK, "duplicate")
            started = time.perf_counter()
            self.idle.clear()
            try:
                outgoing, changed = await asyncio.to_thread(self._watched, self.step, env, env.job_id)
            except ProtocolError as exc:
                self.record("refused", env)
                # a reply in flight when its job ended is dead-lettered like any refusal, but is no alarm
                (bound.info if isinstance(exc, JobOver) else bound.warning)("message refused", reason=str(exc))
                return Outcome(Verdict.DEAD_LETTER, f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug or a transient fault: bounded retries, then dead letter
                if isinstance(exc, Transient):  # expected to pass: one line, no traceback
                    bound.warning("handler failed", reason=str(exc), attempt=delivery.attempts + 1)
                else:
                    bound.exception("handler failed")
                if delivery.attempts + 1 >= MAX_ATTEMPTS:  # the last try: nobody will send it again
                    await self._give_up(env, bound)
                    if self.halted.is_set():  # the failure it reported could not be saved: a successor's turn
                        return Outcome(Verdict.HOLD, "the step could not be saved")
                return Outcome(Verdict.RETRY, f"{type(exc).__name__}: {exc}")
            finally:
                self.idle.set()
            self.busy[env.type] = self.busy.get(env.type, 0.0) + time.perf_counter() - started
            self.mark = time.monotonic()
            self.keyring.bind(env, address)
            if self.holds is not None:
                self.keyring.trim(self.holds)
            self.record("in", env)
            self.answers[handled] = outgoing
            while len(self.answers) > REMEMBERED:
                self.answers.popitem(last=False)
            if not self._save(handled, outgoing):
                return Outcome(Verdict.HOLD, "the step could not be saved")
            for out in outgoing:
                self.record("out", out)
                await self.publish(out)
            bound.debug("handled", sent=[o.type for o in outgoing])
            _log_changes(bound, changed, current=env.job_id)
            return Outcome(Verdict.ACK)


def _log_changes(logger, changed: dict[str, dict], current: str | None = None) -> None:
    """One info line per job whose phase (or reason, or pay) a step or a tick changed; ``logger``
    is already bound to the job ``current``, if any."""
    for job, status in changed.items():
        details = {k: v for k, v in status.items() if k != "phase"}
        logger.info(f"job {status['phase']}", **details, **({} if job == current else {"job": job}))


def handled_key(env: m.Envelope) -> str:
    """What a handled message is remembered by: its id within its sender's in its job, since a
    name is bound to a signer per job (:class:`deltaml.protocol.auth.Keyring`): the same name in
    another job may be another party, whose message must not pass for a duplicate of this one."""
    return f"{env.job_id}/{env.sender}/{env.message_id}"


def _retrieve(task: asyncio.Task) -> None:
    """Log the failure of a delivery whose consumer stopped waiting for it."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("delivery not finished", reason=f"{type(task.exception()).__name__}: {task.exception()}")
