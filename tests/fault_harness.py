"""A marketplace on the real broker whose parties can be killed, silenced or restarted, and its books.

Owners (and, when asked, the aggregator) run as real ``deltaml`` daemon processes under their
roles' broker users; the ledger and the buyer run in the test's process. Every agent writes a
trace, so after the job the harness can account for every message: each one a party sent must
have been handled by its recipient, dead-lettered with a reason, or still be waiting in a durable
queue (a killed owner's). Anything else is a lost message. Wei are accounted on chain: what the
escrow took in must have been credited back out (payments plus refund), and the contract must
hold exactly the credits not yet withdrawn.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from deltaml.agents import topology as t
from deltaml.agents.agent import Agent, Trace
from deltaml.agents.amqp import AmqpBus
from deltaml.agents.ledger import Chain, LedgerCore
from deltaml.agents.replay import DECISIONS
from deltaml.agents.parties import buyer_core, context, load_wallet
from deltaml.agents.runtime import run_buyer_job
from deltaml.data import write_csv
from deltaml.marketplace import DemoConfig, make_spec, prepare_parts, withdrawals
from deltaml.marketplace.memory import trust_args
from deltaml.protocol import messages as m
from deltaml.protocol.buyer import BuyerPhase
from deltaml.protocol.chain import LEDGER, job_key

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).resolve().parents[1]

#: One row per injected fault, printed by ``make faults`` (see conftest.py).
RESULTS: list[dict] = []


@dataclass
class Books:
    sent: int = 0
    handled: int = 0
    dead: int = 0
    queued: int = 0
    lost: list[str] = field(default_factory=list)
    wei_deposited: int = 0
    wei_credited: int = 0
    wei_lost: int = 0


def last_step_outputs(trace: Path) -> frozenset[str]:
    """The ids of the messages a trace's last step sent: a step's answers are recorded before each
    is published, so a process killed in that step may never have published some of them. A
    process restarted from its checkpoint publishes them again; one restarted without its state
    never does (they are the fault, not a loss of the system's)."""
    last: list[str] = []
    for line in trace.read_text().splitlines():
        record = json.loads(line)
        last = [*last, record["message"]["message_id"]] if record.get("dir") == "out" else []
    return frozenset(last)


class Market:
    """One job's parties on the real broker, with handles to hurt them."""

    def __init__(self, tmp: Path, config: DemoConfig, keypair, aggregator_process: bool = False) -> None:
        self.tmp, self.config, self.keypair = tmp, config, keypair
        self.tag = uuid.uuid4().hex[:6]
        self.aggregator = f"aggregator-{self.tag}"
        self.buyer_name = f"buyer-{self.tag}"
        self.owners = [f"owner-{i}-{self.tag}" for i in range(1, config.owners + 1)]
        self.aggregator_process = aggregator_process
        self.procs: dict[str, subprocess.Popen] = {}
        self.unsent: frozenset[str] = frozenset()  # ids a killed process may never have published
        self.agents: list[Agent] = []
        self.traces: list[Trace] = []
        self.job_id = uuid.uuid4().hex
        self.wrap = lambda name, core: core

    # ---- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.admin = await AmqpBus(AMQP_URL).connect()
        self.spy_conn = await aio_pika.connect_robust(AMQP_URL)
        self.spy = await (await self.spy_conn.channel()).declare_queue(exclusive=True)
        await self.spy.bind(t.DEAD_LETTER_EXCHANGE)
        self.bus = await AmqpBus(AMQP_URL).connect()
        await (await self.admin.declare("ledger", LEDGER)).purge()  # the one ledger queue: nothing stale
        self.ledger = LedgerCore(context(LEDGER), Chain("embedded"))
        ledger = Agent("ledger", LEDGER, self.ledger, self.bus, self._trace("ledger", LEDGER))
        self.agents.append(ledger)
        aggregator_key = self.tmp / f"{self.aggregator}.key"
        self.trust = {LEDGER: ledger.address, self.aggregator: load_wallet(aggregator_key).address}
        await self.admin.declare("aggregator", self.aggregator)
        for name in self.owners:
            await self.admin.declare("owner", name)
        if self.aggregator_process:
            self.start_aggregator()
        else:
            from deltaml.agents.parties import aggregator_core

            core = aggregator_core(self.aggregator, wallet=load_wallet(aggregator_key))
            self.agents.append(Agent("aggregator", self.aggregator, core, self.bus,
                                     self._trace("aggregator", self.aggregator), pinned={LEDGER: ledger.address},
                                     tick_seconds=0.1))
        data, parts = prepare_parts(self.config)
        self.data, self.parts = data, parts
        for name, part in zip(self.owners, parts):
            path = self.tmp / f"{name}.csv"
            write_csv(part, path)
            self.start_owner(name)
        pub, priv = self.keypair
        core = self.wrap("buyer", buyer_core(self.buyer_name, priv, wallet=load_wallet(None)))
        self.buyer = Agent("buyer", self.buyer_name, core, self.bus, self._trace("buyer", self.buyer_name),
                           pinned=self.trust)
        self.agents.append(self.buyer)
        for agent in self.agents:
            await agent.start()
        await self.until_consuming(self.owners)

    async def until_consuming(self, names: list[str], role: str = "owner", timeout: float = 120) -> None:
        """Wait until each daemon consumes its queue: a job's recruiting clock must not run while
        five interpreters are still importing (seconds on a busy two-core machine)."""
        deadline = asyncio.get_running_loop().time() + timeout
        for name in names:
            while (await self.admin.declare(role, name)).declaration_result.consumer_count < 1:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"{name} is not consuming its queue after {timeout} s")
                await asyncio.sleep(0.1)

    def _trace(self, role: str, name: str) -> Trace:
        self.traces.append(Trace(self.tmp / f"{name}.jsonl", {"role": role, "name": name, "seed": ""}))
        return self.traces[-1]

    def _spawn(self, role: str, name: str, args: list[str]) -> None:
        env = {**os.environ, "DELTAML_AMQP_URL": t.role_url(AMQP_URL, role), "DELTAML_LOG_LEVEL": "warning"}
        trust = trust_args({n: addr for n, addr in self.trust.items() if n != name})
        with open(self.tmp / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "deltaml.cli", role, *args, "--key", str(self.tmp / f"{name}.key"),
                 "--trace", str(self.tmp / f"{name}.jsonl"), *trust], env=env, cwd=ROOT, stderr=log, stdout=log)

    def start_owner(self, name: str) -> None:
        self._spawn("owner", name, ["--data", str(self.tmp / f"{name}.csv"), "--name", name, "--auto-accept"])

    def start_aggregator(self) -> None:
        self._spawn("aggregator", self.aggregator, ["--name", self.aggregator,
                                                    "--state-dir", str(self.tmp / "aggregator-state"),
                                                    "--tick-seconds", "0.1"])

    def queues(self) -> list[tuple[str, str]]:
        """(role, name) of this market's own queues (the ledger's is shared)."""
        return [*(("owner", o) for o in self.owners), ("aggregator", self.aggregator), ("buyer", self.buyer_name)]

    def kill(self, name: str, resumes: bool = False) -> None:
        """SIGKILL: no goodbye, no flush beyond what was written. Unless it ``resumes`` from its
        checkpoint (which publishes its last step again), what its last step recorded and may not
        have published will never come: the books do not count it lost."""
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=10)
        if not resumes:
            self.unsent |= last_step_outputs(self.tmp / f"{name}.jsonl")

    # ---- run --------------------------------------------------------------------------------

    def spec(self) -> m.JobSpec:
        return make_spec(self.config, self.data, self.keypair[0].to_hex(), self.buyer_name)

    async def run(self, during=None, timeout: float = 300) -> object:
        """Run the job; ``during(market)`` runs alongside it (to inject the fault)."""
        task = asyncio.create_task(run_buyer_job(self.buyer, self.spec(), aggregator=self.aggregator,
                                                 job_id=self.job_id))
        if during is not None:
            await during(self)
        await asyncio.wait_for(task, timeout=timeout)
        return await self.settled()

    def buyer_job(self):
        return self.buyer.core.jobs.get(self.job_id)

    async def wait_for(self, predicate, timeout: float = 120, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what}")
            await asyncio.sleep(0.02)

    async def settled(self, timeout: float = 60):
        """For a paid job whose escrow exists, wait for settlement and every withdrawal but the dead's."""
        return await withdrawals(self.ledger, self.buyer.core, self.job_id, timeout, self.dead_addresses())

    def dead_addresses(self) -> set[str]:
        return {json.loads((self.tmp / f"{n}.key").read_text())["address"] for n, p in self.procs.items()
                if p.poll() is not None}

    # ---- books ------------------------------------------------------------------------------

    async def _drain_foreign(self, name: str) -> set[str]:
        """Message ids waiting in the queue of a party outside this market (none if it has no queue)."""
        found = set()
        for role in ("owner", "aggregator", "buyer"):
            channel = await self.admin.connection.channel()
            try:
                queue = await channel.declare_queue(t.queue_name(role, name), passive=True)
                while (msg := await queue.get(fail=False, no_ack=True)) is not None:
                    found.add(msg.message_id)
            except aio_pika.exceptions.ChannelClosed:  # no such queue
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
        return found

    async def quiet(self, timeout: float = 30.0) -> None:
        """Wait until every queue a live agent consumes is empty (the agents have caught up with
        whatever was sent to them: a fuzzed backlog can outlast the job)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = 0
            for role, name in [*self.queues(), ("ledger", LEDGER)]:
                queue = await self.admin.channel.declare_queue(t.queue_name(role, name), passive=True)
                result = queue.declaration_result
                busy += result.message_count if result.consumer_count else 0
            if not busy:
                return
            await asyncio.sleep(0.2)

    async def books(self) -> Books:
        """Account for every message of this job and every wei of its escrow (but what a killed
        process was publishing as it died: :meth:`kill`)."""
        await self.quiet()
        await asyncio.sleep(1.0)  # let the last acks and dead letters land
        books = Books()
        sent, handled = {}, set()
        for path in self.tmp.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if "message" not in record:
                    continue
                msg = record["message"]
                if (record["dir"] == "out" or record["dir"] in DECISIONS) and msg["recipient"] != t.PROGRESS:
                    sent[msg["message_id"]] = msg
                elif record["dir"] in ("in", "refused"):
                    handled.add(msg["message_id"])
        dead = set()
        self.fuzz_dead = {}
        while (d := await self.spy.get(fail=False, timeout=2)) is not None:
            await d.ack()
            dead.add(d.message_id)
            if (d.message_id or "").startswith("fuzz-"):
                self.fuzz_dead[d.message_id] = (d.headers or {}).get(t.REASON_HEADER, "")
        queued = set()
        for role, name in [*self.queues(), ("ledger", LEDGER)]:
            queue = await self.admin.channel.declare_queue(t.queue_name(role, name), passive=True)
            while (msg := await queue.get(fail=False, no_ack=False)) is not None:
                queued.add(msg.message_id)
                await msg.ack()
        # a fuzzed but validly signed message can make a party answer a stranger (the aggregator tells a
        # replayed "owner-1" that the job is full): such an answer waits in that stranger's queue, if any
        ours = {name for _, name in self.queues()} | {LEDGER, t.PROGRESS}
        for stranger in sorted({msg["recipient"] for msg in sent.values()} - ours):
            queued |= await self._drain_foreign(stranger)
        books.sent = len(sent)
        books.handled = len(handled & set(sent))
        books.dead = len(dead & set(sent))
        books.queued = len(queued & set(sent))
        books.lost = sorted(f"{msg['payload']['type']} → {msg['recipient']}"
                            for mid, msg in sent.items() if mid not in handled | dead | queued | self.unsent)
        job = self.buyer_job()
        if job_key(self.job_id) in self.ledger.jobs and job.settled:
            books.wei_deposited = job.spec.deposit_wei
            books.wei_credited = sum(job.payments_wei.values()) + job.refund_wei
            chain = self.ledger.chain
            outstanding = sum(chain.credit(a) for a in [*job.payments_wei, job.buyer_address])
            books.wei_lost = (books.wei_deposited - books.wei_credited) + (chain.balance(chain.address) - outstanding)
        elif job_key(self.job_id) in self.ledger.jobs:
            books.wei_deposited = job.spec.deposit_wei
            books.wei_lost = job.spec.deposit_wei  # stuck in an unsettled escrow
        return books

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for role, name in self.queues():
            await self.admin.channel.queue_delete(t.queue_name(role, name))
        await self.bus.close()
        for trace in getattr(self, "traces", []):
            trace.close()
        await self.admin.close()
        await self.spy_conn.close()


def record(fault: str, injected: int, job, books: Books) -> None:
    """One row of the ``make faults`` table."""
    RESULTS.append({"fault": fault, "injected": injected,
                    "finished": int(job.phase is BuyerPhase.FINISHED),
                    "failed_cleanly": int(job.phase is BuyerPhase.FAILED and bool(job.reason)),
                    "messages": books.sent, "messages_lost": len(books.lost), "wei_deposited": books.wei_deposited,
                    "wei_lost": books.wei_lost})
