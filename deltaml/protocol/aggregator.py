"""The aggregator's state machine: recruiting, training rounds, evaluating, settling.

Theory of operation: a buyer's job request opens a job in RECRUITING and is
offered to every owner. When enough owners have joined, the aggregator
assigns roles (the last ``validators`` in name order validate) and waits for
each to accept (STARTING). Then it loops, deciding each time what comes
next (:func:`_advance`):

- an evaluation is due (round 0, every ``eval_every``, the last round): the
  validators get the model of that round and, with the buyer, score it while
  training goes on (an evaluation in flight is kept in ``AggJob.evals``); the
  last one is waited for, EVALUATING then VERIFYING while the buyer decrypts
  the totals verifiably, and settling waits until every evaluation is in;
- the scale has no room for the next step: REFRESHING with the buyer;
- otherwise TRAINING: every trainer returns ``[G_i w - b_i]`` for each model
  it belongs to (the full model and the leave-one-out models without each
  other trainer), and the aggregator takes one gradient step per model.

After the last evaluation a paid job puts the metrics on chain and settles
its escrow (SETTLING); only once the chain reports it settled does the
aggregator send the encrypted final model to the buyer (CLOSING), so a
metric the contract refuses fails the job instead of following a result the
buyer already holds. The job finishes when the buyer closes it, and only
then are the owners told it ended well. Any party's failure fails the job.
It holds no secret and sees only ciphertexts and the published metrics.

Silence: the agent ticks the core (:meth:`AggregatorCore.tick`) with the
seconds that passed; a job that has waited ``spec.round_timeout`` seconds
since its last accepted message acts on it. Trainers silent in a training
round are dropped if at least ``spec.quorum`` trainers answered: the model
trained without the dropped trainer, which every other trainer has been
computing all along, becomes the full model, so the result is exactly
centralised training on the rows that stayed. (Leave-one-out models of the
others keep the dropped trainer's early rounds.) Any other silence — too few
owners, a validator, the buyer during a refresh or a metric — fails the job;
a paid job is then abandoned on chain and settled at once, so the escrow is
refunded without waiting for its deadline. A question (``JobQuery``) is no
sign of life: it does not restart the silence. Messages of a job it does not
know (restarted without its state) are :mod:`.lost`'s to answer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum, auto

from . import messages as m
from .auth import signer
from .budget import can_evaluate, can_train, plan
from .fixedpoint import FixedPoint
from .linear import encrypted_update, step_size_q
from .metric import sse_scale_bits
from .machine import (FULL_MODEL, Context, Machine, eval_models, is_eval_round, model_ids, natural_key,
                      require, table, without)
from .chain import LEDGER, METRICS_PER_TX, ChainParty, job_key, key_hash, metric_args, model_index, same_address
from .lost import LostJobs
from .paillier import Decryption, PublicKey, require_valid_decryption
from .randomness import expect_obfuscators
from .refresh import RefreshMasks, mask_for_refresh, unmask_refreshed


class AggPhase(Enum):
    RECRUITING = auto()
    STARTING = auto()
    TRAINING = auto()
    REFRESHING = auto()
    EVALUATING = auto()
    VERIFYING = auto()
    SETTLING = auto()
    CLOSING = auto()
    FINISHED = auto()
    FAILED = auto()


@dataclass
class Evaluation:
    """An evaluation in flight: the models asked for and the validators' replies so far."""

    targets: list[str]
    replies: dict[str, m.Envelope] = field(default_factory=dict)
    waited: float = 0.0  # seconds since it last heard from a validator or the buyer
    #: the scale of ``[SSE]`` a validator's reply must have (None in a checkpoint from before it was kept)
    sse_scale_bits: int | None = None


