"""The buyer's masked products carry zero-knowledge proofs; a cheating buyer is caught by the validator."""

import dataclasses

import pytest

from deltaml.marketplace import DemoConfig, make_spec, memory_job, prepare_parts
from deltaml.protocol.buyer import BuyerPhase
from deltaml.protocol.machine import without
from deltaml.protocol.metric import ProductClaim, masked_products, verify_all_products, verify_products
from deltaml.protocol.refresh import draw_mask

CONTEXT = b"job|10|all|owner-5"


@pytest.fixture(scope="module")
def case(keypair):
    import random

    pub, priv = keypair
    rng = random.Random(5)
    xs = [draw_mask(90, rng) for _ in range(4)]
    u = [pub.encrypt(x) for x in xs]
    v = [pub.encrypt(rng.randrange(-2**120, 2**120)) for _ in range(4)]
    products, proofs = masked_products(priv, u, v, 90, rng, CONTEXT)
    return pub, priv, u, v, products, proofs


def test_honest_products_verify_and_are_the_products(case):
    pub, priv, u, v, products, proofs = case
    assert verify_products(pub, u, v, products, proofs, CONTEXT)
    for c, uc, vc in zip(products, u, v):
        assert priv.decrypt(c) == priv.decrypt(uc) * priv.decrypt(vc)


def test_a_product_of_the_wrong_value_is_caught(case):
    pub, priv, u, v, products, proofs = case
    # the buyer multiplies by u + 1 instead of u: a biased metric
    wrong = list(products)
    wrong[2] = products[2] * v[2] % pub.nsquare
    assert not verify_products(pub, u, v, wrong, proofs, CONTEXT)
    # and cannot prove the wrong product: a fresh proof for the biased vector fails too
    u_shifted = list(u)
    u_shifted[2] = u[2] * pub.encrypt(1) % pub.nsquare
    forged, forged_proofs = masked_products(priv, u_shifted, v, 91, None or __import__("random").Random(1), CONTEXT)
    assert not verify_products(pub, u, v, forged, forged_proofs, CONTEXT)


@pytest.mark.parametrize("field", ["a", "b", "z", "w1", "w2"])
def test_any_changed_proof_field_is_caught(case, field):
    pub, priv, u, v, products, proofs = case
    bad = list(proofs)
    bad[1] = dataclasses.replace(bad[1], **{field: getattr(bad[1], field) + 1})
    assert not verify_products(pub, u, v, products, bad, CONTEXT)


def test_a_proof_is_bound_to_its_request(case):
    pub, priv, u, v, products, proofs = case
    assert not verify_products(pub, u, v, products, proofs, b"job|20|all|owner-5")
    assert not verify_products(pub, u, v, products[:3], proofs[:3], CONTEXT)


def test_several_models_are_checked_together_and_a_forgery_in_any_one_is_caught(keypair):
    import random

    pub, priv = keypair
    rng = random.Random(9)
    claims = []
    for k in range(3):
        u = [pub.encrypt(draw_mask(90, rng)) for _ in range(3)]
        v = [pub.encrypt(rng.randrange(-2**120, 2**120)) for _ in range(3)]
        context = f"job|20|model-{k}|owner-5".encode()
        products, proofs = masked_products(priv, u, v, 90, rng, context)
        claims.append(ProductClaim(u, v, products, proofs, context))
    assert verify_all_products(pub, claims, rng)
    for k in range(3):  # one coordinate of one model multiplied by u + 1
        c = claims[k]
        wrong = [*c.products[:1], c.products[1] * c.v[1] % pub.nsquare, *c.products[2:]]
        forged = [*claims[:k], dataclasses.replace(c, products=wrong), *claims[k + 1:]]
        assert not verify_all_products(pub, forged, rng)
    # each model's proofs are bound to its own context: two models' contexts swapped fail
    swapped = [dataclasses.replace(claims[0], context=claims[1].context),
               dataclasses.replace(claims[1], context=claims[0].context), claims[2]]
    assert not verify_all_products(pub, swapped, rng)
    assert not verify_all_products(pub, [], rng)


class LyingBuyer:
    """The buyer's core, answering product requests with products of u + 1 (at ``round_``, for
    ``model`` or every model)."""

    def __init__(self, core, round_: int = 10, model: str | None = None) -> None:
        self.core, self.round, self.model = core, round_, model

    def __getattr__(self, name):
        return getattr(self.core, name)

    def handle(self, env):
        out = self.core.handle(env)
        if env.type != "product_request" or env.round != self.round:
            return out
        pub = self.core.key.public
        lied = []
        for reply in out:
            models = {mid: [c * v % pub.nsquare for c, v in zip(cs, env.payload.models[mid].v)]
                      if self.model in (None, mid) else cs for mid, cs in reply.payload.models.items()}
            lied.append(reply.model_copy(update={"payload": reply.payload.model_copy(update={"models": models})}))
        return lied


async def test_a_lying_buyer_fails_the_job_at_the_validator(keypair):
    config = DemoConfig(rounds=20, eval_every=10)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    wrap = lambda name, core: LyingBuyer(core) if name == "buyer" else core  # noqa: E731
    job, *_ = await memory_job(config, parts, spec, keypair[1], wrap=wrap)
    assert job.phase is BuyerPhase.FAILED
    assert "owner-5: the buyer's masked products for all at round 10 fail their proof" in job.reason
    assert 10 not in job.published  # nothing was published from the biased products
    assert job.settled and sum(job.payments_wei.values()) + job.refund_wei == spec.deposit_wei


async def test_a_lie_about_one_leave_one_out_model_is_caught_and_named(keypair):
    config = DemoConfig(rounds=10, eval_every=10)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    wrap = lambda name, core: LyingBuyer(core, 10, without("owner-3")) if name == "buyer" else core  # noqa: E731
    job, *_ = await memory_job(config, parts, spec, keypair[1], wrap=wrap)
    assert job.phase is BuyerPhase.FAILED
    assert f"the buyer's masked products for {without('owner-3')} at round 10 fail their proof" in job.reason
    assert 10 not in job.published
