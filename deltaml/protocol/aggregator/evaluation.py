"""Evaluations, which run beside training: the validators' ``[SSE]`` of each model summed and
sent to the buyer with each validator's signed part, the buyer's verifiable decryption checked
against the sums, and — for a paid job — every verified metric put on chain.
"""

from __future__ import annotations

from .. import messages as m
from ..chain import METRICS_PER_TX, job_key, metric_args, model_index
from ..machine import FULL_MODEL, Context, require
from ..paillier import Decryption, require_valid_decryption
from .ending import fail
from .job import AggJob, AggPhase, Evaluation
from .training import advance, same_rows


def evaluation_of(job: AggJob, env: m.Envelope) -> Evaluation:
    ev = job.evals.get(env.round)
    require(ev is not None, f"no evaluation of round {env.round} is under way")
    return ev


def on_eval(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    ev = evaluation_of(job, env)
    require(env.sender in job.validators, f"evaluation from {env.sender}, who is not expected to send it")
    require(env.sender not in ev.replies, f"duplicate evaluation from {env.sender}")
    require(set(env.payload.sse) == set(ev.targets), "evaluation of the wrong models")
    same_rows(job, env)
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


def on_metric(job: AggJob, env: m.Envelope, ctx: Context) -> list[m.Envelope]:
    require(env.sender == job.buyer, "metric from a party that is not the buyer")
    ev = evaluation_of(job, env)
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
        out += record_metrics(job, env, ctx, totals, ev)
    if job.round == job.spec.rounds and job.phase in (AggPhase.EVALUATING, AggPhase.VERIFYING):
        out += advance(job, ctx, env.job_id)  # settle once the last evaluation is in
    return out


def record_metrics(job: AggJob, env: m.Envelope, ctx: Context, totals: dict[str, int],
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


def on_stalled_evaluation(job: AggJob, ctx: Context, job_id: str, round_: int) -> list[m.Envelope]:
    """An evaluation in flight heard nothing for ``round_timeout`` seconds: without it there is no metric."""
    ev = job.evals[round_]
    waiting = "the buyer's metric" if len(ev.replies) == len(job.validators) else "validators' evaluations"
    return fail(job, ctx, job_id, f"evaluation of round {round_}: waited {job.spec.round_timeout:g} s for {waiting}")