@dataclass
class AggJob:
    """One job as the aggregator runs it."""

    phase: AggPhase
    spec: m.JobSpec
    buyer: str
    models: dict[str, list[int]]
    scale_bits: int
    round: int = 0
    joined: dict[str, int] = field(default_factory=dict)
    trainers: list[str] = field(default_factory=list)
    validators: list[str] = field(default_factory=list)
    replies: dict[str, m.Envelope] = field(default_factory=dict)
    masks: dict[str, RefreshMasks] = field(default_factory=dict)
    evaluated_round: int = -1  # the last round whose evaluation was started
    evals: dict[int, Evaluation] = field(default_factory=dict)  # evaluations in flight, by round
    mse_history: list[tuple[int, float]] = field(default_factory=list)
    final_mse: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    training_started: bool = False
    settled: bool = False
    roster: list[str] = field(default_factory=list)  # trainers as enrolled on chain (model indices)
    dropped: list[str] = field(default_factory=list)
    on_chain: bool = False  # the escrow exists: a failure abandons it
    settle_request: m.TxRequest | None = None  # the signed settle, kept until asked of the ledger again
    idle: float = 0.0  # seconds since the job last accepted a message

    @property
    def codec(self) -> FixedPoint:
        return FixedPoint(self.spec.frac_bits, self.spec.magnitude_bits)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey.from_hex(self.spec.public_key)

    def members(self, model: str) -> list[str]:
        """Trainers whose data a model is trained on."""
        if model == FULL_MODEL:
            return list(self.trainers)
        return [t for t in self.trainers if without(t) != model]

    def models_of(self, trainer: str) -> list[str]:
        """Models a trainer takes part in."""
        return [mid for mid in self.models if trainer in self.members(mid)]


def _fits(job: AggJob, check) -> bool:
    s = job.spec
    return check(job.scale_bits, s.frac_bits, s.magnitude_bits, job.public_key.bits)


