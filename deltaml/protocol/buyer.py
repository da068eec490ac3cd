"""The buyer's state machine, and its guard against being a decryption oracle.

Theory of operation: the buyer opens a job with its public key and an
encryption of the zero model (REQUESTED). Once the aggregator names the
participants (TRAINING) the buyer answers exactly three kinds of request,
each only when the job is at a point that calls for it:

- a refresh: at most one per round, for the job's models, with a range that
  fits the key; the buyer sees only masked values;
- a masked product: only from a named validator, only at an evaluation round,
  once per validator and round, for the models due then;
- a metric: once per evaluation round, only for a ciphertext that is the
  homomorphic sum of the ``[SSE_v]`` of exactly the validators it served.

Anything else raises :class:`DecryptionRefused`, which leaves the state as it
was. The final model is decrypted once, after the last evaluation; then the
buyer computes leave-one-out contributions from the metrics it published
itself, settles the payment split and closes the job (FINISHED).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import numpy as np

from . import messages as m
from .budget import fits_mask
from .errors import DecryptionRefused, OutsideMask
from .fixedpoint import FixedPoint
from .machine import FULL_MODEL, Context, Machine, eval_models, is_eval_round, loo_trainers, model_ids, table, without
from .metric import masked_products, proof_context
from .paillier import PrivateKey, PublicKey
from .refresh import refresh_masked
from .drbg import Drbg
from .auth import AuthError, signer
from .chain import (ABANDONED, LEDGER, ChainParty, same_address, expected_settlement, job_key, key_hash, model_index,
                    mse_micro)
from .settlement import Settlement, leave_one_out


class BuyerPhase(Enum):
    REQUESTED = auto()
    TRAINING = auto()
    SETTLING = auto()
    FINISHED = auto()
    FAILED = auto()


@dataclass
class BuyerJob:
    """One job as the buyer sees it."""

    phase: BuyerPhase
    spec: m.JobSpec
    aggregator: str
    trainers: list[str] = field(default_factory=list)
    validators: list[str] = field(default_factory=list)
    roster: list[str] = field(default_factory=list)  # trainers as enrolled on chain
    dropped: list[str] = field(default_factory=list)
    refreshed: set[int] = field(default_factory=set)
    served: dict[int, set[str]] = field(default_factory=dict)
    published: dict[int, dict[str, float]] = field(default_factory=dict)
    model: list[float] | None = None
    contributions: dict[str, float] = field(default_factory=dict)
    settlement: Settlement | None = None
    reason: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    published_micro: dict[int, dict[str, int]] = field(default_factory=dict)
    settled: bool = False
    payments_wei: dict[str, int] = field(default_factory=dict)
    refund_wei: int = 0
    chain_contributions: dict[str, int] = field(default_factory=dict)
    deposit: str = ""  # the escrow's deposit: "" (none asked), "sent", "made" or "refused"
    withdrawn: bool = False  # the refund's withdraw went through
    withdraw_error: str = ""  # why it did not
    queries: set[str] = field(default_factory=set)  # ids of the buyer's "does it go on?" questions
    lost: bool = False  # the aggregator said it lost the job: an escrow naming it is given up at once

    @property
    def escrow_open(self) -> bool:
        """Whether money of the buyer's may still be in the escrow or on its way back: a deposit
        without its receipt yet, or one made whose job is not settled or whose refund is not
        withdrawn. A buyer that leaves before this is False leaves its refund in the contract."""
        if self.deposit == "sent":
            return True
        if self.deposit != "made" or self.withdraw_error:
            return False
        return not (self.settled and (self.refund_wei == 0 or self.withdrawn))

    @property
    def dim(self) -> int:
        return len(self.spec.features) + 1

    @property
    def buyer_address(self) -> str | None:
        return self.addresses.get(self.spec.buyer)


def refuse_unless(condition: bool, reason: str) -> None:
    """Refuse a decryption the buyer was not expecting."""
    if not condition:
        raise DecryptionRefused(reason)


def _signer(env: m.Envelope) -> str:
    try:
        return signer(env)
    except AuthError as exc:
        raise DecryptionRefused(str(exc)) from None


def _check_models(job: BuyerJob, models: dict, allowed: list[str], pub: PublicKey) -> None:
    refuse_unless(set(models) <= set(allowed) and models, "request for models that are not due")
    refuse_unless(all(len(v) == job.dim for v in models.values()), "vectors of the wrong length")
    pub.require_models(models, "model")


def _on_participants(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
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


def _on_refresh(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    req: m.RefreshRequest = env.payload
    spec = job.spec
    refuse_unless(env.sender == job.aggregator, "refresh request from a party that is not the aggregator")
    refuse_unless(env.round <= spec.rounds and env.round not in job.refreshed,
                  f"refresh for round {env.round} not expected (already done or past the end)")
    refuse_unless(fits_mask(req.value_bits, key.public.bits), "refresh range does not fit the key")
    refuse_unless(req.drop_bits == req.value_bits - spec.magnitude_bits - spec.frac_bits and req.drop_bits > 0,
                  "refresh drop does not bring the model back to its base scale")
    _check_models(job, req.models, model_ids(job.spec, job.trainers), key.public)
    work = [(key, cs, req.value_bits, req.drop_bits, _seed(ctx)) for cs in req.models.values()]
    try:
        out = dict(zip(req.models, ctx.map(_refresh, work)))
    except OutsideMask as exc:
        return _stop_decrypting(job, env, ctx, f"the refresh of round {env.round}: {exc}")
    job.refreshed.add(env.round)
    return [ctx.reply(env, m.RefreshReply(models=out))]


def _on_products(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    req: m.ProductRequest = env.payload
    spec = job.spec
    refuse_unless(env.sender in job.validators, f"product request from {env.sender}, not a validator")
    # the buyer has not heard from a validator before its first request, so the name alone binds
    # nobody yet: the request must be signed by the address the validator joined with
    refuse_unless(same_address(_signer(env), job.addresses.get(env.sender)),
                  f"product request for {env.sender} not signed by the address it joined with")
    refuse_unless(is_eval_round(env.round, spec.rounds, spec.eval_every), f"round {env.round} is not evaluated")
    refuse_unless(env.round not in job.published, "evaluation already published")
    refuse_unless(env.sender not in job.served.get(env.round, set()), "validator already served this round")
    due = eval_models(spec, env.round, job.trainers)
    refuse_unless(set(req.models) == set(due), "product request for models that are not due")
    work = []
    for mid, pair in req.models.items():
        refuse_unless(len(pair.u) == job.dim == len(pair.v), "vectors of the wrong length")
        refuse_unless(fits_mask(pair.u_bits, key.public.bits), "masked range does not fit the key")
        key.public.require_ciphertexts(pair.u, f"masked model {mid}")
        key.public.require_ciphertexts(pair.v, f"masked product {mid}")
        context = proof_context(env.job_id, env.round, mid, env.sender)
        work.append((key, pair.u, pair.v, pair.u_bits, _seed(ctx), context))
    try:
        answers = ctx.map(_products, work)
    except OutsideMask as exc:
        return _stop_decrypting(job, env, ctx, f"{env.sender}'s product request for round {env.round}: {exc}")
    out, proofs = {}, {}
    for mid, (products, proved) in zip(req.models, answers):
        out[mid] = products
        proofs[mid] = [m.ProductProof(a=p.a, b=p.b, z=p.z, w1=p.w1, w2=p.w2) for p in proved]
    job.served.setdefault(env.round, set()).add(env.sender)
    return [ctx.reply(env, m.ProductReply(models=out, proofs=proofs))]


def _stop_decrypting(job: BuyerJob, env: m.Envelope, ctx: Context, what: str) -> list[m.Envelope]:
    """End the job at the first value outside its mask: a refusal the requester could
    retry would answer, one bit at a time, whether any plaintext is below a bound."""
    job.phase = BuyerPhase.FAILED
    job.reason = f"{what}; the buyer decrypts nothing more for this job"
    return [ctx.message(env.job_id, env.round, job.aggregator, m.Failure(reason=job.reason))]


def _seed(ctx: Context) -> bytes:
    """A model's own randomness, drawn in order from the buyer's: whichever process works on
    that model, the same draw gives the same ciphertexts."""
    return ctx.rng.getrandbits(256).to_bytes(32, "big")


def _refresh(work: tuple) -> list:
    """One model's refresh (pure: it may run in a worker process)."""
    key, ciphers, value_bits, drop_bits, seed = work
    return refresh_masked(key, ciphers, value_bits, drop_bits, Drbg(seed))


