"""The baseline: the same job with encryption switched off, for the benchmark only.

What the encrypted protocol costs beyond its cryptography is measured by
running the same job — the same parties, rounds, leave-one-out models,
evaluations and message types, signed envelopes on the same bus — with
plain numpy in place of Paillier. Vectors travel as fixed-point integers at
``frac_bits`` (the wire type of a ciphertext is a big integer); a trainer
decodes ``w``, answers ``G_i w - b_i`` computed in float64, and the
aggregator takes the step and re-encodes. There are no masks, refreshes or
proofs, no chain and no payments: every party sees everything, which is
exactly what the real protocol exists to prevent. Nothing outside
``benchmarks/`` and its tests uses these cores.

The parties are fixed by name (``owner-1`` … the last ``validators`` owners
validate), so the job starts at once: the benchmark times rounds, not
recruiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import messages as m
from .errors import ProtocolError
from .fixedpoint import FixedPoint
from .linear import SufficientStats
from .machine import FULL_MODEL, Context, eval_models, is_eval_round, model_ids, owner_names, require, without


@dataclass
class PlainJob:
    spec: m.JobSpec
    buyer: str
    trainers: list[str]
    validators: list[str]
    models: dict[str, np.ndarray]
    round: int = 0
    replies: dict[str, m.GradientReply] = field(default_factory=dict)
    evals: dict[int, dict[str, m.EvalReply]] = field(default_factory=dict)
    mse_history: list[tuple[int, float]] = field(default_factory=list)
    final_mse: dict[str, float] = field(default_factory=dict)
    done: bool = False

    def members(self, model: str) -> list[str]:
        return [t for t in self.trainers if model == FULL_MODEL or without(t) != model]


class PlainAggregator:
    """Rounds, leave-one-out models and evaluations as in :mod:`.aggregator`, in the clear."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.jobs = ctx, {}
        self.codec = FixedPoint()

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        if env.type == "job_request":
            return self._open(env)
        job = self.jobs.get(env.job_id)
        require(job is not None, f"message for unknown job {env.job_id}")
        if env.type == "gradient_reply":
            return self._gradient(job, env)
        if env.type == "eval_reply":
            return self._evaluated(job, env)
        raise ProtocolError(f"plain aggregator: unexpected {env.type}")

    def _open(self, env: m.Envelope) -> list[m.Envelope]:
        spec: m.JobSpec = env.payload.spec
        names = owner_names(spec.owners)
        trainers, validators = names[: spec.trainers], names[spec.trainers:]
        models = {mid: np.zeros(len(spec.features) + 1) for mid in model_ids(spec, trainers)}
        job = PlainJob(spec, env.sender, trainers, validators, models)
        self.jobs[env.job_id] = job
        return self._advance(job, env.job_id)

    def _encode(self, w: np.ndarray) -> list[int]:
        return self.codec.encode_vector(w)

    def _advance(self, job: PlainJob, job_id: str) -> list[m.Envelope]:
        spec, out = job.spec, []
        if is_eval_round(job.round, spec.rounds, spec.eval_every) and job.round not in job.evals:
            targets = eval_models(spec, job.round, job.trainers)
            job.evals[job.round] = {}
            req = m.EvalRequest(scale_bits=self.codec.frac_bits,
                                models={k: self._encode(job.models[k]) for k in targets})
            out += [self.ctx.message(job_id, job.round, v, req) for v in job.validators]
        if job.round == spec.rounds:
            return out
        job.replies = {}
        for t in job.trainers:
            models = {k: self._encode(w) for k, w in job.models.items() if t in job.members(k)}
            out.append(self.ctx.message(job_id, job.round + 1, t,
                                        m.GradientRequest(scale_bits=self.codec.frac_bits, models=models)))
        return out

    def _gradient(self, job: PlainJob, env: m.Envelope) -> list[m.Envelope]:
        require(env.round == job.round + 1 and env.sender in job.trainers, "gradient out of turn")
        job.replies[env.sender] = env.payload
        if len(job.replies) < len(job.trainers):
            return []
        for mid, w in job.models.items():
            members = job.members(mid)
            rows = sum(job.replies[t].rows for t in members)
            total = sum(np.array([self.codec.decode(v) for v in job.replies[t].gradients[mid]]) for t in members)
            job.models[mid] = w - job.spec.lr / rows * total
        job.round += 1
        return self._advance(job, env.job_id)

    def _evaluated(self, job: PlainJob, env: m.Envelope) -> list[m.Envelope]:
        replies = job.evals[env.round]
        replies[env.sender] = env.payload
        if len(replies) < len(job.validators):
            return []
        rows = sum(r.rows for r in replies.values())
        mse = {mid: sum(self.codec.decode(r.sse[mid], r.sse_scale_bits) for r in replies.values()) / rows
               for mid in next(iter(replies.values())).sse}
        job.mse_history.append((env.round, mse[FULL_MODEL]))
        out = [self.ctx.message(env.job_id, env.round, "progress", m.Progress(phase="evaluated", mse=mse[FULL_MODEL]))]
        if env.round == job.spec.rounds:
            job.final_mse, job.done = mse, True
            out.append(self.ctx.message(env.job_id, env.round, job.buyer, m.JobResult(
                scale_bits=self.codec.frac_bits, model=self._encode(job.models[FULL_MODEL]),
                mse_history=sorted(job.mse_history), final_mse=mse)))
        return out


class PlainOwner:
    """A trainer answers ``G_i w - b_i`` for each of its models; a validator answers each model's SSE."""

    def __init__(self, ctx: Context, stats: SufficientStats) -> None:
        self.ctx, self.stats = ctx, stats
        self.codec = FixedPoint()

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        decode = self.codec.decode
        if env.type == "gradient_request":
            grads = {}
            for mid, w in env.payload.models.items():
                g = self.stats.gram @ np.array([decode(v) for v in w]) - self.stats.moment
                grads[mid] = self.codec.encode_vector(g)
            return [self.ctx.reply(env, m.GradientReply(rows=self.stats.rows, gradients=grads))]
        if env.type == "eval_request":
            sse = {mid: self.codec.encode(self.stats.sse(np.array([decode(v) for v in w])))
                   for mid, w in env.payload.models.items()}
            return [self.ctx.reply(env, m.EvalReply(rows=self.stats.rows, sse_scale_bits=self.codec.frac_bits,
                                                    sse=sse))]
        raise ProtocolError(f"plain owner: unexpected {env.type}")