def _advance(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Decide and start the next phase."""
    spec = job.spec
    if is_eval_round(job.round, spec.rounds, spec.eval_every) and job.evaluated_round != job.round:
        if not _fits(job, can_evaluate):
            return _start_refresh(job, ctx, job_id)
        job.evaluated_round = job.round
        targets = eval_models(spec, job.round, job.trainers)
        job.evals[job.round] = Evaluation(targets=targets,
                                          sse_scale_bits=sse_scale_bits(job.scale_bits, spec.frac_bits))
        req = m.EvalRequest(scale_bits=job.scale_bits, models={k: job.models[k] for k in targets})
        out = [ctx.message(job_id, job.round, v, req) for v in job.validators]
        # the evaluation scores this round's ciphertexts: training need not wait for it, except at the end
        return out + _advance(job, ctx, job_id)
    if job.round == spec.rounds:
        if job.evals:
            job.phase = AggPhase.EVALUATING if spec.rounds in job.evals else AggPhase.VERIFYING
            return []
        if job.spec.escrow:  # the result follows the chain's word that the escrow is settled
            job.phase = AggPhase.SETTLING
            return _settle(job, ctx, job_id)
        return _result(job, ctx, job_id)
    if not _fits(job, can_train):
        return _start_refresh(job, ctx, job_id)
    job.phase = AggPhase.TRAINING
    job.replies = {}
    return [
        ctx.message(job_id, job.round + 1, t, m.GradientRequest(
            scale_bits=job.scale_bits, models={k: job.models[k] for k in job.models_of(t)}))
        for t in job.trainers
    ]


def _settle(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Ask the chain to settle the escrow; its gas grows with everyone enrolled, dropped trainers too."""
    enrolled = len(job.trainers) + len(job.dropped) + len(job.validators)
    out = ctx.wallet.call(ctx, job_id, job.round, "settle", [job_key(job_id)], participants=enrolled)
    job.settle_request = next((env.payload for env in out if env.type == "tx_request"), None)
    return out


def _ask_the_ledger_again(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Neither the settle's receipt nor the Settled event came: the same signed transaction goes
    to the ledger once more, which answers from the chain (mined: its receipt and events again;
    lost: sent now). Its nonce is the one already used, so it cannot settle anything twice."""
    request, job.settle_request = job.settle_request, None
    return [ctx.wallet.send(ctx, job_id, job.round, request)]


def _result(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The encrypted final model to the buyer; the job waits for the buyer to close it."""
    job.phase = AggPhase.CLOSING
    result = m.JobResult(scale_bits=job.scale_bits, model=job.models[FULL_MODEL],
                         mse_history=sorted(job.mse_history), final_mse=job.final_mse)
    return [ctx.message(job_id, job.round, job.buyer, result)]


def _start_refresh(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    require(job.scale_bits > job.spec.frac_bits, "no room to train even right after a refresh")
    job.phase = AggPhase.REFRESHING
    pub, value_bits = job.public_key, job.codec.value_bits(job.scale_bits)
    drop = job.scale_bits - job.spec.frac_bits
    masked = {}
    for mid, w in job.models.items():
        masked[mid], job.masks[mid] = mask_for_refresh(pub, w, value_bits, drop, ctx.rng)
    req = m.RefreshRequest(value_bits=value_bits, drop_bits=drop, models=masked)
    _expect_refreshes(job, ctx)
    return [ctx.message(job_id, job.round, job.buyer, req)]


def _expect_refreshes(job: AggJob, ctx: Context) -> None:
    """Tell a helper how many refresh masks the rest of the job needs, from the base scale at this
    round (the job's start, or a refresh): none after the last refresh, so it does not make a
    refresh's worth that nobody takes."""
    s = job.spec
    refreshes, _ = plan(s.frac_bits, job.round, s.rounds, s.eval_every, s.frac_bits, s.magnitude_bits,
                        job.public_key.bits)
    per_refresh = len(job.models) * len(job.models[FULL_MODEL])
    expect_obfuscators(job.public_key, ctx.rng, per_refresh, remaining=per_refresh * len(refreshes))


def _from(job: AggJob, env: m.Envelope, parties: list[str], what: str) -> None:
    require(env.sender in parties, f"{what} from {env.sender}, who is not expected to send it")
    require(env.sender not in job.replies, f"duplicate {what} from {env.sender}")


def _on_join(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender not in job.joined, f"{env.sender} already joined")
    require(not job.spec.escrow or env.payload.address is not None, "a paid job needs the owner's address")
    # the join is the first word an owner signs for this job: its signer is the owner, for the
    # aggregator and (through the participants message) for the buyer, who checks its validators by it
    job.addresses[env.sender] = signer(env)
    job.joined[env.sender] = env.payload.rows
    if len(job.joined) < job.spec.owners:
        return []
    names = sorted(job.joined, key=natural_key)
    job.trainers = names[: job.spec.trainers]
    job.roster = list(job.trainers)
    job.validators = names[job.spec.trainers:]
    job.models = {mid: job.models[FULL_MODEL] for mid in model_ids(job.spec, job.trainers)}
    # a refresh encrypts a mask per coefficient of every model: a helper may prepare them
    _expect_refreshes(job, ctx)
    job.phase = AggPhase.STARTING
    out = [ctx.message(env.job_id, 0, t, m.RoleAssignment(role="trainer", models=job.models_of(t)))
           for t in job.trainers]
    out += [ctx.message(env.job_id, 0, v, m.RoleAssignment(role="validator", models=[])) for v in job.validators]
    addresses = {n: job.addresses[n] for n in job.trainers + job.validators}
    if job.spec.escrow:
        addresses[ctx.name] = ctx.wallet.address
    out.append(ctx.message(env.job_id, 0, job.buyer,
                           m.Participants(trainers=job.trainers, validators=job.validators, addresses=addresses)))
    return out


def _on_late_join(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """An owner that offered its data too late is told so, rather than left waiting for a role: the
    job is full, or it already failed (its buyer gave it up while the offer was on its way, say)."""
    reason = f"the job failed: {job.reason}" if job.phase is AggPhase.FAILED else "job is full"
    return [ctx.reply(env, m.JobFinished(ok=False, reason=reason))]


def _on_accepted(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    _from(job, env, job.trainers + job.validators, "role acceptance")
    expected = "trainer" if env.sender in job.trainers else "validator"
    require(env.payload.role == expected, f"{env.sender} accepted the wrong role")
    job.replies[env.sender] = env
    job.joined[env.sender] = env.payload.rows
    return _maybe_start(job, ctx, env.job_id)


def _maybe_start(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Training starts once every owner has accepted and, for a paid job, the escrow is in place."""
    ready = len(job.replies) == job.spec.owners and (job.training_started or not job.spec.escrow)
    return _advance(job, ctx, job_id) if job.phase == AggPhase.STARTING and ready else []


def _same_rows(job: AggJob, env: m.Envelope) -> None:
    """An owner's statistics are computed once: its row count (which sets the step size and
    divides the squared error) is the one it accepted its role with, every round."""
    accepted = job.joined.get(env.sender)
    require(env.payload.rows == accepted, f"{env.payload.rows} rows, but {env.sender} accepted its role with {accepted}")


def _on_gradient(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    _from(job, env, job.trainers, "gradient")
    require(env.round == job.round + 1, f"gradient for round {env.round}, expected {job.round + 1}")
    require(set(env.payload.gradients) == set(job.models_of(env.sender)), "gradient for the wrong models")
    _same_rows(job, env)
    d = len(job.models[FULL_MODEL])
    require(all(len(g) == d for g in env.payload.gradients.values()), "gradient of the wrong length")
    job.public_key.require_models(env.payload.gradients, "gradient of")
    job.replies[env.sender] = env
    if len(job.replies) < len(job.trainers):
        return []
    return _step_models(job, ctx, env.job_id)


def _step_models(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """One gradient step per model from the trainers' replies, then the next phase."""
    pub, codec = job.public_key, job.codec
    steps = []
    for mid in job.models:
        members = job.members(mid)
        rows = sum(job.replies[t].payload.rows for t in members)
        grads = [job.replies[t].payload.gradients[mid] for t in members]
        steps.append((pub, codec, job.models[mid], grads, step_size_q(codec, job.spec.lr, rows)))
    for mid, new in zip(list(job.models), ctx.map(_update, steps)):
        job.models[mid] = new
    job.round += 1
    job.scale_bits += 2 * codec.frac_bits
    return _advance(job, ctx, job_id)


def _update(step: tuple) -> list:
    """One model's gradient step (a pure function of its input: it may run in a worker process)."""
    return encrypted_update(*step)


def _on_refreshed(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer and env.round == job.round, "refresh reply from the wrong party or round")
    require(set(env.payload.models) == set(job.models), "refresh reply for the wrong models")
    pub = job.public_key
    pub.require_models(env.payload.models, "refreshed")
    for mid, masks in job.masks.items():
        job.models[mid] = unmask_refreshed(pub, env.payload.models[mid], masks)
    job.masks = {}
    job.scale_bits = job.spec.frac_bits
    return _advance(job, ctx, env.job_id)


def _evaluation(job: AggJob, env: m.Envelope) -> Evaluation:
    ev = job.evals.get(env.round)
    require(ev is not None, f"no evaluation of round {env.round} is under way")
    return ev


def _on_eval(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    ev = _evaluation(job, env)
    require(env.sender in job.validators, f"evaluation from {env.sender}, who is not expected to send it")
    require(env.sender not in ev.replies, f"duplicate evaluation from {env.sender}")
    require(set(env.payload.sse) == set(ev.targets), "evaluation of the wrong models")
    _same_rows(job, env)
    # the scale divides the decrypted SSE: a validator may not choose it
    require(ev.sse_scale_bits in (None, env.payload.sse_scale_bits),
            f"[SSE] at scale {env.payload.sse_scale_bits}, the evaluation's is {ev.sse_scale_bits}")
    for mid, c in env.payload.sse.items():
        job.public_key.require_ciphertexts([c], f"evaluation of {mid}")
    ev.replies[env.sender] = env
    ev.waited = 0.0
    if len(ev.replies) < len(job.validators):
        return []
    pub = job.public_key
    parts = [m.ValidatorPart.of(ev.replies[v]) for v in job.validators]
    totals = {mid: pub.sum(p.sse[mid] for p in parts) for mid in ev.targets}
    scale = ev.replies[job.validators[0]].payload.sse_scale_bits
    if job.phase == AggPhase.EVALUATING and env.round == job.spec.rounds:
        job.phase = AggPhase.VERIFYING
    req = m.MetricRequest(sse_scale_bits=scale, totals=totals, parts=parts)
    return [ctx.message(env.job_id, env.round, job.buyer, req)]


def _on_metric(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer, "metric from a party that is not the buyer")
    ev = _evaluation(job, env)
    require(len(ev.replies) == len(job.validators), f"no metric of round {env.round} was asked for")
    require(set(env.payload.metrics) == set(ev.targets), "metrics for the wrong models")
    pub = job.public_key
    totals = {mid: pub.sum(r.payload.sse[mid] for r in ev.replies.values()) for mid in ev.targets}
    for mid, metric in env.payload.metrics.items():
        require_valid_decryption(pub, totals[mid], Decryption(metric.sse, metric.randomness))
    del job.evals[env.round]
    job.mse_history.append((env.round, env.payload.metrics[FULL_MODEL].mse))
    if env.round == job.spec.rounds:
        job.final_mse = {mid: metric.mse for mid, metric in env.payload.metrics.items()}
    progress = m.Progress(phase="evaluated", mse=env.payload.metrics[FULL_MODEL].mse)
    out = [ctx.message(env.job_id, env.round, "progress", progress)]
    if job.spec.escrow:
        out += _record_metrics(job, env, ctx, totals, ev)
    if job.round == job.spec.rounds and job.phase in (AggPhase.EVALUATING, AggPhase.VERIFYING):
        out += _advance(job, ctx, env.job_id)  # settle once the last evaluation is in
    return out


def _record_metrics(job: AggJob, env: m.Envelope, ctx: Context, totals: dict[str, int],
                    ev: Evaluation) -> list[m.Envelope]:
    """Put every verified metric on chain (the ledger checks each proof again): one transaction
    for a single metric, one per ``METRICS_PER_TX`` for the last evaluation's."""
    scale = ev.replies[job.validators[0]].payload.sse_scale_bits
    calls = []
    for mid, metric in sorted(env.payload.metrics.items(), key=lambda kv: model_index(kv[0], job.trainers)):
        args = metric_args(env.job_id, env.round, model_index(mid, job.roster), totals[mid], metric.sse, scale,
                           metric.rows, metric.randomness)
        calls.append((args, m.MetricProof(ciphertext=totals[mid], public_key=job.spec.public_key)))
    if len(calls) == 1:
        (args, proof), = calls
        return ctx.wallet.call(ctx, env.job_id, env.round, "recordMetric", args, proof=proof)
    out = []
    for start in range(0, len(calls), METRICS_PER_TX):
        batch = calls[start:start + METRICS_PER_TX]
        args = [job_key(env.job_id), [metric for (_, metric), _ in batch]]
        out += ctx.wallet.call(ctx, env.job_id, env.round, "recordMetrics", args, proof=[p for _, p in batch])
    return out


def _fail(job: AggJob, ctx: Context, job_id: str, reason: str) -> list[m.Envelope]:
    """End the job for everyone; give a funded escrow up and settle it, so the buyer is refunded now."""
    job.phase = AggPhase.FAILED
    job.reason = reason
    end = m.JobFinished(ok=False, reason=reason)
    owners = [*job.trainers, *job.validators] or sorted(job.joined, key=natural_key)
    out = [ctx.message(job_id, job.round, p, end) for p in [job.buyer, *owners]]
    if job.on_chain and not job.settled:
        out += _give_escrow_up(job, ctx, job_id)
    return out


def _give_escrow_up(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Abandon a failed job's escrow and settle it at once: the buyer is refunded (less the fixed
    rewards, if training had verified progress) without waiting for the deadline."""
    return ctx.wallet.call(ctx, job_id, job.round, "abandon", [job_key(job_id), job.round]) + _settle(job, ctx, job_id)


def _drop(job: AggJob, ctx: Context, job_id: str, silent: list[str], waited: float) -> list[m.Envelope]:
    """Go on without silent trainers: each one's leave-one-out model becomes the full model."""
    out = []
    for gone in silent:
        reason = f"no gradient for round {job.round + 1} within {waited:g} s"
        job.trainers.remove(gone)
        job.dropped.append(gone)
        job.models[FULL_MODEL] = job.models.pop(without(gone))
        for t, reply in job.replies.items():  # this round's gradients for that model serve the new full one
            grads = dict(reply.payload.gradients)
            grads[FULL_MODEL] = grads.pop(without(gone))
            job.replies[t] = reply.model_copy(update={"payload": reply.payload.model_copy(
                update={"gradients": grads})})
        out.append(ctx.message(job_id, job.round, job.buyer, m.TrainerDropped(trainer=gone, reason=reason)))
        out.append(ctx.message(job_id, job.round, gone, m.JobFinished(ok=False, reason=f"dropped: {reason}")))
        if job.on_chain:
            out += ctx.wallet.call(ctx, job_id, job.round, "drop",
                                   [job_key(job_id), job.addresses[gone], job.round + 1])
    return out + _step_models(job, ctx, job_id)


WAITING_FOR = {
    AggPhase.RECRUITING: "owners to join", AggPhase.STARTING: "participants to accept and confirm",
    AggPhase.TRAINING: "trainers' gradients", AggPhase.REFRESHING: "the buyer's refresh",
    AggPhase.EVALUATING: "validators' evaluations", AggPhase.VERIFYING: "the buyer's metric",
    AggPhase.SETTLING: "the chain to report the escrow settled", AggPhase.CLOSING: "the buyer to close the job",
}


def _on_silence(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The job waited ``round_timeout`` seconds: drop silent trainers if a quorum answered, else fail;
    a buyer that holds its result and does not close the job keeps nobody waiting: it finishes; the
    chain's word on the settlement is asked for once more before the job fails without it."""
    waited = job.spec.round_timeout
    if job.phase == AggPhase.CLOSING:  # the result went out after settlement: the owners' part is done
        return _finish(job, ctx, job_id)
    if job.phase == AggPhase.SETTLING and job.settle_request is not None:
        return _ask_the_ledger_again(job, ctx, job_id)
    if job.phase == AggPhase.TRAINING:
        silent = [t for t in job.trainers if t not in job.replies]
        if job.spec.quorum and len(job.trainers) - len(silent) >= job.spec.quorum:
            return _drop(job, ctx, job_id, silent, waited)
        return _fail(job, ctx, job_id,
                     f"round {job.round + 1}: no gradient from {', '.join(silent)} within {waited:g} s")
    return _fail(job, ctx, job_id, f"round {job.round}: waited {waited:g} s for {WAITING_FOR[job.phase]}")


def _on_stalled_evaluation(job: AggJob, ctx: Context, job_id: str, round_: int) -> list[m.Envelope]:
    """An evaluation in flight heard nothing for ``round_timeout`` seconds: without it there is no metric."""
    ev = job.evals[round_]
    waiting = "the buyer's metric" if len(ev.replies) == len(job.validators) else "validators' evaluations"
    return _fail(job, ctx, job_id, f"evaluation of round {round_}: waited {job.spec.round_timeout:g} s for {waiting}")


def _on_chain_event(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """The escrow drives the start: post the participants once funded, train once all confirmed."""
    require(env.sender == LEDGER, "chain events come from the ledger")
    ev, spec = env.payload, job.spec
    if ev.event == "JobCreated" and job.phase == AggPhase.FAILED and not job.on_chain:
        return _give_up_late_escrow(job, ctx, env)
    if ev.event == "JobCreated" and job.phase == AggPhase.STARTING and not job.on_chain:
        a = ev.args
        expected = (ctx.wallet.address, spec.deposit_wei, spec.owners, spec.rounds, spec.fixed_reward_wei,
                    spec.variable_pool_wei, "0x" + key_hash(job.public_key).hex())
        got = (a["aggregator"], a["deposit"], a["owners"], a["rounds"], a["fixedReward"], a["variablePool"],
               a["keyHash"])
        if not same_address(got[0], expected[0]) or got[1:] != expected[1:]:
            return _fail(job, ctx, env.job_id, "the escrow on chain does not match the job")
        job.on_chain = True
        trainers = [job.addresses[t] for t in job.trainers]
        validators = [job.addresses[v] for v in job.validators]
        return ctx.wallet.call(ctx, env.job_id, 0, "setParticipants", [job_key(env.job_id), trainers, validators])
    if ev.event == "TrainingStarted" and not job.training_started:
        job.training_started = True
        return _maybe_start(job, ctx, env.job_id)
    if ev.event == "Settled":
        return _settled(job, ctx, env.job_id)
    return []


def _give_up_late_escrow(job: AggJob, ctx: Context, env: m.Envelope) -> list[m.Envelope]:
    """The buyer's deposit landed after the job failed (it was in flight when the buyer gave up, or
    an owner failed the job): the escrow is given up and settled now, so the deposit comes back at
    once instead of at its deadline. Only an escrow naming this aggregator can be given up by it."""
    if not same_address(env.payload.args["aggregator"], ctx.wallet.address):
        return []
    job.on_chain = True
    return _give_escrow_up(job, ctx, env.job_id)


def _on_receipt(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """A transaction of the aggregator's that failed fails the job while it runs, settling
    included: a metric the contract refuses (a model that diverged) fails it before the buyer
    has a result, and the escrow is given up and refunded instead of waiting for its deadline.
    A settle that went through lets the result go, like the escrow's Settled event."""
    receipt: m.TxReceipt = env.payload
    if receipt.ok and receipt.function == "settle":
        return _settled(job, ctx, env.job_id)
    if receipt.ok or job.phase in (AggPhase.CLOSING, AggPhase.FINISHED, AggPhase.FAILED):
        return []
    return _fail(job, ctx, env.job_id, f"{receipt.function} failed on chain: {receipt.reason}")


def _settled(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The chain's word that the escrow is settled (its Settled event or the settle's receipt,
    whichever comes first): the metrics and the payments are on chain, so the result may go."""
    job.settled = True
    return _result(job, ctx, job_id) if job.phase is AggPhase.SETTLING else []


def _on_closed(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer, "only the buyer closes its job")
    return _finish(job, ctx, env.job_id)


def _finish(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """The job is done: its owners are told it ended well."""
    job.phase = AggPhase.FINISHED
    return [ctx.message(job_id, job.round, o, m.JobFinished(ok=True)) for o in job.trainers + job.validators]


def _on_query(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """The buyer or an owner of the job asks whether it goes on: while it does, nothing is said (a
    job this aggregator does not know is answered, :class:`~.lost.LostJobs`); an owner asking
    after one that is over, or that dropped it, is told so again (the buyer has its own word)."""
    require(env.sender == job.buyer or env.sender in job.joined, "only the buyer or an owner asks after a job")
    if env.sender == job.buyer:
        return []
    if env.sender in job.dropped:
        return [ctx.reply(env, m.JobFinished(ok=False, reason="dropped: it fell silent in a training round"))]
    if job.phase not in (AggPhase.FAILED, AggPhase.FINISHED):
        return []
    return [ctx.reply(env, m.JobFinished(ok=job.phase is AggPhase.FINISHED, reason=job.reason))]


def _on_failure(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender in [job.buyer, *job.trainers, *job.validators], "failure from a stranger")
    return _fail(job, ctx, env.job_id, f"{env.sender}: {env.payload.reason}")


A = AggPhase
RUNNING = (A.RECRUITING, A.STARTING, A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING, A.SETTLING, A.CLOSING)
NEXT = (A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING, A.SETTLING, A.CLOSING)
EVALUATION_GOES_ON = (A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING)
AGGREGATOR_TABLE = table(
    (A.RECRUITING, "join_request", _on_join, (A.RECRUITING, A.STARTING)),
    ((*RUNNING[1:], A.FAILED), "join_request", _on_late_join, (*RUNNING[1:], A.FAILED)),
    (A.STARTING, "role_accepted", _on_accepted, (A.STARTING, *NEXT)),
    (A.TRAINING, "gradient_reply", _on_gradient, (A.TRAINING, *NEXT)),
    (A.REFRESHING, "refresh_reply", _on_refreshed, NEXT),
    (EVALUATION_GOES_ON, "eval_reply", _on_eval, EVALUATION_GOES_ON),
    (EVALUATION_GOES_ON, "metric_reply", _on_metric, (*EVALUATION_GOES_ON, A.SETTLING, A.CLOSING)),
    (A.CLOSING, "job_closed", _on_closed, (A.FINISHED,)),
    (RUNNING, "failure", _on_failure, (A.FAILED,)),
    (tuple(A), "job_query", _on_query, tuple(A)),
    (tuple(A), "chain_event", _on_chain_event, tuple(A)),
    (tuple(A), "tx_receipt", _on_receipt, tuple(A)),
)
AGGREGATOR = Machine("aggregator", AGGREGATOR_TABLE)
QUESTIONS = {"job_query"}


class AggregatorCore(ChainParty):
    """The aggregator's pure core: all its jobs, one step per message."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.wallet = ctx.wallet
        self.jobs: dict[str, AggJob] = {}
        self.lost = LostJobs(ctx)  # jobs it does not know that parties still work on (a restart without state)

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        """Apply one message; a job request opens a new job and offers it to the owners."""
        out = self.chain_prelude(env, self.ctx)
        return out if out is not None else self.guarded(self._step, env)

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        job = self.jobs.get(env.job_id)
        if job is None:
            return self._open(env)
        new, out = AGGREGATOR.step(job, env, self.ctx)
        if env.type not in QUESTIONS:  # a party asking whether the job goes on is no sign that it does
            new.idle = 0.0
        self.jobs[env.job_id] = new
        return out

    def tick(self, seconds: float) -> list[m.Envelope]:
        """``seconds`` passed: every job that has waited its ``round_timeout`` acts on the silence."""
        out = []
        for job_id, job in list(self.jobs.items()):
            if job.phase not in WAITING_FOR:
                continue
            job.idle += seconds
            stalled = []
            for round_, ev in job.evals.items():
                ev.waited += seconds
                if ev.waited >= job.spec.round_timeout:
                    stalled.append(round_)
            if job.idle >= job.spec.round_timeout:
                out += self.guarded(self._silence, job_id)
            elif stalled:
                out += self.guarded(lambda j, r=stalled[0]: self._silence(j, r), job_id)
        return out

    def _silence(self, job_id: str, stalled_round: int | None = None) -> list[m.Envelope]:
        new = copy.deepcopy(self.jobs[job_id])
        out = (_on_silence(new, self.ctx, job_id) if stalled_round is None
               else _on_stalled_evaluation(new, self.ctx, job_id, stalled_round))
        new.idle = 0.0
        self.jobs[job_id] = new
        return out

    def _open(self, env: m.Envelope) -> list[m.Envelope]:
        answer = self.lost.handle(env)
        if answer is not None:
            return answer
        require(env.type == "job_request", f"message for unknown job {env.job_id}")
        req: m.JobRequest = env.payload
        require(req.spec.buyer == env.sender, "a job request must come from its buyer")
        require(len(req.initial_model) == len(req.spec.features) + 1, "initial model of the wrong length")
        PublicKey.from_hex(req.spec.public_key).require_ciphertexts(req.initial_model, "initial model")
        require(req.spec.leave_one_out or not req.spec.escrow, "a paid job needs leave-one-out contributions")
        require(not req.spec.escrow or self.wallet is not None, "this aggregator takes no paid jobs (no key)")
        self.jobs[env.job_id] = AggJob(phase=AggPhase.RECRUITING, spec=req.spec, buyer=env.sender,
                                       models={FULL_MODEL: list(req.initial_model)},
                                       scale_bits=req.spec.frac_bits)
        greeting = self.wallet.greet(self.ctx) if req.spec.escrow else []
        return [*greeting, self.ctx.message(env.job_id, 0, "owners", m.JobOffer(spec=req.spec))]
