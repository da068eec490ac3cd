"""Running agents: logging, signals, and the buyer's side of a job."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import uuid
from typing import Callable

import structlog

from ..protocol import messages as m
from ..protocol.buyer import BuyerCore, BuyerJob, BuyerPhase
from ..protocol.chain import Collector
from .agent import Agent

log = structlog.get_logger()


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """structlog to stderr: JSON lines or readable lines."""
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
    )


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written (a test may have swapped it since)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


async def until_signalled() -> None:
    """Wait for SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_buyer_job(agent: Agent, spec: m.JobSpec, aggregator: str = "aggregator",
                        on_progress: Callable[[int, float, float], None] = lambda *a: None,
                        job_id: str | None = None, poll: float = 0.05, refund_wait: float = 120.0) -> BuyerJob:
    """Open a job, report each published metric, return the job when it ends and, if it holds a
    deposit, once the escrow is settled and the refund withdrawn (up to ``refund_wait`` seconds:
    a failed job's escrow is settled by the aggregator at once, else at its deadline; a job the
    aggregator lost, up to ``LOST_REFUND_WAIT``)."""
    core: BuyerCore = agent.core
    job_id = job_id or uuid.uuid4().hex
    started = time.perf_counter()
    shown: set[int] = set()
    try:  # from the request on: a Ctrl-C just after it is sent must not leave the job behind
        await agent.act(lambda: core.open_job(job_id, spec, aggregator), direction="open")
        log.info("job requested", job=job_id, owners=spec.owners, rounds=spec.rounds)
        while True:
            job = core.jobs[job_id]
            for round_ in sorted(set(job.published) - shown):
                shown.add(round_)
                on_progress(round_, job.published[round_]["all"], time.perf_counter() - started)
            if job.phase in (BuyerPhase.FINISHED, BuyerPhase.FAILED):
                break
            await asyncio.sleep(poll)
    except asyncio.CancelledError:  # Ctrl-C: the job cannot go on without its buyer
        await give_up(agent, job_id, GAVE_UP)
        raise
    # a job its aggregator lost: it gives an escrow naming it up at once (a view on the chain, two
    # transactions); if none comes, nobody settles it before the deadline, and the whole wait is waste
    wait = min(refund_wait, LOST_REFUND_WAIT) if core.jobs[job_id].lost else refund_wait
    await _wait_until(lambda: not core.jobs[job_id].escrow_open, wait, poll)
    return core.jobs[job_id]


LOST_REFUND_WAIT = 30.0


GAVE_UP = "the buyer gave the job up (interrupted)"


async def ask_aggregator(agent: Agent, job_id: str) -> None:
    """Ask the aggregator whether the job goes on (:meth:`BuyerCore.ask`): its daemon is back."""
    await agent.act(lambda: agent.core.ask(job_id), direction="ask")


async def give_up(agent: Agent, job_id: str, reason: str, wait: float = 10.0) -> bool:
    """Tell the aggregator the buyer leaves ``job_id`` (see :meth:`BuyerCore.give_up`), waiting at
    most ``wait`` seconds for a delivery in hand and the broker; whether the word went out. If it
    did not, the job still fails, later: when it next needs the buyer."""
    try:
        await asyncio.wait_for(agent.act(lambda: agent.core.give_up(job_id, reason), direction="give_up"), wait)
        return True
    except Exception as exc:  # the broker gone, say: leaving must not turn into a traceback
        log.warning("the aggregator was not told the job is given up", job=job_id,
                    reason=f"{type(exc).__name__}: {exc}")
        job = agent.core.jobs.get(job_id)
        if job is not None and job.reason == reason:  # what the buyer's last line will say
            job.reason = f"{reason}, but its aggregator was not told"
        return False


async def collect(agent: Agent, job_id: str | None = None, owners: int | None = None,
                  wait: float = 60.0, poll: float = 0.05) -> Collector:
    """Settle ``job_id`` if asked, withdraw what the escrow credits the agent's key; the collector
    holds the receipts (and the amount withdrawn) when they are in or ``wait`` seconds passed."""
    core: Collector = agent.core
    await agent.send_all(core.collect(job_id, owners))
    await _wait_until(lambda: core.done(settling=job_id is not None), wait, poll)
    return core


async def _wait_until(done: Callable[[], bool], seconds: float, poll: float) -> None:
    """Poll ``done`` (what the agent's deliveries change meanwhile) until true or ``seconds`` passed."""
    waited = 0.0
    while not done() and waited < seconds:
        await asyncio.sleep(poll)
        waited += poll


def escrow_outcome(job: BuyerJob) -> str:
    """What became of the buyer's deposit, in a clause for the job's last line."""
    if job.deposit in ("", "refused"):
        return "no deposit was made"
    if job.escrow_open:
        return (f"the escrow still holds the deposit until it is settled (by anyone, at the latest at its "
                f"deadline, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(job.spec.deadline))}); the refund "
                f"is then credited to {job.buyer_address}, for its key to withdraw")
    if job.withdraw_error:
        return f"a refund of {job.refund_wei} wei is credited to {job.buyer_address}, but its withdraw failed: {job.withdraw_error}"
    if job.refund_wei:
        return f"{job.refund_wei} wei of the {job.spec.deposit_wei} wei deposit refunded to {job.buyer_address}"
    return f"the {job.spec.deposit_wei} wei deposit was paid out in full"


def buyer_report(job: BuyerJob, job_id: str, key_bits: int, wall: float) -> dict:
    """The DESIGN §5 report fields the buyer knows by itself."""
    spec = job.spec
    report = {
        "job_id": job_id, "rounds": spec.rounds, "owners": spec.owners, "validators": spec.validators,
        "lr": spec.lr, "eval_every": spec.eval_every, "key_bits": key_bits,
        "mse_history": [[r, v["all"]] for r, v in sorted(job.published.items())],
        "final_mse": job.published[spec.rounds]["all"],
        "model": list(job.model), "contributions": job.contributions,
        "payments_wei": job.settlement.payments, "deposit_wei": job.settlement.deposit,
        "refund_wei": job.settlement.refund, "wall_seconds": wall,
        "dropped": list(job.dropped),  # trainers that fell silent or failed and were left out (not paid)
    }
    if spec.escrow:  # what the contract paid, by address; the buyer's own prediction alongside
        addr = job.addresses
        predicted = {addr[n]: v for n, v in job.settlement.payments.items()}
        report.update({
            "participants": {n: addr[n] for n in [*(job.roster or job.trainers), *job.validators]},
            "buyer_address": job.buyer_address, "aggregator_address": addr[job.aggregator],
            "contributions": {addr[t]: c for t, c in job.contributions.items()},
            "contributions_micro": job.chain_contributions,
            "payments_wei": dict(job.payments_wei), "refund_wei": job.refund_wei, "deposit_wei": spec.deposit_wei,
            "refund_withdrawn": job.withdrawn or job.refund_wei == 0,
            "settlement_as_predicted": predicted == job.payments_wei and job.settlement.refund == job.refund_wei,
        })
    return report
