"""What else befalls a running job: silence (silent trainers dropped, or the job failed), the
chain's events and the receipts of the aggregator's transactions, the buyer closing the job,
and its parties' questions and failures.
"""

from __future__ import annotations

from .. import messages as m
from ..chain import LEDGER, job_key, key_hash, same_address
from ..machine import Context, require
from .ending import ask_the_ledger_again, fail, finish, give_escrow_up, on_settled
from .job import WAITING_FOR, AggJob, AggPhase, quorum_holds
from .training import close_round, drop, maybe_start


DROPPED = "dropped: it fell silent or failed in a training round"


def drop_silent(job: AggJob, ctx: Context, job_id: str, silent: list[str], waited: float) -> list[m.Envelope]:
    """Go on without silent trainers: everyone else has answered the round (or failed in it)."""
    out = []
    for gone in silent:
        out += drop(job, ctx, job_id, gone, f"no gradient for round {job.round + 1} within {waited:g} s")
    return out + close_round(job, ctx, job_id)


def on_silence(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The job waited ``round_timeout`` seconds: drop silent trainers if a quorum answered, else fail;
    a buyer that holds its result and does not close the job keeps nobody waiting: it finishes; the
    chain's word on the settlement is asked for once more before the job fails without it."""
    waited = job.spec.round_timeout
    if job.phase == AggPhase.CLOSING:  # the result went out after settlement: the owners' part is done
        return finish(job, ctx, job_id)
    if job.phase == AggPhase.SETTLING and job.settle_request is not None:
        return ask_the_ledger_again(job, ctx, job_id)
    if job.phase == AggPhase.TRAINING:
        silent = [t for t in job.trainers if t not in job.replies and t not in job.failing]
        if quorum_holds(job, [*silent, *job.failing]):
            return drop_silent(job, ctx, job_id, silent, waited)
        return fail(job, ctx, job_id,
                     f"round {job.round + 1}: no gradient from {', '.join(silent)} within {waited:g} s")
    return fail(job, ctx, job_id, f"round {job.round}: waited {waited:g} s for {WAITING_FOR[job.phase]}")


def on_chain_event(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """The escrow drives the start: post the participants once funded, train once all confirmed."""
    require(env.sender == LEDGER, "chain events come from the ledger")
    ev, spec = env.payload, job.spec
    if ev.event == "JobCreated" and job.phase == AggPhase.FAILED and not job.on_chain:
        return give_up_late_escrow(job, ctx, env)
    if ev.event == "JobCreated" and job.phase == AggPhase.STARTING and not job.on_chain:
        a = ev.args
        expected = (ctx.wallet.address, spec.deposit_wei, spec.owners, spec.rounds, spec.fixed_reward_wei,
                    spec.variable_pool_wei, "0x" + key_hash(job.public_key).hex())
        got = (a["aggregator"], a["deposit"], a["owners"], a["rounds"], a["fixedReward"], a["variablePool"],
               a["keyHash"])
        if not same_address(got[0], expected[0]) or got[1:] != expected[1:]:
            return fail(job, ctx, env.job_id, "the escrow on chain does not match the job")
        job.on_chain = True
        trainers = [job.addresses[t] for t in job.trainers]
        validators = [job.addresses[v] for v in job.validators]
        return ctx.wallet.call(ctx, env.job_id, 0, "setParticipants", [job_key(env.job_id), trainers, validators])
    if ev.event == "TrainingStarted" and not job.training_started:
        job.training_started = True
        return maybe_start(job, ctx, env.job_id)
    if ev.event == "Settled":
        return on_settled(job, ctx, env.job_id)
    return []


def give_up_late_escrow(job: AggJob, ctx: Context, env: m.Envelope) -> list[m.Envelope]:
    """The buyer's deposit landed after the job failed (it was in flight when the buyer gave up, or
    an owner failed the job): the escrow is given up and settled now, so the deposit comes back at
    once instead of at its deadline. Only an escrow naming this aggregator can be given up by it."""
    if not same_address(env.payload.args["aggregator"], ctx.wallet.address):
        return []
    job.on_chain = True
    return give_escrow_up(job, ctx, env.job_id)


def on_receipt(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """A transaction of the aggregator's that failed fails the job while it runs, settling
    included: a metric the contract refuses (a model that diverged) fails it before the buyer
    has a result, and the escrow is given up and refunded instead of waiting for its deadline.
    A settle that went through lets the result go, like the escrow's Settled event."""
    receipt: m.TxReceipt = env.payload
    if receipt.ok and receipt.function == "settle":
        return on_settled(job, ctx, env.job_id)
    if receipt.ok or job.phase in (AggPhase.CLOSING, AggPhase.FINISHED, AggPhase.FAILED):
        return []
    return fail(job, ctx, env.job_id, f"{receipt.function} failed on chain: {receipt.reason}")


def on_closed(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer, "only the buyer closes its job")
    return finish(job, ctx, env.job_id)


def on_query(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """The buyer or an owner of the job asks whether it goes on: while it does, nothing is said (a
    job this aggregator does not know is answered, :class:`~.lost.LostJobs`); an owner asking
    after one that is over, or that dropped it, is told so again (the buyer has its own word)."""
    require(env.sender == job.buyer or env.sender in job.joined, "only the buyer or an owner asks after a job")
    if env.sender == job.buyer:
        return []
    if env.sender in job.dropped:
        return [ctx.reply(env, m.JobFinished(ok=False, reason=DROPPED))]
    if job.phase not in (AggPhase.FAILED, AggPhase.FINISHED):
        return []
    return [ctx.reply(env, m.JobFinished(ok=job.phase is AggPhase.FINISHED, reason=job.reason))]


def on_failure(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """A party could not do its part: a trainer in a training round is dropped like a silent one
    while the quorum holds, once the others have answered the round; else the job fails."""
    require(env.sender in [job.buyer, *job.trainers, *job.validators], "failure from a stranger")
    require(env.sender not in job.failing, f"{env.sender} already reported a failure in this round")
    out = leave_round(job, ctx, env.job_id, env.sender, env.payload.reason)
    return fail(job, ctx, env.job_id, f"{env.sender}: {env.payload.reason}") if out is None else out


def on_fault(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """A message of the job the aggregator could not handle, its retries spent: nobody sends it
    again, so the job cannot wait for it. A trainer's is taken as that trainer's failure (dropped
    while the quorum holds); any other party's fails the job; a stranger's changes nothing."""
    if env.sender not in (job.buyer, LEDGER, *job.trainers, *job.validators):
        return []  # a stranger's message cannot end the job
    what = not_handled(env)
    out = leave_round(job, ctx, env.job_id, env.sender, what)
    return fail(job, ctx, env.job_id, what) if out is None else out


def not_handled(env: m.Envelope) -> str:
    """What the aggregator says of a message it gave up on."""
    return f"the aggregator could not handle {env.sender}'s {env.type} of round {env.round}"


def leave_round(job: AggJob, ctx: Context, job_id: str, trainer: str, reason: str) -> list[m.Envelope] | None:
    """Drop a trainer that failed in a training round, if the quorum holds without it (the round
    steps once the others have answered); None if it cannot be."""
    if trainer not in job.trainers or trainer in job.failing or job.phase is not AggPhase.TRAINING:
        return None
    if not quorum_holds(job, [*job.failing, trainer]):
        return None
    job.replies.pop(trainer, None)  # a gradient it sent before goes with it
    job.failing[trainer] = reason
    return close_round(job, ctx, job_id)


