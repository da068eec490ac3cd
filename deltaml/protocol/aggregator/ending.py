"""How a job ends for the aggregator: its escrow settled and its result sent, or the job
failed and its escrow given up at once. The package's leaves: they call none of its other steps.
"""

from __future__ import annotations

from .. import messages as m
from ..chain import job_key
from ..machine import FULL_MODEL, Context, natural_key
from .job import AggJob, AggPhase


def settle(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Ask the chain to settle the escrow; its gas grows with everyone enrolled, dropped trainers too."""
    enrolled = len(job.trainers) + len(job.dropped) + len(job.validators)
    out = ctx.wallet.call(ctx, job_id, job.round, "settle", [job_key(job_id)], participants=enrolled)
    job.settle_request = next((env.payload for env in out if env.type == "tx_request"), None)
    return out


def ask_the_ledger_again(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Neither the settle's receipt nor the Settled event came: the same signed transaction goes
    to the ledger once more, which answers from the chain (mined: its receipt and events again;
    lost: sent now). Its nonce is the one already used, so it cannot settle anything twice."""
    request, job.settle_request = job.settle_request, None
    return [ctx.wallet.send(ctx, job_id, job.round, request)]


def send_result(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The encrypted final model to the buyer; the job waits for the buyer to close it."""
    job.phase = AggPhase.CLOSING
    result = m.JobResult(scale_bits=job.scale_bits, model=job.models[FULL_MODEL],
                         mse_history=sorted(job.mse_history), final_mse=job.final_mse)
    return [ctx.message(job_id, job.round, job.buyer, result)]


def fail(job: AggJob, ctx: Context, job_id: str, reason: str) -> list[m.Envelope]:
    """End the job for everyone; give a funded escrow up and settle it, so the buyer is refunded now."""
    job.phase = AggPhase.FAILED
    job.reason = reason
    end = m.JobFinished(ok=False, reason=reason)
    owners = [*job.trainers, *job.validators] or sorted(job.joined, key=natural_key)
    out = [ctx.message(job_id, job.round, p, end) for p in [job.buyer, *owners]]
    if job.on_chain and not job.settled:
        out += give_escrow_up(job, ctx, job_id)
    return out


def give_escrow_up(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Abandon a failed job's escrow and settle it at once: the buyer is refunded (less the fixed
    rewards, if training had verified progress) without waiting for the deadline."""
    return ctx.wallet.call(ctx, job_id, job.round, "abandon", [job_key(job_id), job.round]) + settle(job, ctx, job_id)


def on_settled(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The chain's word that the escrow is settled (its Settled event or the settle's receipt,
    whichever comes first): the metrics and the payments are on chain, so the result may go."""
    job.settled = True
    return send_result(job, ctx, job_id) if job.phase is AggPhase.SETTLING else []


def finish(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The job is done: its owners are told it ended well."""
    job.phase = AggPhase.FINISHED
    return [ctx.message(job_id, job.round, o, m.JobFinished(ok=True)) for o in job.trainers + job.validators]
