import json

import gmpy2
import pytest
from hypothesis import example, given, settings, strategies as st

from deltaml.protocol.errors import KeyTooShort
from deltaml.protocol.paillier import Decryption, PublicKey, generate_keypair, verify_decryption
from deltaml.protocol.powers import INVERT_COST, WINDOWS, FixedBase, MatrixPowers, window_for
from deltaml.protocol.randomness import djn_hs

small = st.integers(min_value=-(2**200), max_value=2**200)


def test_short_keys_are_refused():
    with pytest.raises(KeyTooShort):
        generate_keypair(1024)
    with pytest.raises(KeyTooShort):
        PublicKey.from_hex(format((1 << 1023) + 1, "x"))


def test_key_of_2048_bits_by_default(keypair):
    assert keypair[0].bits == 2048


@settings(max_examples=25, deadline=None)
@given(a=small, b=small, k=st.integers(min_value=-(2**64), max_value=2**64))
def test_homomorphic_operations(keypair, a, b, k):
    pub, priv = keypair
    ca, cb = pub.encrypt(a), priv.encrypt(b)
    assert priv.decrypt(ca) == a and priv.decrypt(cb) == b
    assert priv.decrypt(pub.add(ca, cb)) == a + b
    assert priv.decrypt(pub.add_plain(ca, b)) == a + b
    assert priv.decrypt(pub.mul(ca, k)) == a * k
    assert priv.decrypt(pub.dot([ca, cb], [k, -3])) == a * k - 3 * b
    assert pub.dot([ca, cb], [k, -3]) == entrywise(pub, [ca, cb], [k, -3])
    assert priv.decrypt(pub.neg(ca)) == -a
    assert priv.decrypt(pub.rerandomize(ca)) == a and pub.rerandomize(ca) != ca


def test_plaintext_beyond_signed_range_is_refused(keypair):
    pub, _ = keypair
    with pytest.raises(OverflowError):
        pub.encrypt(pub.n // 2)


def test_ciphertexts_travel_as_json_strings(keypair):
    from deltaml.protocol.messages import GradientReply

    pub, priv = keypair
    c = pub.encrypt(-5)
    text = GradientReply(rows=1, gradients={"all": [c]}).model_dump_json()
    assert isinstance(json.loads(text)["gradients"]["all"][0], str)
    back = GradientReply.model_validate_json(text)
    assert priv.decrypt(back.gradients["all"][0]) == -5


@settings(max_examples=10, deadline=None)
@given(m=small)
def test_verifiable_decryption_accepts_the_honest_answer(keypair, m):
    pub, priv = keypair
    c = pub.encrypt(m)
    proof = priv.decrypt_verifiably(c)
    assert proof.plaintext == m
    assert verify_decryption(pub, c, proof)


def test_verifiable_decryption_rejects_lies(keypair):
    pub, priv = keypair
    c = pub.encrypt(1234)
    honest = priv.decrypt_verifiably(c)
    assert not verify_decryption(pub, c, Decryption(1235, honest.randomness))
    assert not verify_decryption(pub, c, Decryption(1234, honest.randomness + 1))
    assert not verify_decryption(pub, c, Decryption(1234, 0))
    assert not verify_decryption(pub, pub.encrypt(1234), honest)  # same value, other ciphertext


def test_private_key_repr_hides_factors(keypair):
    _, priv = keypair
    assert str(int(priv.p)) not in repr(priv)


def entrywise(pub, cs, ks):
    """``prod_j cs[j]**ks[j] mod n**2`` one power at a time: the reference for the multi-exponentiations."""
    out = gmpy2.mpz(1)
    for c, k in zip(cs, ks):
        p = gmpy2.powmod(c, abs(k), pub.nsquare)
        out = out * (p if k >= 0 else gmpy2.invert(p, pub.nsquare)) % pub.nsquare
    return out


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 9).flatmap(lambda d: st.tuples(
        st.lists(st.lists(st.integers(-(2**45), 2**45), min_size=d, max_size=d), min_size=1, max_size=4),
        st.lists(st.integers(-(2**60), 2**60), min_size=d, max_size=d),
    )),
    st.integers(1, 7),
    st.sampled_from(MatrixPowers.SIGNS),
)
def test_matrix_powers_equal_entrywise_products(keypair, case, group, signs):
    pub, priv = keypair
    rows, xs = case
    cs = [pub.encrypt(x) for x in xs]
    got = MatrixPowers(rows, group=group, signs=signs).apply(pub, cs)
    assert got == [entrywise(pub, cs, row) for row in rows]
    assert [priv.decrypt(c) for c in got] == [sum(k * x for k, x in zip(row, xs)) for row in rows]


