"""A long-running aggregator's checkpoint: what each message costs after it has served many jobs.

A daemon with ``--state-dir`` writes its whole core after every step it takes
(:mod:`deltaml.agents.checkpoint`). This runs one short diabetes job on the
memory bus (2048-bit key), takes the aggregator's ended job, and gives the
aggregator 1, 10, 100, 1,000 and 10,000 such ended jobs (distinct copies, as that many
jobs would leave), retiring them as the core does after each step
(:mod:`deltaml.protocol.ended`); for each it prints the size of the core's
snapshot and the time one checkpoint write takes (the median of 5). A
checkpoint also holds the keyring: who signed for each party in each job
(:class:`deltaml.protocol.auth.Keyring`). Each job binds its buyer and five
owners; the keyring is trimmed to the jobs the core holds as the agent does
after every message, and the write is timed with the keyring trimmed and with
it kept whole (as before 2026-11-30).

    python benchmarks/state.py [--jobs 1 10 100 1000 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import statistics
import tempfile
import time

import structlog

from deltaml.agents.checkpoint import Checkpoint
from deltaml.agents.parties import aggregator_core, load_wallet
from deltaml.marketplace.job import DemoConfig, make_spec, prepare_parts
from deltaml.marketplace.memory import memory_job
from deltaml.protocol.auth import Keyring
from deltaml.protocol.paillier import generate_keypair


def ended_aggregator_job():
    """The aggregator's core after one 10-round job, and that job's id."""
    config = DemoConfig(rounds=10, eval_every=5)
    data, parts = prepare_parts(config)
    public, private = generate_keypair(config.key_bits)
    cores = {}

    def keep(name, core):
        cores[name] = core
        return core

    spec = make_spec(config, data, public.to_hex(), "buyer")
    job, job_id, *_ = asyncio.run(memory_job(config, parts, spec, private, wrap=keep))
    return cores["aggregator"], job_id


SIGNERS = ["buyer", *(f"owner-{i}" for i in range(1, 6))]  # who binds a name in each job (the ledger is pinned)


def checkpoint_cost(core, keys: dict, repeat: int = 5) -> tuple[int, float]:
    """Bytes of the core's snapshot and seconds of one checkpoint write with ``keys`` as the
    keyring's bindings (median of ``repeat``)."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Checkpoint(directory)
        samples = []
        for k in range(repeat):
            started = time.perf_counter()
            checkpoint.save(core.snapshot(), keys, f"message-{k}", [])
            samples.append(time.perf_counter() - started)
        checkpoint.close()
    return len(core.snapshot()), statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 10, 100, 1000, 10_000])
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    finished, job_id = ended_aggregator_job()
    blob = pickle.dumps(finished.jobs[job_id])
    print(f"one ended job as the aggregator keeps it: {len(blob) / 1e3:.1f} kB")
    print(f"{'ended jobs served':>18}{'jobs kept':>11}{'snapshot (kB)':>15}{'keyring (kB)':>14}"
          f"{'checkpoint write (ms)':>23}{'keyring kept whole: kB':>24}{'write (ms)':>12}")
    signer = load_wallet(None).address
    for n in args.jobs:
        core = aggregator_core(wallet=load_wallet(None))
        keyring, whole = Keyring(), {}
        for k in range(n):  # each its own objects, as separate jobs would leave them
            core.jobs[f"{job_id}-{k}"] = pickle.loads(blob)
            core.retire()
            for name in SIGNERS:
                keyring.bound[(f"{job_id}-{k}", name)] = whole[(f"{job_id}-{k}", name)] = signer
            keyring.trim(core.holds)
        size, seconds = checkpoint_cost(core, keyring.bound)
        _, seconds_whole = checkpoint_cost(core, whole)
        print(f"{n:>18,}{len(core.jobs):>11,}{size / 1e3:>15.1f}{len(pickle.dumps(keyring.bound)) / 1e3:>14.1f}"
              f"{seconds * 1e3:>23.2f}{len(pickle.dumps(whole)) / 1e3:>24.1f}{seconds_whole * 1e3:>12.2f}")


if __name__ == "__main__":
    main()
