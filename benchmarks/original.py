"""A reference run of the 2019 original's algorithm, on this machine and the demo's data.

The original trained with ``phe`` floats, row by row: each trainer computed an
encrypted prediction per row (``sum_j x_ij [w_j]``), the encrypted residual,
and the encrypted gradient ``sum_i x_ij [e_i]``; the aggregator took the step;
the buyer decrypted and re-encrypted the model every two rounds. Run here with
the same 2048-bit key size as DeltaML, the same split (4 trainers, 1 validator,
the diabetes rows) and lr, for a few rounds; the caller scales to 100.

Two runs of it:

* ``training`` — the issue's description and nothing more: the trainers'
  per-row gradients, the step, the buyer's decrypt-and-re-encrypt every two
  rounds, all on one core.
* ``as_it_ran`` — the original as its services did it (federated-aggregator,
  data-owner and model-buyer, ``ITERS_UNTIL_PARTIAL_RESULT = 2``): every round
  the aggregator also steps one model without each trainer (its "partial
  models", ``partial_update_model``: the average over all trainers with one
  gradient left out); every two rounds the validator computes the per-row
  encrypted residuals ``X_v [w] - y_v`` of the model and of every partial
  model, and the buyer decrypts each residual and the model, which comes back
  re-encrypted. The aggregator asked the trainers for their gradients at once
  (a thread pool over separate data-owner services), so here the trainers run
  in ``workers`` processes — both cores of this machine — while the
  aggregator, the validator and the buyer take their turns as they did.

    python benchmarks/original.py [--rounds 10] [--as-it-ran]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
from phe import paillier

from deltaml.data import demo_split, load_diabetes


def _parts(trainers: int = 4) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    parts = [(np.hstack([np.ones((len(p.y), 1)), p.X]), p.y) for p in demo_split(load_diabetes(), trainers + 1)]
    return parts[:trainers], parts[trainers]


def run(rounds: int = 10, key_bits: int = 2048, lr: float = 1.5) -> dict:
    """The issue's description of the original: per-row gradients and the buyer's refresh, one core."""
    pub, priv = paillier.generate_paillier_keypair(n_length=key_bits)
    data, _ = _parts()
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


_TRAINERS: list[tuple[np.ndarray, np.ndarray]] = []


def _serve(trainers: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """A worker process's start: it holds every trainer's rows and serves whichever is asked for."""
    global _TRAINERS
    _TRAINERS = trainers


def _gradient(job: tuple[int, np.ndarray]) -> np.ndarray:
    """One data owner's ``compute_gradient``: per-row encrypted predictions, residuals, their mean product."""
    k, w = job
    X, y = _TRAINERS[k]
    delta = X.dot(w) - y
    return delta.dot(X) / len(X)


def run_as_it_ran(rounds: int = 10, key_bits: int = 2048, lr: float = 1.5, every: int = 2,
                  workers: int = 2) -> dict:
    """The original's services' work, in their order; the trainers' gradients on ``workers`` cores."""
    pub, priv = paillier.generate_paillier_keypair(n_length=key_bits)
    trainers, (X_v, y_v) = _parts()
    T = len(trainers)
    d = X_v.shape[1]
    w = np.array([pub.encrypt(0.0) for _ in range(d)])
    seconds = {"trainers": 0.0, "aggregator": 0.0, "validator": 0.0, "buyer": 0.0}
    residuals = 0
    # spawned, not forked: the caller (the bench) has threads and a broker connection of its own
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_serve, initargs=(trainers,)) as pool:
        pool.map(_gradient, [(k, w) for k in range(T)])  # the services are up before the job starts
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            gradients = np.array(pool.map(_gradient, [(k, w) for k in range(T)]))
            t1 = time.perf_counter()
            partial = [w - lr * (np.delete(gradients, i, 0).sum(axis=0) / T) for i in range(T)]
            w = w - lr * (gradients.sum(axis=0) / T)
            t2 = time.perf_counter()
            seconds["trainers"] += t1 - t0
            seconds["aggregator"] += t2 - t1
            if r % every:
                continue
            diffs = [X_v.dot(m) - y_v for m in (w, *partial)]  # the validator, row by row
            t3 = time.perf_counter()
            decrypted = [[priv.decrypt(e) for e in diff] for diff in diffs]  # the buyer: every residual
            w = np.array([pub.encrypt(priv.decrypt(c)) for c in w])  # and the model, re-encrypted
            t4 = time.perf_counter()
            seconds["validator"] += t3 - t2
            seconds["buyer"] += t4 - t3
            residuals += sum(len(x) for x in decrypted)
    total = sum(seconds.values())
    model = np.array([priv.decrypt(c) for c in w])
    return {"rounds": rounds, "seconds": total, "seconds_per_round": total / rounds, "key_bits": key_bits,
            "evaluate_every": every, "trainer_workers": workers, "by_party_seconds": seconds,
            "residuals_decrypted": residuals, "model": model.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--as-it-ran", action="store_true", help="with its evaluations, trainers on both cores")
    args = ap.parse_args()
    if args.as_it_ran:
        out = run_as_it_ran(args.rounds, args.key_bits)
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in out["by_party_seconds"].items())
        print(f"original as it ran, {args.key_bits}-bit phe: {out['seconds']:.1f} s for {args.rounds} rounds "
              f"({parts}; {out['residuals_decrypted']} residuals decrypted), "
              f"{100 * out['seconds_per_round']:.0f} s scaled to 100 rounds")
        return
    out = run(args.rounds, args.key_bits)
    print(f"original algorithm, {args.key_bits}-bit phe: {out['seconds']:.1f} s for {args.rounds} rounds, "
          f"{out['seconds_per_round']:.2f} s per round, {100 * out['seconds_per_round']:.0f} s scaled to 100 rounds")


if __name__ == "__main__":
    main()
