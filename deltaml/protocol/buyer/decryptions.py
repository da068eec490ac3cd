"""Everything the buyer decrypts, each only when the job calls for it: a refresh (masked values), a
validator's masked products (with proofs), a metric (the sum of the validators' signed parts,
published verifiably) and the final model. The first value outside its mask ends the job."""

from __future__ import annotations

from .. import messages as m
from ..auth import AuthError, signer
from ..budget import fits_mask
from ..chain import expected_settlement, model_index, mse_micro, same_address
from ..drbg import Drbg
from ..errors import DecryptionRefused, OutsideMask
from ..fixedpoint import FixedPoint
from ..machine import FULL_MODEL, Context, eval_models, is_eval_round, loo_trainers, model_ids, without
from ..metric import masked_products, proof_context
from ..paillier import PrivateKey, PublicKey
from ..refresh import refresh_masked
from ..settlement import leave_one_out
from .job import BuyerJob, BuyerPhase, refuse_unless


def _signer(env: m.Envelope) -> str:
    try:
        return signer(env)
    except AuthError as exc:
        raise DecryptionRefused(str(exc)) from None


def _check_models(job: BuyerJob, models: dict, allowed: list[str], pub: PublicKey) -> None:
    refuse_unless(set(models) <= set(allowed) and models, "request for models that are not due")
    refuse_unless(all(len(v) == job.dim for v in models.values()), "vectors of the wrong length")
    pub.require_models(models, "model")


def on_refresh(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
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


def on_products(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
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


def on_metric(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
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


def on_result(job: BuyerJob, env: m.Envelope, ctx: Context, key: PrivateKey) -> list[m.Envelope]:
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