def bit_by_bit_schedule(mp, row):
    """A row's steps spelled out one entry and one bit at a time (how ``MatrixPowers`` first
    planned them, before the plan became a matrix product)."""
    bits = max((abs(k).bit_length() for k in row), default=0)
    steps = []
    for t in range(bits - 1, -1, -1):
        step = []
        for g, members in enumerate(mp.groups):
            pos = neg = 0
            for p, j in enumerate(members):
                if (abs(row[j]) >> t) & 1:
                    if row[j] > 0:
                        pos |= 1 << p
                    else:
                        neg |= 1 << mp.inverted[g].index(j)
            if pos or neg:
                step.append((g, pos, neg))
        steps.append(tuple(step))
    return steps


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 14).flatmap(lambda d: st.lists(
        st.lists(st.one_of(st.just(0), st.integers(-(2**130), 2**130)), min_size=d, max_size=d),
        min_size=1, max_size=5)),
    st.integers(1, 7),
    st.sampled_from(MatrixPowers.SIGNS),
)
@example([[0, 0, 0], [5, -2, 0]], 2, "inverses")  # a row of zeros: no steps at all
def test_matrix_powers_plan_each_bit_of_each_entry(rows, group, signs):
    mp = MatrixPowers(rows, group=group, signs=signs)
    planned = rows
    if mp.offset:  # the rows it runs: every column raised by its largest negation, and the offsets row
        offsets = [max(0, -min(column)) for column in zip(*rows)]
        planned = [[k + o for k, o in zip(row, offsets)] for row in rows] + [offsets]
    assert mp.schedule == [bit_by_bit_schedule(mp, row) for row in planned]
    # the cost it chose by counts a squaring per step and a multiplication per subset used
    tables = sum(2 ** len(g) for g in mp.groups) + sum(2 ** len(i) + INVERT_COST * len(i) for i in mp.inverted if i)
    used = sum(len(steps) + sum(bool(a) + bool(b) for step in steps for _, a, b in step) for steps in mp.schedule)
    assert mp.cost == tables + used + (INVERT_COST + len(rows) if mp.offset else 0)


def test_matrix_powers_pick_the_cheaper_way_to_handle_signs(keypair):
    """A Gram matrix (a few negative entries in every row) is cheaper through column offsets and
    one inversion; the aggregator's single row ``[2**64, -eta]`` through the inverted base."""
    from deltaml.data import demo_split, load_diabetes
    from deltaml.protocol.fixedpoint import FixedPoint
    from deltaml.protocol.linear import encode_stats, sufficient_stats

    part = demo_split(load_diabetes(), 5)[0]
    gram = encode_stats(sufficient_stats(part.X, part.y), FixedPoint()).gram_q
    for rows, offset in ((gram, True), ([[1 << 64, -(2**24 + 12345)]], False)):
        auto, inverses, offsets = (MatrixPowers(rows, signs=s) for s in MatrixPowers.SIGNS)
        assert auto.offset is offset
        assert auto.cost == min(inverses.cost, offsets.cost) < max(inverses.cost, offsets.cost)
    pub, _ = keypair
    cs = [pub.encrypt(x) for x in range(1, len(gram) + 1)]
    assert MatrixPowers(gram, signs="offsets").apply(pub, cs) == MatrixPowers(gram, signs="inverses").apply(pub, cs)
    with pytest.raises(ValueError, match="signs must be one of"):
        MatrixPowers(gram, signs="both")


def test_matrix_powers_refuse_a_vector_of_the_wrong_length(keypair):
    pub, _ = keypair
    with pytest.raises(ValueError, match="expected 2 ciphertexts"):
        MatrixPowers([[1, 2]]).apply(pub, [pub.encrypt(1)])


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(list(WINDOWS)), st.integers(1, 200), st.data())
def test_fixed_base_tables_of_every_window_give_the_powers(keypair, window, bits, data):
    pub, _ = keypair
    table = FixedBase(djn_hs(pub.n), pub.nsquare, bits, window)
    assert table.width >= bits and table.window == window
    for x in (0, 1, (1 << bits) - 1, data.draw(st.integers(0, (1 << table.width) - 1))):
        assert table.pow(x) == gmpy2.powmod(djn_hs(pub.n), x, pub.nsquare)
    for x in (-1, 1 << table.width):
        with pytest.raises(ValueError, match="exponent outside"):
            table.pow(x)


def test_a_tables_window_grows_with_the_powers_it_will_serve():
    """Counted multiplications, table included: a few hundred obfuscators (a validator, a short job)
    want a narrow table, a 100-round trainer of the demo (4,400) a 10-bit one, and a billion no wider."""
    chosen = [window_for(uses, 1024) for uses in (0, 100, 300, 1000, 2000, 4400, 10**9)]
    assert chosen == [4, 5, 6, 8, 9, 10, 10] and max(WINDOWS) == 10
    assert all(window_for(u, 1024) <= window_for(u + 1, 1024) for u in range(0, 6000, 7))
    for window in (0, 17):
        with pytest.raises(ValueError, match=f"table window of {window} bits"):
            FixedBase(3, 35, 8, window)


def test_the_key_holders_randomness_pair_is_the_public_one(keypair):
    import random

    pub, priv = keypair
    assert priv.randomness_pair(random.Random(5)) == pub.randomness_pair(random.Random(5))
    rho, rho_n = priv.randomness_pair(random.Random(6))
    assert rho_n == pow(int(rho), int(pub.n), int(pub.nsquare))
    c = pub.encrypt(42)
    assert priv.pow_crt(c, 12345) == pow(int(c), 12345, int(pub.nsquare))


def test_without_a_table_the_key_holder_encrypts_through_crt_to_the_same_ciphertexts():
    from deltaml.protocol import randomness
    from deltaml.protocol.drbg import Drbg

    pub, priv = generate_keypair(2048)  # a fresh key: this process has no table for it yet
    rng = Drbg(b"s" * 32)
    by_crt = [priv.encrypt(m, rng) for m in (0, 5, -7)]
    assert int(pub.n) not in {int(n) for n in randomness._TABLES}  # the key holder built none
    rng = Drbg(b"s" * 32)
    assert [pub.encrypt(m, rng) for m in (0, 5, -7)] == by_crt  # the public way, through the table
    assert [priv.decrypt(c) for c in by_crt] == [0, 5, -7]
