"""The demo's aggregator and owners as ``deltaml`` daemons of their own, forked from this process,
and the queues a run owns on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

from ..agents import topology as t
from ..agents.parties import load_wallet
from ..data import Dataset, write_csv
from ..protocol.chain import LEDGER, Wallet
from ..protocol.machine import owner_names
from .job import DemoConfig
from .memory import trust_args, trusted


#: What every daemon imports before it reads its arguments (about a CPU second per process).
DAEMON_MODULES = ["deltaml.cli", "deltaml.agents.agent", "deltaml.agents.amqp", "deltaml.agents.checkpoint",
                  "deltaml.agents.parties", "deltaml.agents.runtime", "deltaml.data"]


def _daemon_main(argv: list[str], env: dict[str, str]) -> None:
    """The body of a daemon process: ``deltaml ARGV`` with ``env`` added to the environment."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the demo's (Interrupts), forked with it
    os.environ.update(env)
    from ..cli import main

    sys.exit(main(argv))


def launcher():
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
        self.trust = trusted(ledger_address, load_wallet(aggregator_key).address)
        self.argvs = [("aggregator", ["aggregator", "--key", str(aggregator_key),
                                      *trust_args(trusted(ledger_address))])]
        for name, part in zip(owner_names(config.owners), parts):
            path = tmp / f"{name}.csv"
            write_csv(part, path)
            self.argvs.append(("owner", ["owner", "--data", str(path), "--name", name, "--auto-accept",
                                         "--key", str(tmp / f"{name}.key"), *trust_args(self.trust)]))
        self.children: list = []

    async def empty_queues(self) -> None:
        from ..agents.amqp import AmqpBus

        bus = await AmqpBus(self.url).connect()
        try:
            await fresh_queues(bus, [("ledger", LEDGER), *job_queues(self.config.owners)])
        finally:
            await bus.close()

    async def remove_owner_queues(self) -> None:
        """Delete the owners' queues once their daemons are gone (:func:`delete_queues`)."""
        await delete_queues(self.url, [("owner", name) for name in owner_names(self.config.owners)])

    def start(self) -> None:
        """Empty the job's queues, then fork the daemons (call while this process has one thread)."""
        asyncio.run(self.empty_queues())
        # a caller that already runs threads gets the preloaded fork server instead (safe, slower)
        forked = threading.active_count() == 1
        context_ = multiprocessing.get_context("fork") if forked else launcher()
        for role, argv in self.argvs:
            env = _daemon_env(role, self.url, str(self.tmp))
            child = context_.Process(target=_daemon_main, args=(argv, env), name=f"deltaml-{role}", daemon=False)
            child.start() if forked else start_quietly(child)
            self.children.append(child)

    def stop(self) -> dict:
        """Stop the daemons (once); the seconds of work each reported (benchmarks/e2e.py)."""
        children, self.children = self.children, []
        stop_all(children)
        return {p.stem: json.loads(p.read_text()) for p in self.tmp.glob("*.json")}


def start_quietly(process) -> None:
    """Start a forkserver child without having it first re-run the parent's main script
    (multiprocessing's "safe importing of main"): a daemon needs nothing from it."""
    main = sys.modules["__main__"]
    script = main.__dict__.pop("__file__", None)
    try:
        process.start()
    finally:
        if script is not None:
            main.__file__ = script


def job_queues(owners: int) -> list[tuple[str, str]]:
    """(role, name) of the aggregator's, the buyer's and the owners' queues."""
    return [("aggregator", "aggregator"), ("buyer", "buyer"), *(("owner", o) for o in owner_names(owners))]


async def fresh_queues(bus, queues: list[tuple[str, str]]) -> None:
    """Declare and empty these (role, name) queues: a run owns its agents' queues, and nothing a
    killed earlier run left there may leak in. A queue someone consumes belongs to a marketplace
    running on this broker (the README's daemons): it is left alone and the run refused, where
    emptying it and consuming beside it would break both."""
    from ..agents.amqp import BrokerUnavailable

    declared = [await bus.declare(role, name) for role, name in queues]
    busy = [queue.name for queue in declared if queue.declaration_result.consumer_count]
    if busy:
        raise BrokerUnavailable(f"queue {busy[0]} has a consumer: another marketplace's daemons run on this "
                                f"broker under the same names; stop them first")
    for queue in declared:
        await queue.purge()


async def delete_queues(url: str, queues: list[tuple[str, str]]) -> None:
    """Delete these (role, name) queues, whatever they hold, once their daemons are gone: an owner's
    queue nobody reads collects every job offer made on this broker afterwards, for an owner of that
    name to find one day (a demo of 40 owners left 35 queues that each later 5-owner job offered into)."""
    from ..agents.amqp import AmqpBus

    bus = await AmqpBus(url).connect()
    try:
        for role, name in queues:
            with contextlib.suppress(Exception):
                await (await bus.declare(role, name)).delete(if_unused=False, if_empty=False)
    finally:
        await bus.close()


def stop_all(children) -> None:
    """SIGTERM every daemon, then wait; kill what does not stop within ten seconds."""
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
