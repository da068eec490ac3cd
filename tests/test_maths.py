"""Encrypted gradient, update, refresh and metric equal their plain counterparts."""

import numpy as np
from hypothesis import given, settings, strategies as st

from deltaml.protocol.fixedpoint import SLACK_BITS
from deltaml.protocol.linear import (encode_stats, encrypted_gradient, encrypted_update, gradient_descent,
                                     step_size_q, sufficient_stats)
from deltaml.protocol.metric import (encrypted_sse, mask_product_inputs, masked_products, sse_scale_bits,
                                     verify_products)
from deltaml.protocol.refresh import mask_for_refresh, refresh_masked, unmask_refreshed


def encrypt_vector(pub, codec, w, scale=None):
    return [pub.encrypt(v) for v in codec.encode_vector(w, scale)]


def test_encrypted_gradient_equals_plain(keypair, codec, rows, rng):
    pub, priv = keypair
    stats = sufficient_stats(*rows)
    enc = encode_stats(stats, codec)
    w = np.array([1.25, -0.5, 3.0, 0.125])
    grad = encrypted_gradient(pub, enc, encrypt_vector(pub, codec, w), 32, rng)
    got = np.array([codec.decode(priv.decrypt(c), 64) for c in grad])
    assert np.allclose(got, stats.gram @ w - stats.moment, rtol=1e-8, atol=1e-6)


def test_encrypted_update_is_one_gradient_step(keypair, codec, rows, rng):
    pub, priv = keypair
    X, y = rows
    parts = [sufficient_stats(X[:25], y[:25]), sufficient_stats(X[25:], y[25:])]
    w0 = np.zeros(4)
    cw = encrypt_vector(pub, codec, w0)
    grads = [encrypted_gradient(pub, encode_stats(s, codec), cw, 32, rng) for s in parts]
    new = encrypted_update(pub, codec, cw, grads, step_size_q(codec, 0.5, 40))
    got = np.array([codec.decode(priv.decrypt(c), 96) for c in new])
    assert np.allclose(got, gradient_descent(parts, 0.5, 1), rtol=1e-7)


@settings(max_examples=15, deadline=None)
@given(values=st.lists(st.integers(min_value=-(2**150), max_value=2**150), min_size=1, max_size=4),
       drop=st.integers(min_value=1, max_value=120))
def test_refresh_is_exact_to_the_last_unit(keypair, values, drop):
    pub, priv = keypair
    value_bits = 151
    masked, masks = mask_for_refresh(pub, [pub.encrypt(v) for v in values], value_bits, drop)
    back = unmask_refreshed(pub, refresh_masked(priv, masked, value_bits, drop), masks)
    for v, c in zip(values, back):
        assert priv.decrypt(c) - (v >> drop) in (0, 1)


def test_refresh_rounding_is_unbiased(keypair, rng):
    pub, priv = keypair
    v, drop = 3 * 2**40 + 2**38, 40  # 3.25 units
    ups = 0
    for _ in range(60):
        masked, masks = mask_for_refresh(pub, [pub.encrypt(v)], 60, drop, rng)
        ups += priv.decrypt(unmask_refreshed(pub, refresh_masked(priv, masked, 60, drop, rng), masks)[0]) - 3
    assert 3 <= ups <= 30  # about a quarter round up


def test_the_buyer_sees_only_masked_values(keypair, rng):
    pub, priv = keypair
    values = [0, 1, -1, 2**100, -(2**100)]
    value_bits = 101
    seen = []
    for _ in range(3):
        masked, _ = mask_for_refresh(pub, [pub.encrypt(v) for v in values], value_bits, 10, rng)
        seen += [int(priv.decrypt_raw(c)) for c in masked]
    assert not set(seen) & set(values)
    # every masked value carries the offset 2**value_bits and the SLACK_BITS of noise
    assert all(2**value_bits - 2**100 <= z < 2 ** (value_bits + 2 + SLACK_BITS) for z in seen)
    assert len({z >> value_bits for z in seen}) == len(seen)  # high bits differ: the mask dominates


def test_masked_metric_equals_plain_sse(keypair, codec, rows, rng):
    pub, priv = keypair
    stats = sufficient_stats(*rows)
    enc = encode_stats(stats, codec)
    for scale in (32, 416):
        w = np.array([3.5, 2.0, -1.0, 0.25])
        cw = encrypt_vector(pub, codec, w, scale)
        u, v, u_bits, _, secret = mask_product_inputs(pub, enc, cw, scale, rng)
        # the buyer's view: masked values only, never w or h
        assert all(priv.decrypt_raw(c) > 2 ** (u_bits - 1) for c in u)
        products, proofs = masked_products(priv, u, v, u_bits, rng, b"job|0|all|v")
        assert verify_products(pub, u, v, products, proofs, b"job|0|all|v", rng)
        sse = encrypted_sse(pub, enc, products, secret, rng)
        got = codec.decode(priv.decrypt(sse), sse_scale_bits(scale, codec.frac_bits))
        assert abs(got - stats.sse(w)) <= 1e-6 * stats.sse(w)
