"""The marketplace on the memory bus: every party an agent in one event loop, and the wait for
a job's payments to be withdrawn (which the broker's runs share).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable

from ..agents.agent import Agent
from ..agents.bus import MemoryBus
from ..agents.ledger import Chain, LedgerCore
from ..agents.parties import aggregator_core, buyer_core, context, load_wallet
from ..agents.runtime import run_buyer_job
from ..data import Dataset
from ..protocol import messages as m
from ..protocol.buyer import BuyerPhase
from ..protocol.chain import LEDGER, job_key
from ..protocol.machine import owner_names
from ..protocol.owner import OwnerCore, OwnerData
from ..protocol.paillier import PrivateKey
from .job import DemoConfig, Progress


def trusted(ledger: str, aggregator: str | None = None) -> dict[str, str]:
    """The infrastructure a demo's parties pin: only these keys may sign as ledger and aggregator."""
    return {LEDGER: ledger, **({"aggregator": aggregator} if aggregator else {})}


def trust_args(pinned: dict[str, str]) -> list[str]:
    return [arg for name, address in pinned.items() for arg in ("--trust", f"{name}={address}")]


def ledger_core(chain_url: str) -> LedgerCore:
    """The ledger's core on its chain (the embedded one is made here: about half a second, mostly
    py-evm's import)."""
    return LedgerCore(context(LEDGER), Chain(chain_url))


def make_ledger(bus, chain_url: str, key: bytes | None = None):
    ledger = ledger_core(chain_url)
    return ledger, Agent("ledger", LEDGER, ledger, bus, key=key)


Wrap = Callable[[str, object], object]


def memory_market(bus: MemoryBus, config: DemoConfig, parts: list[Dataset], wrap: Wrap = lambda name, core: core,
                  tick_seconds: float = 1.0) -> tuple[LedgerCore, list[Agent], dict[str, str]]:
    """The standing marketplace on the memory bus, no buyer yet: the ledger, the aggregator and one
    owner per part; with the keys a buyer pins (the ledger's and the aggregator's)."""
    ledger, ledger_agent = make_ledger(bus, config.chain)
    aggregator = Agent("aggregator", "aggregator", wrap("aggregator", aggregator_core(wallet=load_wallet(None))),
                       bus, pinned=trusted(ledger_agent.address), tick_seconds=tick_seconds)
    trust = trusted(ledger_agent.address, aggregator.address)
    agents = [ledger_agent, aggregator]
    for name, part in zip(owner_names(config.owners), parts):
        core = OwnerCore(context(name, wallet=load_wallet(None)), OwnerData(part.columns, part.table()))
        agents.append(Agent("owner", name, wrap(name, core), bus, pinned=trust))
    return ledger, agents, trust


async def memory_job(config: DemoConfig, parts: list[Dataset], spec: m.JobSpec, key: PrivateKey,
                     on_progress: Progress = lambda *a: None, wrap: Wrap = lambda name, core: core,
                     tick_seconds: float = 1.0, bus: MemoryBus | None = None, job_id: str | None = None,
                     hold=None) -> tuple:
    """One job on the memory bus; ``wrap`` may replace a party's core (fault tests make one go silent)."""
    bus = bus if bus is not None else MemoryBus()
    ledger, agents, trust = memory_market(bus, config, parts, wrap, tick_seconds)
    buyer = Agent("buyer", "buyer", wrap("buyer", buyer_core("buyer", key, wallet=load_wallet(None))), bus,
                  pinned=trust)
    for agent in [*agents, buyer]:
        await agent.start()
    job_id = job_id or uuid.uuid4().hex
    try:
        job = await run_buyer_job(buyer, spec, on_progress=on_progress, job_id=job_id)
        job = await withdrawals(ledger, buyer.core, job_id)
        if hold is not None:  # a test keeps the agents up while it sends them more
            await hold()
    finally:
        for agent in agents:
            await agent.stop()
        await bus.close()
    timings = {f"{a.role}-{a.name}": a.policy.busy for a in [*agents, buyer]}
    return job, job_id, [d.reason for d in bus.dead], ledger, timings


async def withdrawals(ledger: LedgerCore, buyer, job_id: str, timeout: float = 60.0, absent=frozenset()):
    """Wait until the escrow is settled and every credited party has withdrawn; return the buyer's job.

    The pull payments are part of the job; a failed job whose escrow exists is
    settled by the aggregator at once, and its refund is withdrawn like a payment.
    Addresses in ``absent`` (parties that are gone) are not waited for.
    """
    deadline = time.monotonic() + timeout
    job = buyer.jobs[job_id]
    if not job.spec.escrow or (job.phase is not BuyerPhase.FINISHED and job_key(job_id) not in ledger.jobs):
        return job
    while not buyer.jobs[job_id].settled:
        if time.monotonic() > deadline:
            raise RuntimeError("the escrow was not settled in time")
        await asyncio.sleep(0.05)
    job = buyer.jobs[job_id]
    payees = [a for a in [*job.payments_wei, *([job.buyer_address] if job.refund_wei else [])] if a not in absent]
    # the chain first, then the buyer's own receipt of its refund (it follows the block by a message)
    while any(ledger.chain.credit(a) for a in payees) or buyer.jobs[job_id].escrow_open:
        if time.monotonic() > deadline:
            raise RuntimeError("payments were credited but not withdrawn in time")
        await asyncio.sleep(0.05)
    return buyer.jobs[job_id]
