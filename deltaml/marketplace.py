"""A whole marketplace on one machine: every party an agent, on the memory bus or RabbitMQ.

``--bus memory`` runs all agents in one event loop on :class:`MemoryBus`;
``--bus amqp`` starts the aggregator and each owner as a separate OS process
(``deltaml aggregator``, ``deltaml owner``) and runs the buyer here, all
talking through RabbitMQ. Either way the report adds plain-numpy baselines
computed on the same split, so a run proves itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .agents import topology as t
from .agents.agent import Agent
from .agents.bus import MemoryBus
from .agents.ledger import Chain, LedgerCore
from .agents.parties import aggregator_core, buyer_core, context, load_wallet
from .agents.runtime import buyer_report, run_buyer_job
from .agents.workers import workers_for
from .data import Dataset, demo_split, load, write_csv
from .protocol import messages as m
from .protocol.buyer import BuyerPhase
from .protocol.chain import DEFAULT_DEADLINE, LEDGER, Wallet, job_key
from .protocol.machine import FULL_MODEL, Context, owner_names
from .protocol.linear import gradient_descent, least_squares, sufficient_stats
from .protocol.owner import OwnerCore, OwnerData
from .protocol.paillier import PrivateKey, PublicKey, generate_keypair
from .settings import ConfigError

Progress = Callable[[int, float, float], None]


@dataclass(frozen=True)
class DemoConfig:
    """The flags of ``deltaml demo`` (DESIGN §5)."""

    owners: int = 5
    validators: int = 1
    rounds: int = 100
    lr: float = 1.5
    eval_every: int = 10
    key_bits: int = 2048
    dataset: str = "diabetes"
    poison_owner: int | None = None
    fixed_reward_wei: int = 10**16
    variable_pool_wei: int = 10**18
    frac_bits: int = 32
    magnitude_bits: int = 60
    chain: str = "embedded"
    round_timeout: float = 600.0
    quorum: int = 0


def poison(part: Dataset, seed: int = 1) -> Dataset:
    """The same rows with their targets shuffled."""
    return Dataset(part.features, part.target, part.X, np.random.default_rng(seed).permutation(part.y))


def check_config(config: DemoConfig) -> None:
    """The job's own limits (:class:`~deltaml.protocol.messages.JobSpec`) at the front door, before
    any process starts: one line naming the flag instead of a validation error from inside the job."""
    if not 1 <= config.validators < config.owners:
        raise ConfigError("need at least one validator and one trainer")
    if not 1 <= config.rounds <= 100_000:
        raise ConfigError(f"--rounds must be between 1 and 100000, got {config.rounds}")
    if config.eval_every < 1:
        raise ConfigError(f"--eval-every must be at least 1, got {config.eval_every}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {config.lr}")
    trainers = config.owners - config.validators
    if config.poison_owner is not None and not 1 <= config.poison_owner <= trainers:
        raise ConfigError(f"--poison-owner must name a trainer (1..{trainers})")
    if not 0 <= config.quorum <= trainers:
        raise ConfigError(f"--quorum must be between 0 and the {trainers} trainers, got {config.quorum}")
    if not (math.isfinite(config.round_timeout) and config.round_timeout > 0):
        raise ConfigError(f"--round-timeout must be a positive number of seconds, got {config.round_timeout}")


def prepare_parts(config: DemoConfig) -> tuple[Dataset, list[Dataset]]:
    """Check the flags, load and split the data; apply ``--poison-owner``."""
    check_config(config)
    data = load(config.dataset)
    parts = demo_split(data, config.owners)
    if config.poison_owner is not None:
        parts[config.poison_owner - 1] = poison(parts[config.poison_owner - 1])
    return data, parts


def make_spec(config: DemoConfig, data: Dataset, public_hex: str, buyer: str, escrow: bool = True) -> m.JobSpec:
    """The buyer's request for this data's schema."""
    lo, hi = data.X.min(axis=0), data.X.max(axis=0)
    pad = np.maximum(np.abs(hi - lo), 1.0)
    ranges = [(float(a - p), float(b + p)) for a, b, p in zip(lo, hi, pad)]
    return m.JobSpec(buyer=buyer, features=list(data.features), target=data.target, ranges=ranges,
                     owners=config.owners, validators=config.validators, rounds=config.rounds, lr=config.lr,
                     eval_every=config.eval_every, key_bits=config.key_bits, public_key=public_hex,
                     fixed_reward_wei=config.fixed_reward_wei, variable_pool_wei=config.variable_pool_wei,
                     frac_bits=config.frac_bits, magnitude_bits=config.magnitude_bits,
                     escrow=escrow, deadline=int(time.time()) + DEFAULT_DEADLINE if escrow else 0,
                     round_timeout=config.round_timeout, quorum=config.quorum)


def baselines(parts: list[Dataset], config: DemoConfig) -> dict:
    """Centralised GD and least squares on the trainers' rows, scored on the validators' rows."""
    split = config.owners - config.validators
    trainers = [sufficient_stats(p.X, p.y) for p in parts[:split]]
    validators = [sufficient_stats(p.X, p.y) for p in parts[split:]]
    rows = sum(v.rows for v in validators)

    def mse(w):
        return sum(v.sse(w) for v in validators) / rows

    w_gd = gradient_descent(trainers, config.lr, config.rounds)
    full = mse(w_gd)
    names = owner_names(config.owners)
    loo = {names[i]: mse(gradient_descent(trainers[:i] + trainers[i + 1:], config.lr, config.rounds)) - full
           for i in range(len(trainers))}
    return {"centralized_gd_mse": full, "closed_form_mse": mse(least_squares(trainers)),
            "centralized_gd_model": w_gd.tolist(), "centralized_contributions": loo}


def _trusted(ledger: str, aggregator: str | None = None) -> dict[str, str]:
    """The infrastructure a demo's parties pin: only these keys may sign as ledger and aggregator."""
    return {LEDGER: ledger, **({"aggregator": aggregator} if aggregator else {})}