def _products(work: tuple) -> tuple:
    """One model's masked products and proofs (pure: it may run in a worker process)."""
    key, u, v, u_bits, seed, context = work
    return masked_products(key, u, v, u_bits, Drbg(seed), context)


def _on_metric(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    req: m.MetricRequest = env.payload
    pub = key.public
    refuse_unless(env.sender == job.aggregator, "metric request from a party that is not the aggregator")
    refuse_unless(env.round not in job.published, f"metric of round {env.round} already published")
    served = job.served.get(env.round, set())
    refuse_unless(served == set(job.validators), "not every validator has been served for this evaluation")
    refuse_unless(sorted(p.validator for p in req.parts) == sorted(served), "parts are not the served validators")
    for p in req.parts:  # each as its validator signed it, for this job, evaluation and scale
        refuse_unless(same_address(_signer(p.reply(env.job_id, env.round, req.sse_scale_bits)),
                                   job.addresses.get(p.validator)),
                      f"the part of {p.validator} is not signed by the address it joined with")
    due = eval_models(job.spec, env.round, job.trainers)
    refuse_unless(set(req.totals) == set(due), "totals for models that are not due")
    for mid in due:
        refuse_unless(all(mid in p.sse for p in req.parts), "a part lacks a model")
        pub.require_ciphertexts([req.totals[mid], *(p.sse[mid] for p in req.parts)], f"total and parts of {mid}")
        refuse_unless(pub.sum(p.sse[mid] for p in req.parts) == req.totals[mid] % pub.nsquare,
                      "total is not the sum of the validators' ciphertexts")
    rows = sum(p.rows for p in req.parts)
    metrics = {}
    for mid, total in req.totals.items():
        dec = key.decrypt_verifiably(total)
        mse = FixedPoint().decode(dec.plaintext, req.sse_scale_bits) / rows
        metrics[mid] = m.PublishedMetric(sse=dec.plaintext, randomness=dec.randomness, rows=rows, mse=mse)
    job.published[env.round] = {mid: p.mse for mid, p in metrics.items()}
    job.published_micro[env.round] = {mid: mse_micro(p.sse, req.sse_scale_bits, rows) for mid, p in metrics.items()}
    return [ctx.reply(env, m.MetricReply(metrics=metrics))]


def _on_result(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    spec = job.spec
    refuse_unless(env.sender == job.aggregator and env.round == spec.rounds, "result before the last round")
    refuse_unless(spec.rounds in job.published and 0 in job.published, "result before the final metrics")
    res: m.JobResult = env.payload
    refuse_unless(len(res.model) == job.dim, "final model of the wrong length")
    codec = FixedPoint(spec.frac_bits, spec.magnitude_bits)
    job.model = [codec.decode(key.decrypt(c), res.scale_bits) for c in res.model]
    final = job.published[spec.rounds]
    loo = loo_trainers(spec, job.trainers)
    job.contributions = leave_one_out(final[FULL_MODEL], {t: final[without(t)] for t in loo})
    micro = job.published_micro[spec.rounds]
    final_micro = {model_index(mid, job.roster): v for mid, v in micro.items()}
    for i in range(1, len(job.roster) + 1):  # a contribution not measured is no contribution
        final_micro.setdefault(i, final_micro[0])
    job.settlement = expected_settlement(
        fixed_reward=spec.fixed_reward_wei, variable_pool=spec.variable_pool_wei, trainers=job.roster,
        validators=job.validators, mse0=job.published_micro[0][FULL_MODEL], final=final_micro,
        dropped=job.dropped)
    job.phase = BuyerPhase.FINISHED if job.settled or not spec.escrow else BuyerPhase.SETTLING
    closed = m.JobClosed(payments_wei=job.settlement.payments, refund_wei=job.settlement.refund)
    return [ctx.reply(env, closed)]


def _on_dropped(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    """A silent trainer left: its models are no longer due; the job's quorum must still hold."""
    refuse_unless(env.sender == job.aggregator, "a drop from a party that is not the aggregator")
    gone = env.payload.trainer
    refuse_unless(gone in job.trainers, f"{gone} is not a trainer of this job")
    refuse_unless(0 < job.spec.quorum <= len(job.trainers) - 1, "a drop below the job's quorum")
    job.trainers.remove(gone)
    job.dropped.append(gone)
    return []


def _on_chain_event(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
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


def _on_receipt(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
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


def _on_end(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
    refuse_unless(env.sender == job.aggregator, "job end from a party that is not the aggregator")
    if job.phase is not BuyerPhase.FAILED or job.reason == ABANDONED:  # the buyer's own reason stays
        job.phase = BuyerPhase.FAILED
        job.reason = env.payload.reason
    if env.correlation_id in job.queries:  # the answer to "does it go on?": the aggregator lost the job
        job.lost = True
    return []


B = BuyerPhase
BUYER_TABLE = table(
    (B.REQUESTED, "participants", _on_participants, (B.TRAINING,)),
    (B.TRAINING, "refresh_request", _on_refresh, (B.TRAINING, B.FAILED)),
    (B.TRAINING, "product_request", _on_products, (B.TRAINING, B.FAILED)),
    (B.TRAINING, "metric_request", _on_metric, (B.TRAINING,)),
    (B.TRAINING, "job_result", _on_result, (B.FINISHED, B.SETTLING)),
    (B.TRAINING, "trainer_dropped", _on_dropped, (B.TRAINING,)),
    ((B.REQUESTED, B.TRAINING, B.SETTLING, B.FAILED), "job_finished", _on_end, (B.FAILED,)),
    (tuple(B), "chain_event", _on_chain_event, tuple(B)),
    (tuple(B), "tx_receipt", _on_receipt, tuple(B)),
)


class BuyerCore(ChainParty):
    """The buyer's pure core: its key, its jobs, one step per message."""

    def __init__(self, ctx: Context, key: PrivateKey) -> None:
        self.ctx = ctx
        self.key = key
        self.wallet = ctx.wallet
        self.jobs: dict[str, BuyerJob] = {}
        self.machine = Machine("buyer", {
            k: type(t)(lambda job, env, c, h=t.handler: h(job, env, c, self.key), t.to)
            for k, t in BUYER_TABLE.items()
        })

    def open_job(self, job_id: str, spec: m.JobSpec, aggregator: str = "aggregator") -> list[m.Envelope]:
        """Start a job: the request with an encryption of the zero model."""
        if job_id in self.jobs:
            raise ValueError(f"job {job_id} already exists")
        if spec.public_key != self.key.public.to_hex() or spec.buyer != self.ctx.name:
            raise ValueError("the job's key and buyer must be this buyer's")
        if spec.escrow and self.wallet is None:
            raise ValueError("a job with escrow needs the buyer's Ethereum key")
        zero = [self.key.encrypt(0, self.ctx.rng) for _ in range(len(spec.features) + 1)]
        self.jobs[job_id] = BuyerJob(phase=BuyerPhase.REQUESTED, spec=spec, aggregator=aggregator)
        return [self.ctx.message(job_id, 0, aggregator, m.JobRequest(spec=spec, initial_model=zero))]

    def give_up(self, job_id: str, reason: str) -> list[m.Envelope]:
        """Leave a job before its result: the aggregator is told, so the job ends now for everyone
        (its owners are released, a funded escrow is given up and refunded at once) rather than
        when it next needs the buyer. A job already over, or unknown, is left as it is."""
        job = self._under_way(job_id)
        if job is None:
            return []
        job.phase, job.reason = BuyerPhase.FAILED, reason
        return [self.ctx.message(job_id, 0, job.aggregator, m.Failure(reason=reason))]

    def ask(self, job_id: str) -> list[m.Envelope]:
        """Ask the aggregator whether a job still going on here goes on there (its daemon is back
        after a stop): one that lost it says so and the job fails, instead of waiting for ever."""
        job = self._under_way(job_id)
        if job is None:
            return []
        query = self.ctx.message(job_id, 0, job.aggregator, m.JobQuery())
        job.queries.add(query.message_id)
        return [query]

    def _under_way(self, job_id: str) -> BuyerJob | None:
        """The job if the buyer has not yet got its result nor seen it end, else None."""
        job = self.jobs.get(job_id)
        return job if job is not None and job.phase in (BuyerPhase.REQUESTED, BuyerPhase.TRAINING) else None

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        """Apply one message to its job."""
        job = self.jobs.get(env.job_id)
        refuse_unless(job is not None, f"message for unknown job {env.job_id}")
        new, out = self.machine.step(job, env, self.ctx)
        self.jobs[env.job_id] = new
        return out

    def final_model(self, job_id: str) -> np.ndarray | None:
        """The decrypted model of a finished job."""
        model = self.jobs[job_id].model
        return None if model is None else np.array(model)
