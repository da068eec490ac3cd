"""The aggregator's state machine: recruiting, training rounds, evaluating, settling.

Theory of operation: a buyer's job request opens a job in RECRUITING and is
offered to every owner. When enough owners have joined, the aggregator
assigns roles (the last ``validators`` in name order validate) and waits for
each to accept (STARTING). Then it loops, deciding each time what comes
next (:func:`_advance`):

- an evaluation is due (round 0, every ``eval_every``, the last round):
  EVALUATING, then VERIFYING while the buyer decrypts the total verifiably;
- the scale has no room for the next step: REFRESHING with the buyer;
- otherwise TRAINING: every trainer returns ``[G_i w - b_i]`` for each model
  it belongs to (the full model and the leave-one-out models without each
  other trainer), and the aggregator takes one gradient step per model.

After the last evaluation it sends the encrypted final model to the buyer
(SETTLING) and finishes when the buyer closes the job. Any party's failure
fails the job. It holds no secret and sees only ciphertexts and the
published metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from . import messages as m
from .budget import can_evaluate, can_train
from .fixedpoint import FixedPoint
from .linear import encrypted_update, step_size_q
from .machine import (FULL_MODEL, Context, Machine, eval_models, is_eval_round, natural_key,
                      require, table, without)
from .paillier import PublicKey, require_valid_decryption, Decryption
from .refresh import RefreshMasks, mask_for_refresh, unmask_refreshed


class AggPhase(Enum):
    RECRUITING = auto()
    STARTING = auto()
    TRAINING = auto()
    REFRESHING = auto()
    EVALUATING = auto()
    VERIFYING = auto()
    SETTLING = auto()
    FINISHED = auto()
    FAILED = auto()


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
    evaluated_round: int = -1
    mse_history: list[tuple[int, float]] = field(default_factory=list)
    final_mse: dict[str, float] = field(default_factory=dict)
    reason: str = ""

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
        job.phase = AggPhase.EVALUATING
        job.replies = {}
        targets = eval_models(job.round, spec.rounds, job.trainers)
        req = m.EvalRequest(scale_bits=job.scale_bits, models={k: job.models[k] for k in targets})
        return [ctx.message(job_id, job.round, v, req) for v in job.validators]
    if job.round == spec.rounds:
        job.phase = AggPhase.SETTLING
        result = m.JobResult(scale_bits=job.scale_bits, model=job.models[FULL_MODEL],
                             mse_history=job.mse_history, final_mse=job.final_mse)
        return [ctx.message(job_id, job.round, job.buyer, result)]
    if not _fits(job, can_train):
        return _start_refresh(job, ctx, job_id)
    job.phase = AggPhase.TRAINING
    job.replies = {}
    return [
        ctx.message(job_id, job.round + 1, t, m.GradientRequest(
            scale_bits=job.scale_bits, models={k: job.models[k] for k in job.models_of(t)}))
        for t in job.trainers
    ]


def _start_refresh(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    require(job.scale_bits > job.spec.frac_bits, "no room to train even right after a refresh")
    job.phase = AggPhase.REFRESHING
    pub, value_bits = job.public_key, job.codec.value_bits(job.scale_bits)
    drop = job.scale_bits - job.spec.frac_bits
    masked = {}
    for mid, w in job.models.items():
        masked[mid], job.masks[mid] = mask_for_refresh(pub, w, value_bits, drop, ctx.rng)
    req = m.RefreshRequest(value_bits=value_bits, drop_bits=drop, models=masked)
    return [ctx.message(job_id, job.round, job.buyer, req)]


def _from(job: AggJob, env: m.Envelope, parties: list[str], what: str) -> None:
    require(env.sender in parties, f"{what} from {env.sender}, who is not expected to send it")
    require(env.sender not in job.replies, f"duplicate {what} from {env.sender}")


def _on_join(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender not in job.joined, f"{env.sender} already joined")
    job.joined[env.sender] = env.payload.rows
    if len(job.joined) < job.spec.owners:
        return []
    names = sorted(job.joined, key=natural_key)
    job.trainers = names[: job.spec.trainers]
    job.validators = names[job.spec.trainers:]
    job.models = {FULL_MODEL: job.models[FULL_MODEL]}
    for t in job.trainers:
        job.models[without(t)] = job.models[FULL_MODEL]
    job.phase = AggPhase.STARTING
    out = [ctx.message(env.job_id, 0, t, m.RoleAssignment(role="trainer", models=job.models_of(t)))
           for t in job.trainers]
    out += [ctx.message(env.job_id, 0, v, m.RoleAssignment(role="validator", models=[])) for v in job.validators]
    out.append(ctx.message(env.job_id, 0, job.buyer,
                           m.Participants(trainers=job.trainers, validators=job.validators)))
    return out


def _on_late_join(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    return [ctx.reply(env, m.JobFinished(ok=False, reason="job is full"))]


def _on_accepted(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    _from(job, env, job.trainers + job.validators, "role acceptance")
    expected = "trainer" if env.sender in job.trainers else "validator"
    require(env.payload.role == expected, f"{env.sender} accepted the wrong role")
    job.replies[env.sender] = env
    job.joined[env.sender] = env.payload.rows
    if len(job.replies) < job.spec.owners:
        return []
    return _advance(job, ctx, env.job_id)


def _on_gradient(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    _from(job, env, job.trainers, "gradient")
    require(env.round == job.round + 1, f"gradient for round {env.round}, expected {job.round + 1}")
    require(set(env.payload.gradients) == set(job.models_of(env.sender)), "gradient for the wrong models")
    d = len(job.models[FULL_MODEL])
    require(all(len(g) == d for g in env.payload.gradients.values()), "gradient of the wrong length")
    job.replies[env.sender] = env
    if len(job.replies) < len(job.trainers):
        return []
    pub, codec = job.public_key, job.codec
    for mid in job.models:
        members = job.members(mid)
        rows = sum(job.replies[t].payload.rows for t in members)
        grads = [job.replies[t].payload.gradients[mid] for t in members]
        eta = step_size_q(codec, job.spec.lr, rows)
        job.models[mid] = encrypted_update(pub, codec, job.models[mid], grads, eta)
    job.round += 1
    job.scale_bits += 2 * codec.frac_bits
    return _advance(job, ctx, env.job_id)


def _on_refreshed(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer and env.round == job.round, "refresh reply from the wrong party or round")
    require(set(env.payload.models) == set(job.models), "refresh reply for the wrong models")
    pub = job.public_key
    for mid, masks in job.masks.items():
        job.models[mid] = unmask_refreshed(pub, env.payload.models[mid], masks)
    job.masks = {}
    job.scale_bits = job.spec.frac_bits
    return _advance(job, ctx, env.job_id)


def _on_eval(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    _from(job, env, job.validators, "evaluation")
    require(env.round == job.round, f"evaluation for round {env.round}, expected {job.round}")
    targets = eval_models(job.round, job.spec.rounds, job.trainers)
    require(set(env.payload.sse) == set(targets), "evaluation of the wrong models")
    job.replies[env.sender] = env
    if len(job.replies) < len(job.validators):
        return []
    pub = job.public_key
    parts = [m.ValidatorPart(validator=v, rows=job.replies[v].payload.rows, sse=job.replies[v].payload.sse)
             for v in job.validators]
    totals = {mid: pub.sum(p.sse[mid] for p in parts) for mid in targets}
    scale = job.replies[job.validators[0]].payload.sse_scale_bits
    job.phase = AggPhase.VERIFYING
    req = m.MetricRequest(sse_scale_bits=scale, totals=totals, parts=parts)
    return [ctx.message(env.job_id, job.round, job.buyer, req)]


def _on_metric(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer and env.round == job.round, "metric from the wrong party or round")
    targets = eval_models(job.round, job.spec.rounds, job.trainers)
    require(set(env.payload.metrics) == set(targets), "metrics for the wrong models")
    pub = job.public_key
    totals = {mid: pub.sum(r.payload.sse[mid] for r in job.replies.values()) for mid in targets}
    for mid, metric in env.payload.metrics.items():
        require_valid_decryption(pub, totals[mid], Decryption(metric.sse, metric.randomness))
    job.evaluated_round = job.round
    job.mse_history.append((job.round, env.payload.metrics[FULL_MODEL].mse))
    if job.round == job.spec.rounds:
        job.final_mse = {mid: metric.mse for mid, metric in env.payload.metrics.items()}
    progress = m.Progress(phase="evaluated", mse=env.payload.metrics[FULL_MODEL].mse)
    return [ctx.message(env.job_id, job.round, "progress", progress), *_advance(job, ctx, env.job_id)]


def _on_closed(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer, "only the buyer closes its job")
    job.phase = AggPhase.FINISHED
    return [ctx.message(env.job_id, job.round, o, m.JobFinished(ok=True)) for o in job.trainers + job.validators]


def _on_failure(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender in [job.buyer, *job.trainers, *job.validators], "failure from a stranger")
    job.phase = AggPhase.FAILED
    job.reason = f"{env.sender}: {env.payload.reason}"
    end = m.JobFinished(ok=False, reason=job.reason)
    return [ctx.message(env.job_id, job.round, p, end) for p in [job.buyer, *job.trainers, *job.validators]]


A = AggPhase
RUNNING = (A.RECRUITING, A.STARTING, A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING, A.SETTLING)
NEXT = (A.TRAINING, A.REFRESHING, A.EVALUATING, A.SETTLING)
AGGREGATOR_TABLE = table(
    (A.RECRUITING, "join_request", _on_join, (A.RECRUITING, A.STARTING)),
    ((A.STARTING, A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING), "join_request", _on_late_join,
     (A.STARTING, A.TRAINING, A.REFRESHING, A.EVALUATING, A.VERIFYING)),
    (A.STARTING, "role_accepted", _on_accepted, (A.STARTING, *NEXT)),
    (A.TRAINING, "gradient_reply", _on_gradient, (A.TRAINING, *NEXT)),
    (A.REFRESHING, "refresh_reply", _on_refreshed, NEXT),
    (A.EVALUATING, "eval_reply", _on_eval, (A.EVALUATING, A.VERIFYING)),
    (A.VERIFYING, "metric_reply", _on_metric, NEXT),
    (A.SETTLING, "job_closed", _on_closed, (A.FINISHED,)),
    (RUNNING, "failure", _on_failure, (A.FAILED,)),
)
AGGREGATOR = Machine("aggregator", AGGREGATOR_TABLE)


class AggregatorCore:
    """The aggregator's pure core: all its jobs, one step per message."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.jobs: dict[str, AggJob] = {}

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        """Apply one message; a job request opens a new job and offers it to the owners."""
        job = self.jobs.get(env.job_id)
        if job is None:
            return self._open(env)
        new, out = AGGREGATOR.step(job, env, self.ctx)
        self.jobs[env.job_id] = new
        return out

    def _open(self, env: m.Envelope) -> list[m.Envelope]:
        require(env.type == "job_request", f"message for unknown job {env.job_id}")
        req: m.JobRequest = env.payload
        PublicKey.from_hex(req.spec.public_key)
        require(req.spec.buyer == env.sender, "a job request must come from its buyer")
        require(len(req.initial_model) == len(req.spec.features) + 1, "initial model of the wrong length")
        require(req.spec.validators < req.spec.owners, "a job needs at least one trainer")
        self.jobs[env.job_id] = AggJob(phase=AggPhase.RECRUITING, spec=req.spec, buyer=env.sender,
                                       models={FULL_MODEL: list(req.initial_model)},
                                       scale_bits=req.spec.frac_bits)
        return [self.ctx.message(env.job_id, 0, "owners", m.JobOffer(spec=req.spec))]
