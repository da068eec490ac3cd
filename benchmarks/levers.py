"""Each lever issue 6 names, timed with it and without it, and what it is worth in the job.

For every lever this times the operation it changes both ways with the
protocol's own functions (and, for the way not taken, the few lines of
textbook arithmetic it replaces), each the median of five runs in one
process, and multiplies by how often the 100-round diabetes job (5 owners,
1 validator, leave-one-out models, 2048-bit key) does it: the CPU seconds the
lever saves in the job, or costs. The two levers that change when work is done
rather than how much (obfuscators in idle time, the agents' work off the event
loop) are priced here on the path they take work off; ``benchmarks/e2e.py
--levers`` runs the whole job without idle-time obfuscators. ``make bench``
prints this table too and keeps it in ``benchmarks/results.json``.

    python benchmarks/levers.py [--rounds 100] [--eval-every 10] [--key-bits 2048] [--json FILE]
"""

from __future__ import annotations

import base64
import collections
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import gmpy2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crypto_floor import run_from_command_line, schedule, time_evaluation, time_refresh, timed  # noqa: E402

from deltaml.data import demo_split, load_diabetes  # noqa: E402
from deltaml.protocol.fixedpoint import SLACK_BITS, FixedPoint  # noqa: E402
from deltaml.protocol.linear import encode_stats, encrypted_update, step_size_q, sufficient_stats  # noqa: E402
from deltaml.protocol.paillier import generate_keypair  # noqa: E402
from deltaml.protocol.powers import MatrixPowers  # noqa: E402
from deltaml.protocol.randomness import fixed_base, obfuscator_table  # noqa: E402


@dataclass
class Lever:
    """One lever: the operation it changes, timed without it and with it, and how often the job does it."""

    name: str
    unit: str  # what one count is
    without: np.ndarray  # seconds per unit, each run (or their median)
    without_count: int
    with_: np.ndarray
    with_count: int
    taken: bool
    saves: str = "CPU"  # or the path it takes work off

    @property
    def saved_seconds(self) -> float:
        return self.without_count * float(np.median(self.without)) - self.with_count * float(np.median(self.with_))


