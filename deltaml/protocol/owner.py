"""The data owner's state machine: WAITING → READY → INITIATED → IN_PROGRESS → FINISHED.

Theory of operation: an owner hears job offers while WAITING. If its data
has the job's features and target within the stated ranges it asks to join
(READY); otherwise it stays WAITING and the offer is forgotten. When the
aggregator assigns it a role it reduces its rows to sufficient statistics
once (INITIATED). A trainer then answers each gradient request with
``[G_i w - b_i]`` for every model it belongs to; a validator answers each
evaluation with the masked metric protocol, one product request to the
buyer and one ``[SSE_v]`` per model to the aggregator (IN_PROGRESS). The
job's end, good or bad, makes it FINISHED. It only ever sees ciphertexts.
An owner that has heard nothing of a job it takes part in for the job's
``round_timeout`` asks the aggregator whether it goes on (:meth:`OwnerCore.tick`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import numpy as np

from . import messages as m
from .chain import ABANDONED, LEDGER, ChainParty, job_key, same_address
from .ended import EndedJobs
from .errors import JobOver
from .fixedpoint import FixedPoint
from .linear import EncodedStats, SufficientStats, beyond_bound, columns_stats, encode_stats, encrypted_gradient
from .machine import Context, Machine, require, table
from .metric import (MetricSecrets, MulProof, ProductClaim, encrypted_sse, mask_product_inputs, proof_context,
                     sse_scale_bits, verify_all_products)
from .paillier import PublicKey
from .randomness import expect_obfuscators


class OwnerPhase(Enum):
    WAITING = auto()
    READY = auto()
    INITIATED = auto()
    IN_PROGRESS = auto()
    FINISHED = auto()


@dataclass
class OwnerJob:
    """One job as an owner sees it."""

    phase: OwnerPhase
    spec: m.JobSpec
    aggregator: str
    role: str = ""
    models: list[str] = field(default_factory=list)
    stats: EncodedStats | None = None
    pending: dict[int, dict[str, MetricSecrets]] = field(default_factory=dict)
    asked: dict[int, str] = field(default_factory=dict)  # round -> id of this validator's product request
    confirmed: bool = False
    paid_wei: int = 0
    credited: bool = False  # the escrow's Credited event for me was taken (a copy may come again)
    declined: str = ""  # why this owner's data does not fit the offer
    reason: str = ""  # why the job ended badly, as the aggregator said
    idle: float = 0.0  # seconds since the job's last message (or this owner's last question about it)
    last_round: int = 0  # a trainer's latest round answered

    @property
    def public_key(self) -> PublicKey:
        return PublicKey.from_hex(self.spec.public_key)

    def outcome(self) -> tuple[bool, str] | None:
        """``(ok, reason)`` once the job has ended for this owner (an offer it declined included)."""
        if self.phase is OwnerPhase.FINISHED:
            return not self.reason, self.reason
        if self.phase is OwnerPhase.WAITING and self.declined:
            return False, f"declined: {self.declined}"
        return None

    def shed(self) -> None:
        """Drop what only a running job needs: the statistics of this owner's rows, its masks."""
        self.stats, self.pending, self.asked = None, {}, {}


#: The reductions an owner's data keeps (each a d x d matrix, a vector and a reason).
KEPT_REDUCTIONS = 8


@dataclass(frozen=True)
class OwnerData:
    """An owner's rows with their column names (last is not special here)."""

    columns: tuple[str, ...]
    X: np.ndarray  # all columns, rows × columns
    auto_accept: bool = True
    # the latest reductions, by what of a job they depend on: a job's offer and its role ask for the
    # same one, which at a million rows is a pass over the table (the rows never change)
    reduced: dict = field(default_factory=dict, compare=False, repr=False)

    def reduce(self, spec: m.JobSpec) -> tuple[SufficientStats | None, str]:
        """These rows reduced to the job's sufficient statistics, or None and why they cannot serve it."""
        key = (tuple(spec.features), spec.target, None if spec.ranges is None else tuple(map(tuple, spec.ranges)),
               spec.magnitude_bits)
        if key not in self.reduced:
            if len(self.reduced) >= KEPT_REDUCTIONS:
                del self.reduced[next(iter(self.reduced))]
            self.reduced[key] = self._reduce(spec)
        return self.reduced[key]

    def _reduce(self, spec: m.JobSpec) -> tuple[SufficientStats | None, str]:
        reason = self._unfit(spec)
        if reason:
            return None, reason
        index = {c: i for i, c in enumerate(self.columns)}
        stats = columns_stats(self.X, [index[f] for f in spec.features], index[spec.target])
        reason = beyond_bound(stats, spec.magnitude_bits)
        return (None, reason) if reason else (stats, "")

    def mismatch(self, spec: m.JobSpec) -> str:
        """Why these rows cannot serve the job (names, ranges, magnitude), or "" if they can."""
        return self.reduce(spec)[1]

    def _unfit(self, spec: m.JobSpec) -> str:
        index = {c: i for i, c in enumerate(self.columns)}
        missing = [c for c in [*spec.features, spec.target] if c not in index]
        if missing:
            return f"the data lacks columns {missing}"
        if spec.ranges is not None:
            if len(spec.ranges) != len(spec.features):
                return "the job's ranges do not match its features"
            for f, (lo, hi) in zip(spec.features, spec.ranges):
                column = self.X[:, index[f]]
                if np.any(column < lo) or np.any(column > hi):
                    return f"column {f} has values outside the job's range [{lo}, {hi}]"
        return ""


