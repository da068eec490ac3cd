"""The unavoidable Paillier work of the diabetes job, measured in one process.

For one round of the DESIGN §5 job (5 owners, 1 validator, 11 coefficients,
leave-one-out models, 2048-bit key) it times, with the protocol's own
functions: the table of obfuscator powers each party builds once for the
job's key (the fixed-base encryptions below cost what they cost only with
it), one trainer's products and re-randomisation, the aggregator's
update, the buyer's refresh (decryptions and encryptions) and the
aggregator's masks, and one validator evaluation. Refreshes and evaluations
do not happen every round, so the table also gives how often each happens
in a 100-round job, at which scales (the aggregator's budget rule, replayed),
and what the job costs in total. Each component is timed five times; the
floor takes the medians, and is also given from the fastest runs.
``benchmarks/e2e.py`` compares the job's wall time with the floor line.

    python benchmarks/crypto_floor.py [--rounds 100] [--eval-every 10] [--key-bits 2048] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import time

import numpy as np

from deltaml.data import demo_split, load_diabetes
from deltaml.protocol.budget import plan
from deltaml.protocol.fixedpoint import FixedPoint
from deltaml.protocol.linear import encode_stats, encrypted_gradient, encrypted_update, step_size_q, sufficient_stats
from deltaml.protocol.metric import (ProductClaim, encrypted_sse, mask_product_inputs, masked_products,
                                     verify_all_products)
from deltaml.protocol.errors import KeyTooShort
from deltaml.protocol.paillier import check_key_bits, generate_keypair
from deltaml.protocol.randomness import expect_uses, fixed_base, forget_table, obfuscator_table
from deltaml.protocol.refresh import mask_for_refresh, refresh_masked, unmask_refreshed


#: The one-time component: every party builds it before its first fixed-base encryption of a job's key.
TABLE = "obfuscator table (built once per party and key)"

#: Runs per component. The floor takes their median: the machine's speed varies from second to second
#: (on a shared host by a third), and the job meets it as it comes, not at its fastest.
REPEAT = 5


def timed(fn, repeat=REPEAT):
    """Seconds of each of ``repeat`` runs of ``fn`` (an array: arithmetic pairs the runs), and its result."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
    return np.array(samples), out


def floor_of(rows, trainers: int, rounds: int, statistic) -> dict:
    """The job's Paillier work from the components' timings, each summarised by ``statistic``.

    The trainer rows are one trainer's work. Trainers work in parallel, so one trainer's share is on
    the critical path; the aggregator, buyer and validator wait for each other.
    """
    by_party: dict[str, float] = {}
    for _, party, count, each in rows:
        by_party[party] = by_party.get(party, 0.0) + count * float(statistic(each))
    rest = sum(v for k, v in by_party.items() if k != "trainer")
    total = trainers * by_party["trainer"] + rest
    critical = by_party["trainer"] + rest
    cores = os.cpu_count() or 1
    return {"by_party_seconds": by_party, "total_seconds": total, "critical_path_seconds": critical,
            "per_round_critical_ms": critical / rounds * 1e3, "cores": cores,
            "floor_seconds": max(critical, total / cores)}


def schedule(rounds: int, eval_every: int, key_bits: int, codec: FixedPoint) -> tuple[list[int], list[int]]:
    """The scales at which the aggregator's budget rule refreshes and evaluates in a job.

    The cost of an evaluation grows with the scale of the model it scores (the
    masks and the validator's exponents are that much longer), so the floor
    times each at the scale the job reaches.
    """
    return plan(codec.frac_bits, 0, rounds, eval_every, codec.frac_bits, codec.magnitude_bits, key_bits)


def time_refresh(pub, priv, codec: FixedPoint, d: int, scale: int, rng) -> tuple:
    """One model's masked refresh at ``scale``: the aggregator's masks and unmasking, the buyer's work."""
    ws = [priv.encrypt(codec.encode(0.5 * j, scale)) for j in range(d)]
    vb, drop = codec.value_bits(scale), scale - codec.frac_bits
    t_mask, (masked, masks) = timed(lambda: mask_for_refresh(pub, ws, vb, drop, rng))
    t_refresh, fresh = timed(lambda: refresh_masked(priv, masked, vb, drop, rng))
    t_unmask, _ = timed(lambda: unmask_refreshed(pub, fresh, masks))
    return t_mask + t_unmask, t_refresh


