"""The buyer's job besides its decryptions: the participants named and the deposit made, a
trainer dropped, the escrow's events and receipts (the refund taken back), the job's end."""

from __future__ import annotations

from .. import messages as m
from ..chain import ABANDONED, LEDGER, job_key, key_hash
from ..machine import Context
from ..paillier import PrivateKey
from .job import BuyerJob, BuyerPhase, refuse_unless


def on_participants(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    refuse_unless(env.sender == job.aggregator, "participants from a party that is not the aggregator")
    p: m.Participants = env.payload
    refuse_unless(len(p.trainers) == job.spec.trainers and len(p.validators) == job.spec.validators,
                  "participant counts differ from the job")
    named = {*p.trainers, *p.validators} | ({job.aggregator} if job.spec.escrow else set())
    refuse_unless(set(p.addresses) == named, "participants without an address each")
    job.trainers, job.validators = list(p.trainers), list(p.validators)
    job.roster = list(p.trainers)
    job.addresses = dict(p.addresses)
    job.phase = BuyerPhase.TRAINING
    if not job.spec.escrow:
        return []
    job.addresses[job.spec.buyer] = ctx.wallet.address
    spec = job.spec
    args = [job_key(env.job_id), job.addresses[job.aggregator], spec.owners, spec.rounds, spec.fixed_reward_wei,
            spec.variable_pool_wei, spec.deadline, key_hash(key.public)]
    job.deposit = "sent"
    return ctx.wallet.call(ctx, env.job_id, 0, "createJob", args, value=spec.deposit_wei)


def on_dropped(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    """A silent trainer left: its models are no longer due; the job's quorum must still hold."""
    refuse_unless(env.sender == job.aggregator, "a drop from a party that is not the aggregator")
    gone = env.payload.trainer
    refuse_unless(gone in job.trainers, f"{gone} is not a trainer of this job")
    refuse_unless(0 < job.spec.quorum <= len(job.trainers) - 1, "a drop below the job's quorum")
    job.trainers.remove(gone)
    job.dropped.append(gone)
    return []


def on_chain_event(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    """Follow the escrow: a job given up on it is over; what each participant is credited, the
    refund, and take the refund back."""
    refuse_unless(env.sender == LEDGER, "chain events come from the ledger")
    ev = env.payload
    if ev.event == "Abandoned" and job.phase in (BuyerPhase.REQUESTED, BuyerPhase.TRAINING):
        job.phase, job.reason = BuyerPhase.FAILED, ABANDONED
    elif ev.event == "Credited":  # once per payee and job on chain; a copy the ledger sends again changes nothing
        job.payments_wei[ev.args["payee"]] = ev.args["amount"]
        job.chain_contributions[ev.args["payee"]] = ev.args["contribution"]
    elif ev.event == "Settled" and not job.settled:
        job.settled = True
        job.refund_wei = ev.args["refund"]
        if job.phase == BuyerPhase.SETTLING:
            job.phase = BuyerPhase.FINISHED
        if job.refund_wei > 0:
            return ctx.wallet.call(ctx, env.job_id, env.round, "withdraw", [])
    return []


def on_receipt(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    """A deposit that did not go through fails the job; the aggregator is told. The deposit's and
    the refund's receipts also say whether the buyer's money is still in play (``escrow_open``)."""
    receipt: m.TxReceipt = env.payload
    if receipt.function == "createJob":
        job.deposit = "made" if receipt.ok else "refused"
    elif receipt.function == "withdraw":
        job.withdrawn, job.withdraw_error = receipt.ok, "" if receipt.ok else receipt.reason or "refused"
    if receipt.ok or receipt.function != "createJob" or job.phase not in (BuyerPhase.REQUESTED, BuyerPhase.TRAINING):
        return []
    job.phase = BuyerPhase.FAILED
    job.reason = f"deposit failed: {receipt.reason}"
    return [ctx.message(env.job_id, 0, job.aggregator, m.Failure(reason=job.reason))]


def on_end(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    refuse_unless(env.sender == job.aggregator, "job end from a party that is not the aggregator")
    if job.phase is not BuyerPhase.FAILED or job.reason == ABANDONED:  # the buyer's own reason stays
        job.phase = BuyerPhase.FAILED
        job.reason = env.payload.reason
    if env.correlation_id in job.queries:  # the answer to "does it go on?": the aggregator lost the job
        job.lost = True
    return []
