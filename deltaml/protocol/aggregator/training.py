"""Recruiting and training: what comes next (:func:`advance`), owners joining and accepting
their roles, one gradient step per model from the trainers' replies (without a trainer dropped
from the round), the buyer's refresh when the scale has no room for the next step.
"""

from __future__ import annotations

from .. import messages as m
from ..auth import signer
from ..budget import can_evaluate, can_train, plan
from ..chain import job_key
from ..linear import encrypted_update, step_size_q
from ..machine import FULL_MODEL, Context, eval_models, is_eval_round, model_ids, natural_key, require, without
from ..metric import sse_scale_bits
from ..randomness import expect_obfuscators
from ..refresh import mask_for_refresh, unmask_refreshed
from .ending import send_result, settle
from .job import AggJob, AggPhase, Evaluation, fits


def advance(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Decide and start the next phase."""
    spec = job.spec
    if is_eval_round(job.round, spec.rounds, spec.eval_every) and job.evaluated_round != job.round:
        if not fits(job, can_evaluate):
            return start_refresh(job, ctx, job_id)
        job.evaluated_round = job.round
        targets = eval_models(spec, job.round, job.trainers)
        job.evals[job.round] = Evaluation(targets=targets,
                                          sse_scale_bits=sse_scale_bits(job.scale_bits, spec.frac_bits))
        req = m.EvalRequest(scale_bits=job.scale_bits, models={k: job.models[k] for k in targets})
        out = [ctx.message(job_id, job.round, v, req) for v in job.validators]
        # the evaluation scores this round's ciphertexts: training need not wait for it, except at the end
        return out + advance(job, ctx, job_id)
    if job.round == spec.rounds:
        if job.evals:
            job.phase = AggPhase.EVALUATING if spec.rounds in job.evals else AggPhase.VERIFYING
            return []
        if job.spec.escrow:  # the result follows the chain's word that the escrow is settled
            job.phase = AggPhase.SETTLING
            return settle(job, ctx, job_id)
        return send_result(job, ctx, job_id)
    if not fits(job, can_train):
        return start_refresh(job, ctx, job_id)
    job.phase = AggPhase.TRAINING
    job.replies = {}
    return [
        ctx.message(job_id, job.round + 1, t, m.GradientRequest(
            scale_bits=job.scale_bits, models={k: job.models[k] for k in job.models_of(t)}))
        for t in job.trainers
    ]


def start_refresh(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    require(job.scale_bits > job.spec.frac_bits, "no room to train even right after a refresh")
    job.phase = AggPhase.REFRESHING
    pub, value_bits = job.public_key, job.codec.value_bits(job.scale_bits)
    drop = job.scale_bits - job.spec.frac_bits
    masked = {}
    for mid, w in job.models.items():
        masked[mid], job.masks[mid] = mask_for_refresh(pub, w, value_bits, drop, ctx.rng)
    req = m.RefreshRequest(value_bits=value_bits, drop_bits=drop, models=masked)
    expect_refreshes(job, ctx)
    return [ctx.message(job_id, job.round, job.buyer, req)]


def expect_refreshes(job: AggJob, ctx: Context) -> None:
    """Tell a helper how many refresh masks the rest of the job needs, from the base scale at this
    round (the job's start, or a refresh): none after the last refresh, so it does not make a
    refresh's worth that nobody takes."""
    s = job.spec
    refreshes, _ = plan(s.frac_bits, job.round, s.rounds, s.eval_every, s.frac_bits, s.magnitude_bits,
                        job.public_key.bits)
    per_refresh = len(job.models) * len(job.models[FULL_MODEL])
    expect_obfuscators(job.public_key, ctx.rng, per_refresh, remaining=per_refresh * len(refreshes))


def expect_from(job: AggJob, env: m.Envelope, parties: list[str], what: str) -> None:
    require(env.sender in parties, f"{what} from {env.sender}, who is not expected to send it")
    require(env.sender not in job.replies, f"duplicate {what} from {env.sender}")


def on_join(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
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
    expect_refreshes(job, ctx)
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


def on_late_join(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    """An owner that offered its data too late is told so, rather than left waiting for a role: the
    job is full, or it already failed (its buyer gave it up while the offer was on its way, say)."""
    reason = f"the job failed: {job.reason}" if job.phase is AggPhase.FAILED else "job is full"
    return [ctx.reply(env, m.JobFinished(ok=False, reason=reason))]


def on_accepted(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    expect_from(job, env, job.trainers + job.validators, "role acceptance")
    expected = "trainer" if env.sender in job.trainers else "validator"
    require(env.payload.role == expected, f"{env.sender} accepted the wrong role")
    job.replies[env.sender] = env
    job.joined[env.sender] = env.payload.rows
    return maybe_start(job, ctx, env.job_id)


def maybe_start(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Training starts once every owner has accepted and, for a paid job, the escrow is in place."""
    ready = len(job.replies) == job.spec.owners and (job.training_started or not job.spec.escrow)
    return advance(job, ctx, job_id) if job.phase == AggPhase.STARTING and ready else []


def same_rows(job: AggJob, env: m.Envelope) -> None:
    """An owner's statistics are computed once: its row count (which sets the step size and
    divides the squared error) is the one it accepted its role with, every round."""
    accepted = job.joined.get(env.sender)
    require(env.payload.rows == accepted, f"{env.payload.rows} rows, but {env.sender} accepted its role with {accepted}")


def on_gradient(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    expect_from(job, env, job.trainers, "gradient")
    require(env.sender not in job.failing, f"gradient from {env.sender}, which reported a failure in this round")
    require(env.round == job.round + 1, f"gradient for round {env.round}, expected {job.round + 1}")
    require(set(env.payload.gradients) == set(job.models_of(env.sender)), "gradient for the wrong models")
    same_rows(job, env)
    d = len(job.models[FULL_MODEL])
    require(all(len(g) == d for g in env.payload.gradients.values()), "gradient of the wrong length")
    job.public_key.require_models(env.payload.gradients, "gradient of")
    job.replies[env.sender] = env
    return close_round(job, ctx, env.job_id)


def close_round(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """Once every trainer has answered the round or reported a failure in it (the quorum was
    checked then), the failed are dropped and every model takes its step."""
    if len(job.replies) + len(job.failing) < len(job.trainers):
        return []
    out = []
    for gone, reason in job.failing.items():
        out += drop(job, ctx, job_id, gone, f"it failed: {reason}")
    job.failing = {}
    return out + step_models(job, ctx, job_id)


def drop(job: AggJob, ctx: Context, job_id: str, gone: str, reason: str) -> list[m.Envelope]:
    """Go on without one trainer, every other one having answered the round: its leave-one-out
    model, which they have been computing all along, becomes the full model."""
    job.trainers.remove(gone)
    job.dropped.append(gone)
    job.models[FULL_MODEL] = job.models.pop(without(gone))
    for t, reply in job.replies.items():  # this round's gradients for that model serve the new full one
        grads = dict(reply.payload.gradients)
        grads[FULL_MODEL] = grads.pop(without(gone))
        job.replies[t] = reply.model_copy(update={"payload": reply.payload.model_copy(update={"gradients": grads})})
    out = [ctx.message(job_id, job.round, job.buyer, m.TrainerDropped(trainer=gone, reason=reason)),
           ctx.message(job_id, job.round, gone, m.JobFinished(ok=False, reason=f"dropped: {reason}"))]
    if job.on_chain:
        out += ctx.wallet.call(ctx, job_id, job.round, "drop", [job_key(job_id), job.addresses[gone], job.round + 1])
    return out


def step_models(job: AggJob, ctx: Context, job_id: str) -> list[m.Envelope]:
    """One gradient step per model from the trainers' replies, then the next phase."""
    pub, codec = job.public_key, job.codec
    steps = []
    for mid in job.models:
        members = job.members(mid)
        rows = sum(job.replies[t].payload.rows for t in members)
        grads = [job.replies[t].payload.gradients[mid] for t in members]
        # a model trained on no one (the leave-one-out model of a job's only trainer, or of the last
        # one left after the others were dropped) stays where it is; its scale grows with the others'
        eta = step_size_q(codec, job.spec.lr, rows) if members else 0
        steps.append((pub, codec, job.models[mid], grads, eta))
    for mid, new in zip(list(job.models), ctx.map(update_model, steps)):
        job.models[mid] = new
    job.round += 1
    job.scale_bits += 2 * codec.frac_bits
    return advance(job, ctx, job_id)


def update_model(step: tuple) -> list:
    """One model's gradient step (a pure function of its input: it may run in a worker process)."""
    return encrypted_update(*step)


def on_refreshed(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer and env.round == job.round, "refresh reply from the wrong party or round")
    require(set(env.payload.models) == set(job.models), "refresh reply for the wrong models")
    pub = job.public_key
    pub.require_models(env.payload.models, "refreshed")
    for mid, masks in job.masks.items():
        job.models[mid] = unmask_refreshed(pub, env.payload.models[mid], masks)
    job.masks = {}
    job.scale_bits = job.spec.frac_bits
    return advance(job, ctx, env.job_id)