def _on_offer(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    job.declined = data.mismatch(job.spec) or ("" if data.auto_accept else "not auto-accepting offers")
    if job.declined:
        return []
    rows = len(data.X)  # the data fits: every row serves the job
    job.phase = OwnerPhase.READY
    if not job.spec.escrow:
        return [ctx.reply(env, m.JoinRequest(rows=rows))]
    require(ctx.wallet is not None, "a paid job needs this owner's Ethereum key")
    join = m.JoinRequest(rows=rows, address=ctx.wallet.address)
    return [*ctx.wallet.greet(ctx), ctx.reply(env, join)]


def _on_role(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    require(env.sender == job.aggregator, "role assignment from a party that is not the job's aggregator")
    stats, why = data.reduce(job.spec)
    require(stats is not None, f"data no longer fits the job: {why}")
    job.stats = encode_stats(stats, FixedPoint(job.spec.frac_bits, job.spec.magnitude_bits))
    job.role, job.models = env.payload.role, list(env.payload.models)
    job.phase = OwnerPhase.INITIATED
    if job.role == "trainer":
        _announce_obfuscators(job, ctx)
    else:
        expect_obfuscators(job.public_key, ctx.rng, _obfuscators_per_round(job))
    return [ctx.reply(env, m.RoleAccepted(role=job.role, rows=job.stats.stats.rows))]


def _obfuscators_per_round(job: OwnerJob) -> int:
    """A trainer re-randomises ``d`` values per model each round."""
    return max(1, len(job.models)) * job.stats.stats.dim


def _announce_obfuscators(job: OwnerJob, ctx: Context, bounded: bool = False) -> None:
    """A trainer's obfuscators can be made ahead, from a table suited to the rounds it has left
    (all of them at its role; after a restart, those after its latest answer, and no more
    than those made ahead: ``bounded``, as after an answer)."""
    per_round = _obfuscators_per_round(job)
    uses = (job.spec.rounds - job.last_round) * per_round
    expect_obfuscators(job.public_key, ctx.rng, per_round, remaining=uses if bounded else None, uses=uses)


def _check_vectors(job: OwnerJob, models: dict[str, list[int]]) -> None:
    d = job.stats.stats.dim
    require(all(len(v) == d for v in models.values()), f"model vectors must have {d} entries")
    job.public_key.require_models(models, "model")


def _on_gradient(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    require(env.sender == job.aggregator and job.role == "trainer", "gradient request to a non-trainer")
    req: m.GradientRequest = env.payload
    require(set(req.models) <= set(job.models), "gradient request for a model this trainer is not in")
    _check_vectors(job, req.models)
    pub = job.public_key
    grads = {mid: encrypted_gradient(pub, job.stats, w, req.scale_bits, ctx.rng) for mid, w in req.models.items()}
    job.phase, job.last_round = OwnerPhase.IN_PROGRESS, max(job.last_round, env.round)
    per_round = len(req.models) * job.stats.stats.dim
    expect_obfuscators(pub, ctx.rng, per_round, remaining=(job.spec.rounds - env.round) * per_round)
    return [ctx.reply(env, m.GradientReply(rows=job.stats.stats.rows, gradients=grads))]


def _on_eval(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    require(env.sender == job.aggregator and job.role == "validator", "eval request to a non-validator")
    req: m.EvalRequest = env.payload
    require(env.round not in job.pending, "evaluation already under way for this round")
    _check_vectors(job, req.models)
    pub = job.public_key
    pairs, secrets_ = {}, {}
    for mid, w in req.models.items():
        u, v, u_bits, _, sec = mask_product_inputs(pub, job.stats, w, req.scale_bits, ctx.rng)
        pairs[mid] = m.MaskedPair(u=u, v=v, u_bits=u_bits)
        secrets_[mid] = sec
    job.pending[env.round] = secrets_
    job.phase = OwnerPhase.IN_PROGRESS
    if env.round == job.spec.rounds:  # the last evaluation: only each pending model's SSE is left to encrypt
        left = sum(len(p) for p in job.pending.values())
        expect_obfuscators(pub, ctx.rng, left, remaining=left)
    request = ctx.message(env.job_id, env.round, job.spec.buyer, m.ProductRequest(models=pairs), env.message_id)
    job.asked[env.round] = request.message_id
    return [request]


def _on_products(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    require(env.sender == job.spec.buyer, "product reply from a party that is not the buyer")
    require(env.round in job.pending, "product reply for no pending evaluation")
    # The buyer's first message to a validator is this reply, so its name is not yet bound to an
    # address: a stranger's reply, judged on its proofs, would fail the job and take the buyer's name.
    # Only the buyer saw the request's id; anything else is refused and changes nothing.
    require(env.correlation_id is not None and env.correlation_id == job.asked.get(env.round),
            "product reply that answers no product request of this validator")
    secrets_ = job.pending.pop(env.round)
    job.asked.pop(env.round, None)
    reply: m.ProductReply = env.payload
    require(set(reply.models) == set(secrets_), "product reply for other models than requested")
    pub = job.public_key
    claims = {mid: ProductClaim(sec.u, sec.v, reply.models[mid],
                                [MulProof(a=p.a, b=p.b, z=p.z, w1=p.w1, w2=p.w2) for p in reply.proofs.get(mid, [])],
                                proof_context(env.job_id, env.round, mid, ctx.name))
              for mid, sec in secrets_.items()}
    if not verify_all_products(pub, list(claims.values()), ctx.rng):
        # name the first model whose products fail on their own
        bad = next((mid for mid, c in claims.items() if not verify_all_products(pub, [c], ctx.rng)),
                   next(iter(claims)))
        job.phase = OwnerPhase.FINISHED
        job.reason = f"the buyer's masked products for {bad} at round {env.round} fail their proof"
        return [ctx.message(env.job_id, env.round, job.aggregator, m.Failure(reason=job.reason))]
    sse = {}
    for mid, sec in secrets_.items():
        require(len(reply.models[mid]) == len(sec.w), "product reply of the wrong length")
        sse[mid] = encrypted_sse(pub, job.stats, reply.models[mid], sec, ctx.rng)
    scale = sse_scale_bits(next(iter(secrets_.values())).scale_bits, job.stats.codec.frac_bits)
    payload = m.EvalReply(rows=job.stats.stats.rows, sse_scale_bits=scale, sse=sse)
    return [ctx.message(env.job_id, env.round, job.aggregator, payload)]


def _on_finished(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    require(env.sender == job.aggregator, "job end from a party that is not the job's aggregator")
    job.phase = OwnerPhase.FINISHED
    job.reason = "" if env.payload.ok else env.payload.reason
    return []


def _on_chain_event(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    """A job given up on chain is over; confirm my own participation once named on chain; withdraw
    what I am credited (a job given up after verified work pays the fixed reward)."""
    require(env.sender == LEDGER, "chain events come from the ledger")
    ev, me = env.payload, ctx.wallet.address if ctx.wallet else None
    if ev.event == "Abandoned" and job.phase in ACTIVE:  # only the aggregator gives it up, when it cannot go on
        job.phase, job.reason = OwnerPhase.FINISHED, ABANDONED
    if ev.event == "ParticipantsSet" and not job.confirmed:
        if any(same_address(a, me) for a in [*ev.args["trainers"], *ev.args["validators"]]):
            job.confirmed = True
            return ctx.wallet.call(ctx, env.job_id, 0, "confirm", [job_key(env.job_id)])
    if ev.event == "Credited" and same_address(ev.args["payee"], me) and not job.credited:
        # the contract credits each participant once per job; the ledger may publish an event again
        # (a request redelivered, asked again), and a second withdraw would only be refused
        job.credited, job.paid_wei = True, ev.args["amount"]
        return ctx.wallet.call(ctx, env.job_id, env.round, "withdraw", [])
    return []


def _on_receipt(job: OwnerJob, env: m.Envelope, ctx: Context, data: OwnerData) -> list[m.Envelope]:
    """A confirmation that failed on chain is a failure to take part."""
    receipt: m.TxReceipt = env.payload
    if receipt.ok or receipt.function != "confirm" or job.phase == OwnerPhase.FINISHED:
        return []
    return [ctx.message(env.job_id, 0, job.aggregator, m.Failure(reason=f"confirm failed: {receipt.reason}"))]


P = OwnerPhase
ACTIVE = (P.READY, P.INITIATED, P.IN_PROGRESS)
OWNER_TABLE = table(
    (P.WAITING, "job_offer", _on_offer, (P.WAITING, P.READY)),
    (P.READY, "role_assignment", _on_role, (P.INITIATED,)),
    ((P.INITIATED, P.IN_PROGRESS), "gradient_request", _on_gradient, (P.IN_PROGRESS,)),
    ((P.INITIATED, P.IN_PROGRESS), "eval_request", _on_eval, (P.IN_PROGRESS,)),
    (P.IN_PROGRESS, "product_reply", _on_products, (P.IN_PROGRESS, P.FINISHED)),
    (ACTIVE, "job_finished", _on_finished, (P.FINISHED,)),
    (tuple(P), "chain_event", _on_chain_event, tuple(P)),
    (tuple(P), "tx_receipt", _on_receipt, tuple(P)),
)


class OwnerCore(ChainParty):
    """An owner's pure core: its data, its jobs, one step per message."""

    def __init__(self, ctx: Context, data: OwnerData) -> None:
        self.ctx = ctx
        self.wallet = ctx.wallet
        self.data = data
        self.jobs: dict[str, OwnerJob] = {}
        self.ended = EndedJobs()
        self.machine = Machine(
            "owner", {k: type(t)(self._bind(t.handler), t.to) for k, t in OWNER_TABLE.items()}
        )

    @staticmethod
    def status(job: OwnerJob) -> dict:
        """An offer this owner does not take shows why; a paid one, what it was credited."""
        if job.declined:
            return {"phase": "declined", "reason": job.declined}
        return {**ChainParty.status(job), **({"paid_wei": job.paid_wei} if job.credited else {})}

    def _bind(self, handler):
        return lambda job, env, ctx: handler(job, env, ctx, self.data)

    def restore(self, blob: bytes) -> None:
        """Go on from a snapshot. A trainer in a job announces again the obfuscators its rounds
        still to come will draw: this process has no table for the key yet, and its window
        should suit them (without the announcement it would be built with the default window)."""
        super().restore(blob)
        for job in self.jobs.values():
            if job.role == "trainer" and job.phase in (OwnerPhase.INITIATED, OwnerPhase.IN_PROGRESS):
                _announce_obfuscators(job, self.ctx, bounded=True)

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        """Apply one message to its job; a new offer opens a job in WAITING."""
        job = self.jobs.get(env.job_id)
        if job is None and self.ended.outcome(env.job_id) is not None:
            raise JobOver(f"owner: {env.type!r} for job {env.job_id}, which ended long ago")
        if job is None:
            require(env.type == "job_offer", f"message for unknown job {env.job_id}")
            job = OwnerJob(phase=OwnerPhase.WAITING, spec=env.payload.spec, aggregator=env.sender)
            job.public_key  # refuses a key that is too short before anything else
        new, out = self.machine.step(job, env, self.ctx)
        new.idle = 0.0
        self.jobs[env.job_id] = new
        return out

    def fault(self, env: m.Envelope) -> list[m.Envelope]:
        """A message of a job it takes part in that this owner could not handle, its retries spent:
        it tells the aggregator (a failing owner says so rather than going silent, STYLE §4) and
        its part ends. What went wrong stays in its own log: an exception may quote its data."""
        job = self.jobs.get(env.job_id)
        if job is None or job.phase not in ACTIVE or env.sender not in (job.aggregator, job.spec.buyer, LEDGER):
            return []  # a stranger's message cannot take this owner out of its job
        job.phase, job.reason = OwnerPhase.FINISHED, f"could not handle {env.type} of round {env.round}"
        return [self.ctx.message(env.job_id, env.round, job.aggregator, m.Failure(reason=job.reason))]

    def tick(self, seconds: float) -> list[m.Envelope]:
        """``seconds`` passed: an owner taking part in a job that heard nothing of it for the job's
        ``round_timeout`` asks its aggregator whether the job goes on, and again after each such
        silence. The aggregator answers only a job it lost (restarted without its state) or one
        over: a validator between evaluations, or an owner waiting for its role, would otherwise
        keep the job for ever; silence in a job going on is the aggregator's to act on."""
        out = []
        for job_id, job in self.jobs.items():
            if job.phase not in ACTIVE:
                continue
            job.idle += seconds
            if job.idle >= job.spec.round_timeout:
                job.idle = 0.0
                out.append(self.ctx.message(job_id, 0, job.aggregator, m.JobQuery()))
        self.retire()
        return out
