"""A reference run of the 2019 original's algorithm, on this machine and the demo's data.

The original trained with ``phe`` floats, row by row: each trainer computed an
encrypted prediction per row (``sum_j x_ij [w_j]``), the encrypted residual,
and the encrypted gradient ``sum_i x_ij [e_i]``; the aggregator took the step;
the buyer decrypted and re-encrypted the model every two rounds. Run here with
the same 2048-bit key size as DeltaML, the same split (4 trainers, the diabetes
rows) and lr, for a few rounds; the caller scales to 100.

    python benchmarks/original.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from phe import paillier

from deltaml.data import demo_split, load_diabetes


def run(rounds: int = 10, key_bits: int = 2048, lr: float = 1.5) -> dict:
    pub, priv = paillier.generate_paillier_keypair(n_length=key_bits)
    parts = demo_split(load_diabetes(), 5)[:4]
    data = [(np.hstack([np.ones((len(p.y), 1)), p.X]), p.y) for p in parts]
    rows = sum(len(y) for _, y in data)
    d = data[0][0].shape[1]
    w = [pub.encrypt(0.0) for _ in range(d)]
    started = time.perf_counter()
    for r in range(1, rounds + 1):
        total = None
        for X, y in data:  # each trainer, row by row
            grad = [pub.encrypt(0.0) for _ in range(d)]
            for x, target in zip(X.tolist(), y.tolist()):
                pred = w[0] * x[0]
                for j in range(1, d):
                    pred = pred + w[j] * x[j]
                err = pred - target
                for j in range(d):
                    grad[j] = grad[j] + err * x[j]
            total = grad if total is None else [a + b for a, b in zip(total, grad)]
        w = [wj - g * (lr / rows) for wj, g in zip(w, total)]
        if r % 2 == 0:  # the buyer decrypts and re-encrypts the model
            w = [pub.encrypt(priv.decrypt(c)) for c in w]
    seconds = time.perf_counter() - started
    model = np.array([priv.decrypt(c) for c in w])
    return {"rounds": rounds, "seconds": seconds, "seconds_per_round": seconds / rounds, "key_bits": key_bits,
            "model": model.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--key-bits", type=int, default=2048)
    args = ap.parse_args()
    out = run(args.rounds, args.key_bits)
    print(f"original algorithm, {args.key_bits}-bit phe: {out['seconds']:.1f} s for {args.rounds} rounds, "
          f"{out['seconds_per_round']:.2f} s per round, {100 * out['seconds_per_round']:.0f} s scaled to 100 rounds")


if __name__ == "__main__":
    main()