def _trust_args(pinned: dict[str, str]) -> list[str]:
    return [arg for name, address in pinned.items() for arg in ("--trust", f"{name}={address}")]


def _ledger(bus, chain_url: str, key: bytes | None = None):
    ledger = LedgerCore(context(LEDGER), Chain(chain_url))
    return ledger, Agent("ledger", LEDGER, ledger, bus, key=key)


Wrap = Callable[[str, object], object]


def memory_market(bus: MemoryBus, config: DemoConfig, parts: list[Dataset], wrap: Wrap = lambda name, core: core,
                  tick_seconds: float = 1.0) -> tuple[LedgerCore, list[Agent], dict[str, str]]:
    """The standing marketplace on the memory bus, no buyer yet: the ledger, the aggregator and one
    owner per part; with the keys a buyer pins (the ledger's and the aggregator's)."""
    ledger, ledger_agent = _ledger(bus, config.chain)
    aggregator = Agent("aggregator", "aggregator", wrap("aggregator", aggregator_core(wallet=load_wallet(None))),
                       bus, pinned=_trusted(ledger_agent.address), tick_seconds=tick_seconds)
    trust = _trusted(ledger_agent.address, aggregator.address)
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
        job = await _withdrawals(ledger, buyer.core, job_id)
        if hold is not None:  # a test keeps the agents up while it sends them more
            await hold()
    finally:
        for agent in agents:
            await agent.stop()
        await bus.close()
    timings = {f"{a.role}-{a.name}": a.policy.busy for a in [*agents, buyer]}
    return job, job_id, [d.reason for d in bus.dead], ledger, timings


async def _withdrawals(ledger: LedgerCore, buyer, job_id: str, timeout: float = 60.0, absent=frozenset()):
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


#: What every daemon imports before it reads its arguments (about a CPU second per process).
DAEMON_MODULES = ["deltaml.cli", "deltaml.agents.agent", "deltaml.agents.amqp", "deltaml.agents.checkpoint",
                  "deltaml.agents.parties", "deltaml.agents.runtime", "deltaml.data"]


def _daemon_main(argv: list[str], env: dict[str, str]) -> None:
    """The body of a daemon process: ``deltaml ARGV`` with ``env`` added to the environment."""
    os.environ.update(env)
    from .cli import main

    sys.exit(main(argv))


def _launcher():
    """A server that imported :data:`DAEMON_MODULES` once, for daemons started where forking this
    process is unsafe (it runs threads: the plain baseline, scale.py, a threaded caller of the demo);
    each child is still its own process running ``deltaml.cli.main``."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(DAEMON_MODULES)
    return ctx


def _daemon_env(role: str, url: str, timings: str) -> dict[str, str]:
    """The environment of a daemon of ``role``: connected as that role's broker user."""
    env = {"DELTAML_AMQP_URL": t.role_url(url, role),
           "DELTAML_LOG_LEVEL": os.environ.get("DELTAML_LOG_LEVEL", "warning"), "DELTAML_TIMINGS_DIR": timings}
    env.update({k: v for k, v in os.environ.items() if k.startswith("DELTAML_") and k not in env})
    return env