def textbook_decrypt(priv, c) -> int:
    """Paillier's decryption as the paper gives it: ``L(c**lambda mod n**2) * mu mod n``, no CRT."""
    n, n2 = priv.public.n, priv.public.nsquare
    lam = (priv.p - 1) * (priv.q - 1) // gmpy2.gcd(priv.p - 1, priv.q - 1)
    mu = gmpy2.invert(lam, n)  # g = n + 1: L(g**lambda) = lambda mod n
    return int((gmpy2.powmod(gmpy2.mpz(c), lam, n2) - 1) // n * mu % n)


def per_entry_products(pub, gram_q, w) -> list:
    """``[G w]`` one ciphertext power per entry, a negative entry by an inversion (as ``phe`` does)."""
    return [pub.sum(pub.mul(wj, g) for wj, g in zip(w, row)) for row in gram_q]


def measure(args) -> dict:
    """Time each lever both ways, print the table, return the figures."""
    codec, rng = FixedPoint(), random.Random(1)
    pub, priv = generate_keypair(args.key_bits)
    n2 = pub.nsquare
    parts = demo_split(load_diabetes(), 5)
    trainers, validator = parts[:4], parts[4]
    T, R = len(trainers), args.rounds
    models, per_trainer = T + 1, T
    enc_t = encode_stats(sufficient_stats(trainers[0].X, trainers[0].y), codec)
    enc_v = encode_stats(sufficient_stats(validator.X, validator.y), codec)
    d = enc_t.stats.dim
    f = codec.frac_bits
    w = [priv.encrypt(codec.encode(0.5 * j)) for j in range(d)]
    refresh_scales, eval_scales = schedule(R, args.eval_every, args.key_bits, codec)
    evaluated = len(eval_scales) - 1 + models  # the full model at each evaluation, every model at the last
    replies = T * R * per_trainer  # one trainer's gradient for one model and round
    refreshed = len(refresh_scales) * models
    fixed_base(pub.n)  # every party holds the key's table before its first fixed-base power
    levers: list[Lever] = []

    # 1. obfuscators: DJN's fixed base from a table of powers, against r**n
    t_slow, _ = timed(lambda: pub.obfuscator_slow(rng), repeat=20)
    t_fast, _ = timed(lambda: pub.obfuscator(rng), repeat=20)
    t_table, _ = timed(lambda: obfuscator_table(pub.n))
    drawn = replies * d + 2 * refreshed * d + 2 * evaluated * d  # trainers, refreshes (both sides), validator masks
    parties = T + 3
    levers.append(Lever("obfuscators: DJN fixed base, table of powers, vs r^n", "obfuscator",
                        t_slow, drawn, np.median(t_fast) + np.median(t_table) * parties / drawn, drawn, True))

    # 2. obfuscators computed in idle time: what stays on a trainer's reply path
    b_q = enc_t.moment_q(2 * f)
    ready = [pub.obfuscator(rng) for _ in range(d)]
    t_on_path, _ = timed(lambda: [pub.encode_plain(-b) * pub.obfuscator(rng) % n2 for b in b_q])
    t_ahead, _ = timed(lambda: [pub.encode_plain(-b) * o % n2 for b, o in zip(b_q, ready)])
    levers.append(Lever("obfuscators computed in idle time (a trainer's reply path)", "model reply",
                        t_on_path, replies, t_ahead, replies, True, saves="the trainers' reply path"))

    # 3. refresh only when the fixed-point budget is spent, against every round (DESIGN §2)
    every_round = 3 * f  # the scale after one step from a fresh model
    masks_each, buyer_each = time_refresh(pub, priv, codec, d, every_round, rng)
    t_every = masks_each + buyer_each
    budget = {s: sum(time_refresh(pub, priv, codec, d, s, rng)) for s in set(refresh_scales)}  # each scale once
    t_budget = sum((budget[s] for s in refresh_scales), np.zeros_like(t_every)) / max(len(refresh_scales), 1)
    levers.append(Lever(f"refresh when the budget is spent ({len(refresh_scales)} times), not every round",
                        "model refresh", t_every, R * models, t_budget, refreshed, True))
    # ... which lets evaluations meet the model at a higher scale: the price of the rule
    def evaluation(scale: int) -> np.ndarray:
        validator_share, buyer_products, publish, _ = time_evaluation(pub, priv, enc_v, d, scale, 1, rng)
        return validator_share + buyer_products + publish
    by_scale = {s: evaluation(s) for s in sorted({f, *eval_scales})}
    low = by_scale[f]
    counts = collections.Counter(eval_scales[:-1])
    counts[eval_scales[-1]] += models
    t_rule = sum((by_scale[s] * c for s, c in counts.items()), np.zeros_like(low)) / evaluated
    levers.append(Lever("  its price: evaluations at the scale the rule leaves, not always at 32", "model evaluation",
                        low, evaluated, t_rule, evaluated, True))

    # 4. the buyer's private-key work through CRT
    u_bits = codec.value_bits(f) + 2 + SLACK_BITS
    masked = [pub.encrypt(rng.getrandbits(u_bits)) for _ in range(4)]
    t_dec_textbook, plain = timed(lambda: [textbook_decrypt(priv, c) for c in masked])
    t_dec_crt, plain_crt = timed(lambda: [priv.decrypt_raw(c) for c in masked])
    assert plain == plain_crt, "the textbook decryption disagrees with the key's"
    decrypted = refreshed * d + evaluated * (d + 1)  # refreshes, masked u, the published SSE
    levers.append(Lever("buyer decrypts through CRT (p^2, q^2)", "decryption", t_dec_textbook / 4, decrypted,
                        t_dec_crt / 4, decrypted, True))
    v = pub.encrypt(12345)
    exponents = [rng.getrandbits(u_bits), rng.randrange(int(pub.n))]  # u_j, and a proof's a (full length)
    t_pow, _ = timed(lambda: [gmpy2.powmod(v, e, n2) for e in exponents])
    t_pow_crt, _ = timed(lambda: [priv.pow_crt(v, e) for e in exponents])
    levers.append(Lever("buyer's masked products and proof commitments through CRT", "coordinate (2 powers)",
                        t_pow, evaluated * d, t_pow_crt, evaluated * d, True))
    t_pair, _ = timed(lambda: [pub.randomness_pair(rng) for _ in range(3)])
    t_pair_crt, _ = timed(lambda: [priv.randomness_pair(rng) for _ in range(3)])
    levers.append(Lever("buyer's proof randomness: roots mod p and q", "coordinate (3 roots)",
                        t_pair, evaluated * d, t_pair_crt, evaluated * d, True))

    # 5. pack several masked values into one plaintext for the buyer's decryptions: not taken.
    # A value moves into its slot by a power 2**slot (the validator's work); the buyer's proof for
    # each coordinate still needs that ciphertext's randomness, a root as dear as the decryption saved.
    slot = u_bits + 1
    per_plaintext = (pub.bits - 3) // slot
    t_shift, _ = timed(lambda: pub.mul(masked[0], 1 << slot), repeat=20)
    t_root, _ = timed(lambda: priv.randomness(masked[0], priv.decrypt_raw(masked[0])), repeat=20)
    at_32 = counts.get(f, 0) * d
    unpacked = np.median(t_dec_crt / 4) + np.median(t_root)
    packed = np.median(t_shift) + np.median(t_dec_crt / 4) / per_plaintext + np.median(t_root)
    levers.append(Lever(f"pack {per_plaintext} masked u per plaintext (scale {f}; at 672 two fit)",
                        "masked u", np.array([unpacked]), at_32, np.array([packed]), at_32, False))

    # 6. the products: one multi-exponentiation per row, negative entries without inversions
    t_entry, by_entry = timed(lambda: per_entry_products(pub, enc_t.gram_q, w))
    inverses = MatrixPowers(enc_t.gram_q, signs="inverses")
    t_inverses, by_inverses = timed(lambda: inverses.apply(pub, w))
    t_offsets, by_offsets = timed(lambda: enc_t.gram_times(pub, w))
    assert by_entry == by_inverses == by_offsets, "the ways of computing [G w] disagree"
    levers.append(Lever("trainer products as multi-exponentiations (Straus, shared tables)", "model product",
                        t_entry, replies, t_inverses, replies, True))
    levers.append(Lever(f"  negative entries by column offsets, not inverted bases ({enc_t.powers.cost} mults)",
                        "model product", t_inverses, replies, t_offsets, replies, enc_t.powers.offset))
    eta = step_size_q(codec, 1.5, 353)
    grads = [w] * T
    t_update_two, two = timed(lambda: [pub.add(pub.mul(wj, 1 << 2 * f), pub.mul(pub.sum(g[j] for g in grads), -eta))
                                       for j, wj in enumerate(w)])
    t_update, one = timed(lambda: encrypted_update(pub, codec, w, grads, eta))
    assert two == one, "the two ways of taking the step disagree"
    levers.append(Lever("aggregator update as one multi-exponentiation [2^64, -eta]", "model update",
                        t_update_two, R * models, t_update, R * models, True))

    # 7. compact messages: a ciphertext in hex (ours) against decimal (the original's JSON) and base64
    sample = [int(pub.encrypt(k)) for k in range(d)]
    nbytes = (2 * pub.bits + 7) // 8
    def trip(enc, dec) -> np.ndarray:
        return timed(lambda: [dec(s) for s in json.loads(json.dumps([enc(c) for c in sample]))])[0] / d
    t_hex = trip(lambda c: format(c, "x"), lambda s: int(s, 16))
    t_decimal = trip(str, int)
    t_b64 = trip(lambda c: base64.b64encode(c.to_bytes(nbytes, "big")).decode(),
                 lambda s: int.from_bytes(base64.b64decode(s), "big"))
    carried = 2 * replies * d  # the trainers' requests and replies, each coordinate once
    size = {"hex": len(format(sample[0], "x")), "decimal": len(str(sample[0])),
            "base64": len(base64.b64encode(sample[0].to_bytes(nbytes, "big")))}
    levers.append(Lever(f"ciphertexts in hex ({size['hex']} chars), not decimal ({size['decimal']})",
                        "ciphertext sent", t_decimal, carried, t_hex, carried, True))
    levers.append(Lever(f"  base64 ({size['base64']} chars) instead of hex", "ciphertext sent",
                        t_hex, carried, t_b64, carried, False))

    print(f"Levers of issue 6: Paillier {pub.bits}-bit, d={d}; the {R}-round job ({T} trainers, {models} models, "
          f"{len(refresh_scales)} refreshes, {len(eval_scales)} evaluations); medians of 5 runs")
    print(f"{'lever':<76}{'each':<22}{'without: ms x count':>22}{'with: ms x count':>20}"
          f"{'saved, s':>10}  taken")
    for lv in levers:
        off = f"{np.median(lv.without) * 1e3:.3f} x {lv.without_count}"
        on = f"{np.median(lv.with_) * 1e3:.3f} x {lv.with_count}"
        where = "" if lv.saves == "CPU" else f" ({lv.saves})"
        print(f"{lv.name:<76}{lv.unit:<22}{off:>22}{on:>20}{lv.saved_seconds:>10.2f}  "
              f"{'yes' if lv.taken else 'no'}{where}")
    cpu = sum(lv.saved_seconds for lv in levers if lv.taken and lv.saves == "CPU")
    print(f"CPU seconds the levers taken save in the job: {cpu:.1f} (the crypto floor is what is left); "
          f"the whole job without idle-time obfuscators: benchmarks/e2e.py --levers")
    return {"key_bits": pub.bits, "rounds": R, "sizes_chars": size,
            "components": [{"lever": lv.name, "each": lv.unit, "taken": lv.taken, "saves": lv.saves,
                            "without_ms": float(np.median(lv.without)) * 1e3, "without_count": lv.without_count,
                            "with_ms": float(np.median(lv.with_)) * 1e3, "with_count": lv.with_count,
                            "saved_seconds": lv.saved_seconds} for lv in levers],
            "cpu_seconds_saved_by_levers_taken": cpu}


def main() -> None:
    run_from_command_line(__doc__.splitlines()[0], measure)


if __name__ == "__main__":
    main()
