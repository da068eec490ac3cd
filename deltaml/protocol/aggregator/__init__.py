"""The aggregator's state machine: recruiting, training rounds, evaluating, settling.

Theory of operation: a buyer's job request opens a job in RECRUITING and is
offered to every owner. When enough owners have joined, the aggregator
assigns roles (the last ``validators`` in name order validate) and waits for
each to accept (STARTING). Then it loops, deciding each time what comes
next (:func:`.training.advance`):

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
then are the owners told it ended well. Any party's failure fails the job,
but a trainer's in a training round, which the quorum rule below may absorb.
It holds no secret and sees only ciphertexts and the published metrics.

Silence: the agent ticks the core (:meth:`AggregatorCore.tick`) with the
seconds that passed; a job that has waited ``spec.round_timeout`` seconds
since its last accepted message acts on it. Trainers silent in a training
round are dropped if at least ``spec.quorum`` trainers answered (so is a
trainer that reports a failure in one, at once): the model
trained without the dropped trainer, which every other trainer has been
computing all along, becomes the full model, so the result is exactly
centralised training on the rows that stayed. (Leave-one-out models of the
others keep the dropped trainer's early rounds.) Any other silence — too few
owners, a validator, the buyer during a refresh or a metric — fails the job;
a paid job is then abandoned on chain and settled at once, so the escrow is
refunded without waiting for its deadline. A question (``JobQuery``) is no
sign of life: it does not restart the silence. Messages of a job it does not
know (restarted without its state) are :mod:`~deltaml.protocol.lost`'s to answer.

The package: :mod:`.job` (what is kept of a job), :mod:`.training`,
:mod:`.evaluation` and :mod:`.events` (the steps, by what they answer),
:mod:`.ending` (settling, failing, finishing); here the transition table and
the core that holds every job, ticks them and opens new ones.
"""

from __future__ import annotations

import copy

from .. import messages as m
from ..chain import ChainParty
from ..ended import EndedJobs
from ..errors import JobOver
from ..lost import LostJobs
from ..machine import FULL_MODEL, Context, Machine, require, table
from ..paillier import PublicKey
from .ending import fail
from .evaluation import on_eval, on_metric, on_stalled_evaluation
from .events import (not_handled, on_chain_event, on_closed, on_failure, on_fault, on_query, on_receipt,
                     on_silence)
from .job import WAITING_FOR, AggJob, AggPhase, Evaluation
from .training import on_accepted, on_gradient, on_join, on_late_join, on_refreshed

__all__ = ["AGGREGATOR", "AggJob", "AggPhase", "AggregatorCore", "Evaluation"]


A = AggPhase
RUNNING = (A.RECRUITING, A.STARTING, A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING, A.SETTLING, A.CLOSING)
NEXT = (A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING, A.SETTLING, A.CLOSING)
EVALUATION_GOES_ON = (A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING)
AGGREGATOR_TABLE = table(
    (A.RECRUITING, "join_request", on_join, (A.RECRUITING, A.STARTING)),
    ((*RUNNING[1:], A.FAILED), "join_request", on_late_join, (*RUNNING[1:], A.FAILED)),
    (A.STARTING, "role_accepted", on_accepted, (A.STARTING, *NEXT)),
    (A.TRAINING, "gradient_reply", on_gradient, (A.TRAINING, *NEXT)),
    (A.REFRESHING, "refresh_reply", on_refreshed, NEXT),
    (EVALUATION_GOES_ON, "eval_reply", on_eval, EVALUATION_GOES_ON),
    (EVALUATION_GOES_ON, "metric_reply", on_metric, (*EVALUATION_GOES_ON, A.SETTLING, A.CLOSING)),
    (A.CLOSING, "job_closed", on_closed, (A.FINISHED,)),
    (RUNNING, "failure", on_failure, (A.FAILED, *NEXT)),
    (tuple(A), "job_query", on_query, tuple(A)),
    (tuple(A), "chain_event", on_chain_event, tuple(A)),
    (tuple(A), "tx_receipt", on_receipt, tuple(A)),
)
AGGREGATOR = Machine("aggregator", AGGREGATOR_TABLE)
QUESTIONS = {"job_query"}


class AggregatorCore(ChainParty):
    """The aggregator's pure core: all its jobs, one step per message."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.wallet = ctx.wallet
        self.jobs: dict[str, AggJob] = {}
        self.ended = EndedJobs()  # the ids and outcomes of ended jobs it forgot
        self.lost = LostJobs(ctx)  # jobs it does not know that parties still work on (a restart without state)

    def own_state(self):
        return self.lost.memory()

    def signed_again(self, job_id: str, request: m.TxRequest) -> None:
        """The settle it would ask the ledger about again is the one signed last."""
        job = self.jobs.get(job_id)
        if job is not None and request.function == "settle" and job.settle_request is not None:
            job.settle_request = request

    def restore_own(self, own) -> None:
        self.lost.recall(own)

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        """Apply one message; a job request opens a new job and offers it to the owners."""
        job = self.jobs.get(env.job_id)
        if job is None and (ended := self.ended.outcome(env.job_id)) is not None:
            return self._forgotten(env, *ended)
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
            if job.idle >= job.spec.round_timeout or stalled:
                stalled_round = None if job.idle >= job.spec.round_timeout else stalled[0]
                out += self._change_or_fail(job_id, lambda j: self._silent(j, job_id, stalled_round),
                                            "acting on the silence failed")
        self.retire()
        return out

    def fault(self, env: m.Envelope) -> list[m.Envelope]:
        """A message of a running job that could not be handled, its retries spent (see
        :func:`.events.on_fault`); if even that fails, the job fails."""
        job = self.jobs.get(env.job_id)
        if job is None or job.phase not in WAITING_FOR:
            return []
        return self._change_or_fail(env.job_id, lambda j: on_fault(j, env, self.ctx), not_handled(env))

    def _change_or_fail(self, job_id: str, change, what: str) -> list[m.Envelope]:
        """``change`` applied to a copy of a job, kept only if it does not raise; if it does, the job
        fails saying ``what`` and why (one job's fault must not stall the others', nor come back at
        every tick for ever). A refusal leaves the wallet as it was (:meth:`guarded`)."""
        try:
            return self.guarded(lambda j: self._change(j, change), job_id)
        except Exception as exc:
            reason = f"{what}: {exc!r}"
        return self.guarded(lambda j: self._change(j, lambda job: fail(job, self.ctx, j, reason)), job_id)

    def _change(self, job_id: str, change) -> list[m.Envelope]:
        new = copy.deepcopy(self.jobs[job_id])
        out = change(new)
        self.jobs[job_id] = new
        return out

    def _silent(self, job: AggJob, job_id: str, stalled_round: int | None = None) -> list[m.Envelope]:
        """The job has waited ``round_timeout`` seconds (or an evaluation has): it acts on the silence."""
        out = (on_silence(job, self.ctx, job_id) if stalled_round is None
               else on_stalled_evaluation(job, self.ctx, job_id, stalled_round))
        job.idle = 0.0
        return out

    def _forgotten(self, env: m.Envelope, ok: bool, reason: str) -> list[m.Envelope]:
        """A message for an ended job this aggregator forgot (:mod:`..ended`): a party asking after
        it is told how it ended (it missed the end); anything else is late."""
        if env.type == "job_query":
            return [self.ctx.reply(env, m.JobFinished(ok=ok, reason=reason))]
        raise JobOver(f"aggregator: {env.type!r} for job {env.job_id}, which ended long ago")

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