class DemoDaemons:
    """The demo's aggregator and owners: ``deltaml`` daemons forked from this process.

    Forked, not spawned: this process has imported everything a daemon needs,
    so a child starts at once instead of importing web3's dependencies again
    (about 1.5 s of a job's start, while the cores are wanted elsewhere). That
    is safe only while this process has one thread, so :meth:`start` comes
    first: their arguments (data files, keys, the addresses they trust) are
    made beforehand, and their queues are emptied before anyone consumes them.
    """

    def __init__(self, config: DemoConfig, parts: list[Dataset], tmp: Path, url: str) -> None:
        self.tmp, self.url, self.config = tmp, url, config
        self.ledger_key = os.urandom(32)
        aggregator_key = tmp / "aggregator.key"
        ledger_address = Wallet(private_key=self.ledger_key).address
        self.trust = _trusted(ledger_address, load_wallet(aggregator_key).address)
        self.argvs = [("aggregator", ["aggregator", "--key", str(aggregator_key),
                                      *_trust_args(_trusted(ledger_address))])]
        for name, part in zip(owner_names(config.owners), parts):
            path = tmp / f"{name}.csv"
            write_csv(part, path)
            self.argvs.append(("owner", ["owner", "--data", str(path), "--name", name, "--auto-accept",
                                         "--key", str(tmp / f"{name}.key"), *_trust_args(self.trust)]))
        self.children: list = []

    async def empty_queues(self) -> None:
        from .agents.amqp import AmqpBus

        bus = await AmqpBus(self.url).connect()
        try:
            await fresh_queues(bus, [("ledger", LEDGER), *_job_queues(self.config.owners)])
        finally:
            await bus.close()

    def start(self) -> None:
        """Empty the job's queues, then fork the daemons (call while this process has one thread)."""
        asyncio.run(self.empty_queues())
        # a caller that already runs threads gets the preloaded fork server instead (safe, slower)
        forked = threading.active_count() == 1
        context_ = multiprocessing.get_context("fork") if forked else _launcher()
        for role, argv in self.argvs:
            env = _daemon_env(role, self.url, str(self.tmp))
            child = context_.Process(target=_daemon_main, args=(argv, env), name=f"deltaml-{role}", daemon=False)
            child.start() if forked else _start_quietly(child)
            self.children.append(child)

    def stop(self) -> dict:
        """Stop the daemons (once); the seconds of work each reported (benchmarks/e2e.py)."""
        children, self.children = self.children, []
        _stop(children)
        return {p.stem: json.loads(p.read_text()) for p in self.tmp.glob("*.json")}


def _start_quietly(process) -> None:
    """Start a forkserver child without having it first re-run the parent's main script
    (multiprocessing's "safe importing of main"): a daemon needs nothing from it."""
    main = sys.modules["__main__"]
    script = main.__dict__.pop("__file__", None)
    try:
        process.start()
    finally:
        if script is not None:
            main.__file__ = script


def _job_queues(owners: int) -> list[tuple[str, str]]:
    """(role, name) of the aggregator's, the buyer's and the owners' queues."""
    return [("aggregator", "aggregator"), ("buyer", "buyer"), *(("owner", o) for o in owner_names(owners))]


async def fresh_queues(bus, queues: list[tuple[str, str]]) -> None:
    """Declare and empty these (role, name) queues: a run owns its agents' queues, and nothing a
    killed earlier run left there may leak in. A queue someone consumes belongs to a marketplace
    running on this broker (the README's daemons): it is left alone and the run refused, where
    emptying it and consuming beside it would break both."""
    from .agents.amqp import BrokerUnavailable

    declared = [await bus.declare(role, name) for role, name in queues]
    busy = [queue.name for queue in declared if queue.declaration_result.consumer_count]
    if busy:
        raise BrokerUnavailable(f"queue {busy[0]} has a consumer: another marketplace's daemons run on this "
                                f"broker under the same names; stop them first")
    for queue in declared:
        await queue.purge()


def _stop(children) -> None:
    """SIGTERM every daemon, then wait; kill what does not stop within ten seconds."""
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()


async def _amqp_job(config: DemoConfig, data: Dataset, daemons: DemoDaemons,
                    make_key: Callable[[], tuple[PublicKey, PrivateKey]], on_progress: Progress, url: str,
                    workers=None) -> tuple:
    from .agents.amqp import AmqpBus

    bus = await AmqpBus(url).connect()
    try:
        ledger, ledger_agent = _ledger(bus, config.chain, daemons.ledger_key)
        await ledger_agent.start()
        # the buyer's key is made while the daemons start (they need it only in the job request)
        public, key = await asyncio.to_thread(make_key)
        spec = make_spec(config, data, public.to_hex(), "buyer")
        core = buyer_core("buyer", key, wallet=load_wallet(None))
        if workers is not None:
            workers.warm(public)
            core.ctx.map = workers.map
        buyer = Agent("buyer", "buyer", core, bus, pinned=daemons.trust)
        await buyer.start()
        job_id = uuid.uuid4().hex
        job = await run_buyer_job(buyer, spec, on_progress=on_progress, job_id=job_id)
        job = await _withdrawals(ledger, buyer.core, job_id)
    finally:
        timings = daemons.stop()
        await bus.close()
    timings.update({"buyer-buyer": buyer.policy.busy, "ledger-ledger": ledger_agent.policy.busy})
    return public, (job, job_id, [], ledger, timings)


