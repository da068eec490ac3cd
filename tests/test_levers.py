"""The lever table's ways not taken compute what the protocol's ways compute.

``benchmarks/levers.py`` prices each lever by timing the operation with it and
without it; the comparison is only honest if both sides do the same work. The
textbook decryption, the per-entry products and the two-power update must give
the protocol's integers (the benchmark also asserts this as it runs).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import levers  # noqa: E402

from deltaml.protocol.linear import encode_stats, sufficient_stats  # noqa: E402


def test_textbook_decryption_is_the_keys_decryption(keypair, rng):
    pub, priv = keypair
    for m in (0, 1, 12345, rng.getrandbits(1800), -5):
        c = pub.encrypt(m, rng)
        assert levers.textbook_decrypt(priv, c) == priv.decrypt_raw(c) == m % int(pub.n)


def test_per_entry_products_are_the_protocols_products(keypair, codec, rng, rows):
    pub, priv = keypair
    X, y = rows
    enc = encode_stats(sufficient_stats(X, y), codec)
    assert any(g < 0 for row in enc.gram_q for g in row), "the check needs negative entries"
    w = [pub.encrypt(codec.encode(v), rng) for v in (0.5, -1.25, 2.0, 3.5)]
    by_entry = levers.per_entry_products(pub, enc.gram_q, w)
    assert by_entry == enc.gram_times(pub, w)
    expected = enc.stats.gram @ np.array([0.5, -1.25, 2.0, 3.5])
    got = [priv.decrypt(c) / 2.0 ** (2 * codec.frac_bits) for c in by_entry]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
