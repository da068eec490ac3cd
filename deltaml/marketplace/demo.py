"""``deltaml demo``: one job end to end, on the memory bus or over RabbitMQ with the aggregator
and each owner a process of its own, and its report (DESIGN §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from ..agents.agent import Agent
from ..agents.ledger import LedgerCore
from ..agents.parties import buyer_core, load_wallet
from ..agents.runtime import buyer_report, run_buyer_job
from ..agents.workers import workers_for
from ..data import Dataset
from ..protocol.buyer import BuyerPhase
from ..protocol.chain import LEDGER
from ..protocol.machine import FULL_MODEL
from ..protocol.paillier import PrivateKey, PublicKey, generate_keypair
from .daemons import DemoDaemons
from .job import DemoConfig, Progress, baselines, make_spec, prepare_parts
from .memory import ledger_core, memory_job, withdrawals


class Interrupts:
    """Ctrl-C for the whole of a demo over RabbitMQ, taken at safe points.

    Python's own handler raises ``KeyboardInterrupt`` wherever the main thread
    happens to be: between the demo's event loops that was at times inside a
    weakref callback (Python prints "Exception ignored" and the demo ran on to
    its end) or inside a lock (the logging module's, which the thread making
    the chain then waited for: the demo hung). This handler only counts, and
    cancels the job's task if one runs; the demo checks the count where it is
    safe to stop, and ends as an interrupted run does. A third Ctrl-C leaves at once, as Python's own
    handler would (a clean-up that cannot finish, a broker gone away)."""

    def __init__(self) -> None:
        self.count = 0
        self.task: asyncio.Task | None = None

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        self._cancel()

    def watch(self) -> None:
        """Cancel the running task on Ctrl-C (at once if one came already)."""
        self.task = asyncio.current_task()
        self._cancel()

    def _cancel(self) -> None:
        task = self.task
        if self.count and task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(task.cancel)

    def check(self) -> None:
        if self.count:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """This handler for SIGINT while the block runs (in the main thread; elsewhere Python's stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _on_a_daemon_thread(fn: Callable, *args) -> asyncio.Future:
    """``fn(*args)`` on a daemon thread, as a future of the running loop. Nothing waits for the thread
    at the loop's end or the interpreter's, as the default executor's would be: a demo interrupted
    while its chain is being made leaves at once."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result, error) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="deltaml-chain", daemon=True).start()
    return done


async def _amqp_job(config: DemoConfig, data: Dataset, daemons: DemoDaemons,
                    make_key: Callable[[], tuple[PublicKey, PrivateKey]], on_progress: Progress, url: str,
                    workers, interrupts: Interrupts) -> tuple:
    from ..agents.amqp import AmqpBus

    interrupts.watch()
    bus = await AmqpBus(url).connect()
    agents: list[Agent] = []
    # the ledger's chain is made on a thread while the job is requested and staffed, which needs no
    # chain (the embedded one takes about half a second, with a core otherwise idle: the trainers
    # start their obfuscator tables at their roles); what reaches the ledger meanwhile waits in its queue
    making = _on_a_daemon_thread(ledger_core, config.chain)
    making.add_done_callback(lambda made: made.cancelled() or made.exception())  # raised below, if awaited
    try:
        # the buyer's key is made while the daemons start (they need it only in the job request)
        public, key = await asyncio.to_thread(make_key)
        spec = make_spec(config, data, public.to_hex(), "buyer")
        core = buyer_core("buyer", key, wallet=load_wallet(None))
        if workers is not None:
            workers.warm(public)
            core.ctx.map = workers.map
        buyer = Agent("buyer", "buyer", core, bus, pinned=daemons.trust)
        agents.append(buyer)
        await buyer.start()
        job_id = uuid.uuid4().hex
        running = asyncio.ensure_future(run_buyer_job(buyer, spec, on_progress=on_progress, job_id=job_id))
        try:
            ledger = await making
        except BaseException:  # no chain (or Ctrl-C): the job cannot go on; the buyer gives it up
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
            raise
        ledger_agent = Agent("ledger", LEDGER, ledger, bus, key=daemons.ledger_key)
        agents.append(ledger_agent)
        await ledger_agent.start()
        job = await running
        job = await withdrawals(ledger, buyer.core, job_id)
    finally:
        timings = daemons.stop()
        for agent in agents:  # their tickers first: a tick publishing on a closing bus fails
            await agent.stop()
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
        with tempfile.TemporaryDirectory(prefix="deltaml-demo-") as tmp, Interrupts().installed() as interrupts:
            daemons = DemoDaemons(config, parts, Path(tmp), amqp_url)
            # first: forking needs a process with one thread; a refusal there (another marketplace's
            # daemons on these queues) has touched nothing, so it leaves before the clean-up below
            daemons.start()
            workers = None
            try:
                workers = workers_for(0)  # the buyer's pool, forked while that still holds
                interrupts.check()  # a Ctrl-C during the start, which it did not cut short
                public, (job, job_id, refused, ledger, timings) = asyncio.run(
                    _amqp_job(config, data, daemons, make_key, on_progress, amqp_url, workers, interrupts))
            except BaseException:  # Ctrl-C, a failure: what was on its way to the stopped agents goes too
                daemons.stop()
                with contextlib.suppress(Exception):
                    asyncio.run(daemons.empty_queues())
                interrupts.check()  # a Ctrl-C ends as one, whatever it cancelled on its way
                raise
            finally:
                daemons.stop()  # idempotent; here for a failure before the job ran
                if workers is not None:
                    workers.close()
                with contextlib.suppress(Exception):  # (a broker gone away: the failure says so already)
                    asyncio.run(daemons.remove_owner_queues())
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
