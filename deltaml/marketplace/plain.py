"""The demo's job with encryption switched off (:mod:`deltaml.protocol.plain`): the same parties
as separate processes, the same rounds and messages over RabbitMQ — what ``benchmarks/e2e.py``
sets beside the encrypted job.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from ..agents.agent import Agent
from ..agents.parties import context
from ..data import Dataset
from ..protocol import messages as m
from ..protocol.linear import sufficient_stats
from ..protocol.machine import FULL_MODEL, Context, owner_names
from .daemons import fresh_queues, job_queues, launcher, start_quietly, stop_all
from .job import DemoConfig, baselines, make_spec, prepare_parts


def _plain_daemon(role: str, name: str, url: str, rows: tuple | None) -> None:
    """The body of a baseline daemon process: a plain core (:mod:`.protocol.plain`) as an agent."""
    from ..agents.amqp import AmqpBus
    from ..agents.runtime import configure_logging, until_signalled
    from ..protocol.plain import PlainAggregator, PlainOwner

    configure_logging("console", "warning")

    async def main() -> None:
        bus = await AmqpBus(url).connect()
        core = PlainAggregator(context(name)) if rows is None else PlainOwner(context(name), sufficient_stats(*rows))
        agent = Agent(role, name, core, bus)
        await agent.start()
        await until_signalled()
        await agent.stop()
        await bus.close()

    asyncio.run(main())


class _PlainBuyer:
    """The baseline's buyer: it only waits for the result."""

    def __init__(self) -> None:
        self.result: m.JobResult | None = None

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        if env.type == "job_result":
            self.result = env.payload
        return []


async def _plain_job(config: DemoConfig, data: Dataset, parts: list[Dataset], url: str) -> tuple[float, m.JobResult]:
    from ..agents.amqp import AmqpBus

    bus = await AmqpBus(url).connect()
    children: list = []
    names = owner_names(config.owners)
    try:
        await fresh_queues(bus, job_queues(config.owners))
        spawn = launcher()
        for role, name, rows in [("aggregator", "aggregator", None),
                                 *(("owner", n, (p.X, p.y)) for n, p in zip(names, parts))]:
            child = spawn.Process(target=_plain_daemon, args=(role, name, url, rows), name=f"deltaml-plain-{name}")
            start_quietly(child)
            children.append(child)
        buyer = _PlainBuyer()
        agent = Agent("buyer", "buyer", buyer, bus)
        await agent.start()
        # a spec names a key of its announced length like any other; no plain party uses it
        no_key = format((1 << (config.key_bits - 1)) | 1, "x")
        spec = make_spec(config, data, no_key, "buyer", escrow=False)
        request = m.JobRequest(spec=spec, initial_model=[0] * (len(spec.features) + 1))
        started = time.perf_counter()
        await agent.send_all([Context("buyer").message(uuid.uuid4().hex, 0, "aggregator", request)])
        while buyer.result is None:
            await asyncio.sleep(0.005)
        return time.perf_counter() - started, buyer.result
    finally:
        stop_all(children)
        await bus.close()


def run_plain(config: DemoConfig, amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/") -> dict:
    """The demo's job with encryption switched off (:mod:`.protocol.plain`): same parties as separate
    processes, same rounds and leave-one-out models, same signed messages over RabbitMQ."""
    started = time.perf_counter()
    data, parts = prepare_parts(config)
    job_seconds, result = asyncio.run(_plain_job(config, data, parts, amqp_url))
    return {"wall_seconds": time.perf_counter() - started, "job_seconds": job_seconds,
            "final_mse": result.final_mse[FULL_MODEL], "mse_history": result.mse_history,
            **baselines(parts, config)}
