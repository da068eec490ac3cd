"""Scale with rows: time per round does not depend on how many rows an owner holds.

5 owners (4 trainers, 1 validator) each hold N synthetic rows of 20 features;
the job runs on the in-memory bus with the embedded chain, 2048-bit keys. Each
owner reduces its rows to sufficient statistics once (reported apart); every
round then costs the same ``d*d`` products whatever N is.

    python benchmarks/scale.py [--rows 10000 1000000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import numpy as np

from deltaml.agents.agent import Agent
from deltaml.agents.bus import MemoryBus
from deltaml.agents.ledger import Chain, LedgerCore
from deltaml.agents.parties import aggregator_core, buyer_core, context, load_wallet
from deltaml.agents.runtime import configure_logging, run_buyer_job
from deltaml.protocol import messages as m
from deltaml.protocol.chain import DEFAULT_DEADLINE, LEDGER
from deltaml.protocol.linear import sufficient_stats
from deltaml.protocol.owner import OwnerCore, OwnerData
from deltaml.protocol.paillier import generate_keypair

FEATURES = 20


def owner_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, FEATURES))
    y = X @ np.linspace(-2, 2, FEATURES) + 3 + rng.normal(scale=0.5, size=n)
    return np.hstack([X, y[:, None]])


async def job(rows: int, rounds: int, key) -> dict:
    bus = MemoryBus()
    columns = tuple(f"x{i}" for i in range(FEATURES)) + ("y",)
    tables = [owner_rows(rows, s) for s in range(5)]
    started = time.perf_counter()
    for t in tables:
        sufficient_stats(t[:, :-1], t[:, -1])
    stats_seconds = (time.perf_counter() - started) / len(tables)
    ledger = LedgerCore(context(LEDGER), Chain("embedded"))
    agents = [Agent("ledger", LEDGER, ledger, bus),
              Agent("aggregator", "aggregator", aggregator_core(wallet=load_wallet(None)), bus)]
    for i, t in enumerate(tables, start=1):
        core = OwnerCore(context(f"owner-{i}", wallet=load_wallet(None)), OwnerData(columns, t))
        agents.append(Agent("owner", f"owner-{i}", core, bus))
    buyer = Agent("buyer", "buyer", buyer_core("buyer", key, wallet=load_wallet(None)), bus)
    for a in [*agents, buyer]:
        await a.start()
    spec = m.JobSpec(buyer="buyer", features=list(columns[:-1]), target="y", owners=5, validators=1, rounds=rounds,
                     lr=0.5, eval_every=rounds, key_bits=key.public.bits, public_key=key.public.to_hex(),
                     escrow=True, deadline=int(time.time()) + DEFAULT_DEADLINE)
    times: dict[int, float] = {}
    finished = await run_buyer_job(buyer, spec, job_id=uuid.uuid4().hex,
                                   on_progress=lambda r, mse, t: times.__setitem__(r, t))
    await bus.close()
    assert finished.model is not None
    per_round = (times[rounds] - times[0]) / rounds  # from the first evaluation to the last
    return {"rows": rows, "stats_seconds": stats_seconds, "seconds_per_round": per_round}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    configure_logging("console", "warning")
    key = generate_keypair(2048)[1]
    results = [asyncio.run(job(n, args.rounds, key)) for n in args.rows]
    print(f"{'rows per owner':>16}{'stats pass (s, once)':>24}{'s per round':>14}{'vs first':>10}")
    for r in results:
        print(f"{r['rows']:>16,}{r['stats_seconds']:>24.3f}{r['seconds_per_round']:>14.3f}"
              f"{r['seconds_per_round'] / results[0]['seconds_per_round']:>10.2f}")


if __name__ == "__main__":
    main()