def time_evaluation(pub, priv, enc_v, d: int, scale: int, batch: int, rng) -> tuple:
    """One model's proof-checked evaluation at ``scale``, its validator checking the proofs of
    ``batch`` models at once: the validator's share per model, the buyer's products and proofs,
    the buyer's verifiable decryption, and the ``[SSE]``."""
    codec = enc_v.codec
    ws = [priv.encrypt(codec.encode(0.5 * j, scale)) for j in range(d)]
    t_v1, (u, v, ub, _, sec) = timed(lambda: mask_product_inputs(pub, enc_v, ws, scale, rng))
    t_buyer_prod, (prods, proofs) = timed(lambda: masked_products(priv, u, v, ub, rng))
    claims = [ProductClaim(u, v, prods, proofs)] * batch
    t_verify, _ = timed(lambda: verify_all_products(pub, claims, rng))
    t_v3, sse = timed(lambda: encrypted_sse(pub, enc_v, prods, sec, rng))
    t_publish, _ = timed(lambda: priv.decrypt_verifiably(sse))
    return t_v1 + t_v3 + t_verify / batch, t_buyer_prod, t_publish, sse


def run_from_command_line(description: str, measure_job) -> None:
    """Parse the job's shape (rounds, evaluation interval, key size), measure it, write ``--json``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.rounds < 1 or args.eval_every < 1:
        ap.error("--rounds and --eval-every must be at least 1")
    try:
        check_key_bits(args.key_bits)
    except KeyTooShort as exc:
        ap.error(str(exc))
    result = measure_job(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


def main() -> None:
    run_from_command_line(__doc__.splitlines()[0], measure)


def measure(args) -> dict:
    """Time each component once, print the table, return the figures."""
    codec, rng = FixedPoint(), random.Random(0)
    pub, priv = generate_keypair(args.key_bits)
    parts = demo_split(load_diabetes(), 5)
    trainers, validator = parts[:4], parts[4]
    T = len(trainers)
    models = T + 1  # full model and one leave-one-out model per trainer
    per_trainer = T  # the full model and T-1 leave-one-out models
    enc_t = encode_stats(sufficient_stats(trainers[0].X, trainers[0].y), codec)
    enc_v = encode_stats(sufficient_stats(validator.X, validator.y), codec)
    d = enc_t.stats.dim
    w = [priv.encrypt(codec.encode(0.5 * j)) for j in range(d)]
    s = codec.frac_bits

    # a trainer's table suits the obfuscators it draws in the job (d per model and round); the
    # other parties draw a few hundred each and build theirs with the default window
    uses = args.rounds * per_trainer * d
    expect_uses(pub.n, uses)
    trainer_window = fixed_base(pub.n).window
    t_grad, grad = timed(lambda: encrypted_gradient(pub, enc_t, w, s, rng))
    t_products, _ = timed(lambda: enc_t.gram_times(pub, w))
    t_trainer_table, _ = timed(lambda: obfuscator_table(pub.n, uses))
    forget_table(pub.n)
    default_window = fixed_base(pub.n).window
    t_update, _ = timed(lambda: encrypted_update(pub, codec, w, [grad] * T, step_size_q(codec, 1.5, 353)))
    t_enc, _ = timed(lambda: pub.encrypt(12345, rng), repeat=20)
    t_crt, _ = timed(lambda: priv.encode_and_obfuscate_crt(12345, rng), repeat=20)
    t_textbook, _ = timed(lambda: pub.obfuscator_slow(rng), repeat=20)
    t_table, _ = timed(lambda: obfuscator_table(pub.n))

    R = args.rounds
    refresh_scales, eval_scales = schedule(R, args.eval_every, args.key_bits, codec)
    rows = [
        # (component, who, count in the job, seconds each)
        # the fixed-base encryptions below are that cheap only once a party holds the key's table
        (f"{TABLE}: {trainer_window}-bit window", "trainer", 1, t_trainer_table),
        *((f"{TABLE}: {default_window}-bit window", party, 1, t_table) for party in ("aggregator", "buyer", "validator")),
        ("trainer products (G[w] per model)", "trainer", R * per_trainer, t_products),
        ("trainer re-randomisation (d enc per model)", "trainer", R * per_trainer, t_grad - t_products),
        ("aggregator update (per model)", "aggregator", R * models, t_update),
    ]
    for scale, count in sorted(collections.Counter(refresh_scales).items()):
        t_masks, t_refresh = time_refresh(pub, priv, codec, d, scale, rng)
        rows += [(f"refresh masks (d enc per model), scale {scale}", "aggregator", count * models, t_masks),
                 (f"buyer refresh (d dec + d enc per model), scale {scale}", "buyer", count * models, t_refresh)]
    # every evaluation scores the full model; the last scores all models, and its validator checks
    # the buyer's proofs for all of them together (one batch: the n-th powers once)
    final = eval_scales[-1]
    evaluations = [(scale, count, 1) for scale, count in sorted(collections.Counter(eval_scales[:-1]).items())]
    for scale, count, batch in [*evaluations, (final, models, models)]:
        t_validator, t_buyer_prod, t_publish, sse = time_evaluation(pub, priv, enc_v, d, scale, batch, rng)
        check = "one proof check for all models" if batch > 1 else "proof check"
        rows += [
            (f"validator masks and {check} (per model), scale {scale}", "validator", count, t_validator),
            (f"buyer masked products and proofs (per model), scale {scale}", "buyer", count, t_buyer_prod),
            (f"buyer verifiable decryption (per model), scale {scale}", "buyer", count, t_publish),
        ]
    t_dec, _ = timed(lambda: priv.decrypt(sse), repeat=20)
    refreshes, evals = len(refresh_scales), len(eval_scales)
    med = np.median
    print(f"Paillier {pub.bits}-bit; d={d}; {T} trainers, {models} models; {R} rounds, "
          f"{refreshes} refreshes, {evals} evaluations; each time the median of {REPEAT} runs")
    print(f"single operations: encrypt (fixed-base) {med(t_enc)*1e3:.2f} ms, textbook r^n "
          f"{med(t_textbook)*1e3:.2f} ms, encrypt via CRT {med(t_crt)*1e3:.2f} ms, decrypt {med(t_dec)*1e3:.2f} ms\n")
    print(f"{'component':<74}{'party':<12}{'count':>7}{'ms each':>10}{'s in job':>10}")
    for name, party, count, each in rows:
        print(f"{name:<74}{party:<12}{count:>7}{med(each)*1e3:>10.2f}{count*med(each):>10.2f}")
    typical, fastest = floor_of(rows, T, R, np.median), floor_of(rows, T, R, np.min)
    untabled = floor_of([row for row in rows if not row[0].startswith(TABLE)], T, R, np.median)
    cores = typical["cores"]
    print(f"\n{'all Paillier work, one process':<96}{typical['total_seconds']:>10.2f} s")
    print(f"{'critical path (trainers in parallel)':<96}{typical['critical_path_seconds']:>10.2f} s")
    print(f"{'per round on the critical path':<96}{typical['per_round_critical_ms']:>10.1f} ms")
    print(f"{f'floor on this machine: max(critical path, all work / {cores} cores)':<96}"
          f"{typical['floor_seconds']:>10.2f} s")
    print(f"{'  the same from the fastest of the runs (the machine at its best)':<96}"
          f"{fastest['floor_seconds']:>10.2f} s")
    print(f"{'  the same without the obfuscator tables':<96}{untabled['floor_seconds']:>10.2f} s")
    return {"key_bits": pub.bits, "rounds": R, "refreshes": refreshes, "evaluations": evals, "repeat": REPEAT,
            "single_ms": {"encrypt_fixed_base": med(t_enc) * 1e3, "obfuscator_textbook": med(t_textbook) * 1e3,
                          "encrypt_crt": med(t_crt) * 1e3, "decrypt": med(t_dec) * 1e3},
            "components": [{"name": n, "party": p, "count": c, "seconds_each": float(med(e)),
                            "seconds_fastest": float(np.min(e))} for n, p, c, e in rows],
            **typical, "fastest": fastest, "without_tables": untabled}


if __name__ == "__main__":
    main()