def run_demo(config: DemoConfig, bus: str = "memory", on_progress: Progress = lambda *a: None,
             keypair: tuple[PublicKey, PrivateKey] | None = None,
             amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/") -> dict:
    """Run one job end to end; return the DESIGN §5 report."""
    started = time.perf_counter()
    data, parts = prepare_parts(config)

    def make_key() -> tuple[PublicKey, PrivateKey]:
        return keypair or generate_keypair(config.key_bits)

    if bus == "memory":
        public, private = make_key()
        spec = make_spec(config, data, public.to_hex(), "buyer")
        job, job_id, refused, ledger, timings = asyncio.run(memory_job(config, parts, spec, private, on_progress))
    else:
        with tempfile.TemporaryDirectory(prefix="deltaml-demo-") as tmp:
            daemons = DemoDaemons(config, parts, Path(tmp), amqp_url)
            daemons.start()  # first: forking needs a process with one thread
            workers = workers_for(0)  # the buyer's pool, forked while that still holds
            try:
                public, (job, job_id, refused, ledger, timings) = asyncio.run(
                    _amqp_job(config, data, daemons, make_key, on_progress, amqp_url, workers))
            except BaseException:  # Ctrl-C, a failure: what was on its way to the stopped agents goes too
                daemons.stop()
                with contextlib.suppress(Exception):
                    asyncio.run(daemons.empty_queues())
                raise
            finally:
                daemons.stop()  # idempotent; here for a failure before the job ran
                if workers is not None:
                    workers.close()
    if job.phase is not BuyerPhase.FINISHED:
        raise RuntimeError(f"job did not finish: {job.reason or 'failed'}{_divergence(job)}")
    report = buyer_report(job, job_id, public.bits, 0.0)
    report.update({"bus": bus, "dataset": config.dataset, **baselines(parts, config), "messages_refused": refused})
    report["chain"] = chain_report(ledger, job)
    report["busy_seconds"] = timings  # per agent, per message type: where the time went
    report["wall_seconds"] = time.perf_counter() - started
    return report


def _divergence(job) -> str:
    """A hint for a failed job whose published validation MSE grew far past the zero model's:
    gradient descent diverged, and the metric or the model outgrew what the job can hold."""
    history = [job.published[r][FULL_MODEL] for r in sorted(job.published) if FULL_MODEL in job.published[r]]
    if len(history) < 2 or not history[-1] > 1000 * history[0]:
        return ""
    return (f" (the validation MSE grew from {history[0]:.6g} to {history[-1]:.3g}: gradient descent "
            "diverged; try a smaller --lr)")


def chain_report(ledger: LedgerCore, job) -> dict:
    """What the chain says: the escrow left in the contract, what each address withdrew, gas per function."""
    c = ledger.chain
    return {"url": c.url, "contract": c.address, "chain_id": c.chain_id,
            "contract_balance_wei": c.balance(c.address),
            "credit_left_wei": {a: c.credit(a) for a in [*job.payments_wei, job.buyer_address]},
            "withdrawn_wei": dict(ledger.withdrawn), "gas": ledger.gas_report()}


def run_memory(config: DemoConfig, on_progress: Progress = lambda *a: None,
               keypair: tuple[PublicKey, PrivateKey] | None = None) -> dict:
    """The demo on the memory bus."""
    return run_demo(config, "memory", on_progress, keypair)


def _plain_daemon(role: str, name: str, url: str, rows: tuple | None) -> None:
    """The body of a baseline daemon process: a plain core (:mod:`.protocol.plain`) as an agent."""
    from .agents.amqp import AmqpBus
    from .agents.runtime import configure_logging, until_signalled
    from .protocol.plain import PlainAggregator, PlainOwner

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
    from .agents.amqp import AmqpBus

    bus = await AmqpBus(url).connect()
    children: list = []
    names = owner_names(config.owners)
    try:
        await fresh_queues(bus, _job_queues(config.owners))
        spawn = _launcher()
        for role, name, rows in [("aggregator", "aggregator", None),
                                 *(("owner", n, (p.X, p.y)) for n, p in zip(names, parts))]:
            child = spawn.Process(target=_plain_daemon, args=(role, name, url, rows), name=f"deltaml-plain-{name}")
            _start_quietly(child)
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
        _stop(children)
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
