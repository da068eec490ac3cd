"""Scale: many owners over the real broker, and many rows per owner.

(a) ``--owners 100``: 99 trainers and a validator, each an agent with its own
    durable queue on RabbitMQ, spread over one process per core (each process
    one event loop and one connection), for 10 rounds of 2048-bit training;
    the aggregator and the buyer share this process (``--owners-with-aggregator``:
    it also holds a share of the owners, as before 2026-11-30). With n trainers
    leave-one-out would mean n models per trainer per round, so this job asks
    for the full model only (``JobSpec.leave_one_out = False``, an unpaid job:
    the contract pays only on leave-one-out contributions). Its rounds are
    timed by the aggregator's own steps, and compared with their crypto floor,
    timed just before and after it with the protocol's functions (:func:`many_owners_floor`).
(b) ``--rows 10000 1000000``: 5 owners (4 trainers, 1 validator) each hold N
    synthetic rows of 20 features; the job runs on the in-memory bus with the
    embedded chain, twice for each N, in the order 10k, 1M, 1M, 10k (the mean
    of the two counts). Each owner reduces its rows to sufficient statistics once
    (reported apart); every round then costs the same ``d*d`` products
    whatever N is.

(c) ``--paid-owners 40``: the demo's paid job at that size over RabbitMQ, each
    owner a process of its own: leave-one-out models (one per trainer),
    ``--paid-rounds 2`` rounds evaluated before training and after the last,
    settlement and withdrawals on the embedded chain. It prints the wall time
    and what the ledger did: the requests it handled, its handlers' seconds and
    the messages it sent (before 2026-11-30 each chain event went to every party
    of the job, which grew with the square of the owners).

(a) and (b) print the time per round: (a) from the aggregator's first requests
to its last step, (b) from the first evaluation to the last. Each part also
prints the peak resident memory of its processes: (a) each owner process's and
this one's; (b) this process's, which holds all five owners' rows; (c) each
owner daemon's, as it reports it. (b) also reads one owner's rows back from a
CSV file as an owner daemon reads its ``--data``: with the statistics pass, the
one-time cost of holding that many rows.

    python benchmarks/scale.py [--owners 100] [--owner-rounds 10] [--owners-with-aggregator]
                               [--rows 10000 1000000] [--rounds 6] [--paid-owners 40] [--paid-rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from deltaml.agents import topology
from deltaml.agents.agent import Agent
from deltaml.agents.amqp import AmqpBus
from deltaml.agents.bus import MemoryBus
from deltaml.agents.ledger import Chain, LedgerCore
from deltaml.agents.parties import aggregator_core, buyer_core, context, load_wallet
from deltaml.agents.runtime import configure_logging, run_buyer_job, until_signalled
from deltaml.data import load_csv
from deltaml.marketplace import DemoConfig, run_demo
from deltaml.marketplace.daemons import delete_queues, fresh_queues, job_queues, launcher, start_quietly, stop_all
from deltaml.protocol import messages as m
from deltaml.protocol.aggregator.job import AggPhase
from deltaml.protocol.chain import DEFAULT_DEADLINE, LEDGER
from deltaml.protocol.fixedpoint import FixedPoint
from deltaml.protocol.linear import encode_stats, encrypted_gradient, encrypted_update, step_size_q, sufficient_stats
from deltaml.protocol.machine import owner_names
from deltaml.protocol.owner import OwnerCore, OwnerData
from deltaml.protocol.paillier import generate_keypair
from deltaml.protocol.randomness import expect_uses, fixed_base, forget_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crypto_floor import schedule, time_evaluation, time_refresh, timed  # noqa: E402

FEATURES = 20
COLUMNS = tuple(f"x{i}" for i in range(FEATURES)) + ("y",)


def owner_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, FEATURES))
    y = X @ np.linspace(-2, 2, FEATURES) + 3 + rng.normal(scale=0.5, size=n)
    return np.hstack([X, y[:, None]])


def reset_peak_memory() -> None:
    """Start this process's peak resident memory afresh (Linux: ``clear_refs`` 5), so that the next
    :func:`peak_memory_mb` is the peak of what comes after."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (``VmHWM``) in MB; NaN where ``/proc`` cannot tell."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def csv_read_seconds(rows: int) -> float:
    """One owner's rows as a CSV file, read back as its daemon reads its ``--data`` (``load_csv``):
    with the statistics pass, the one-time cost of holding that many rows."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "owner.csv"
        with path.open("w") as handle:
            handle.write(",".join(COLUMNS) + "\n")
            np.savetxt(handle, owner_rows(rows, 0), delimiter=",", fmt="%.17g")
        started = time.perf_counter()
        data = load_csv(path)
        seconds = time.perf_counter() - started
    assert data.X.shape == (rows, FEATURES)
    return seconds


async def job(rows: int, rounds: int, key) -> dict:
    bus = MemoryBus()
    reset_peak_memory()
    tables = [owner_rows(rows, s) for s in range(5)]
    started = time.perf_counter()
    for t in tables:
        sufficient_stats(t[:, :-1], t[:, -1])
    stats_seconds = (time.perf_counter() - started) / len(tables)
    ledger = LedgerCore(context(LEDGER), Chain("embedded"))
    agents = [Agent("ledger", LEDGER, ledger, bus),
              Agent("aggregator", "aggregator", aggregator_core(wallet=load_wallet(None)), bus)]
    for i, t in enumerate(tables, start=1):
        core = OwnerCore(context(f"owner-{i}", wallet=load_wallet(None)), OwnerData(COLUMNS, t))
        agents.append(Agent("owner", f"owner-{i}", core, bus))
    buyer = Agent("buyer", "buyer", buyer_core("buyer", key, wallet=load_wallet(None)), bus)
    for a in [*agents, buyer]:
        await a.start()
    spec = m.JobSpec(buyer="buyer", features=list(COLUMNS[:-1]), target="y", owners=5, validators=1, rounds=rounds,
                     lr=0.5, eval_every=rounds, key_bits=key.public.bits, public_key=key.public.to_hex(),
                     escrow=True, deadline=int(time.time()) + DEFAULT_DEADLINE)
    times: dict[int, float] = {}
    finished = await run_buyer_job(buyer, spec, job_id=uuid.uuid4().hex,
                                   on_progress=lambda r, mse, t: times.__setitem__(r, t))
    await bus.close()
    assert finished.model is not None
    per_round = (times[rounds] - times[0]) / rounds  # from the first evaluation to the last
    return {"rows": rows, "stats_seconds": stats_seconds, "seconds_per_round": per_round,
            "peak_memory_mb": peak_memory_mb()}


def _owner_core(name: str, seed: int, rows: int) -> OwnerCore:
    return OwnerCore(context(name, wallet=load_wallet(None)), OwnerData(COLUMNS, owner_rows(rows, seed)))


def _importable(fn):
    """``fn`` from this file imported as a module, so a forkserver child can find it by name."""
    if __name__ != "__main__":
        return fn
    import importlib

    return getattr(importlib.import_module(Path(__file__).stem), fn.__name__)


def _owner_group(group: list[tuple[int, str]], rows: int, url: str) -> None:
    """A process hosting some of the owners, each its own agent with its own queue."""
    configure_logging("console", "warning")

    async def main() -> None:
        bus = await AmqpBus(url).connect()
        agents = [Agent("owner", name, _owner_core(name, seed, rows), bus) for seed, name in group]
        for a in agents:
            await a.start()
        await until_signalled()
        await bus.close()

    asyncio.run(main())


async def many_owners(owners: int, rounds: int, key, rows: int = 1000, processes: int = os.cpu_count() or 1,
                      owners_here: bool = False,
                      url: str = "amqp://guest:guest@127.0.0.1:5672/") -> dict:
    """(a): ``owners`` owner agents on the real broker, full model only, ``rounds`` rounds; the
    owners are spread over ``processes`` processes, and the aggregator and the buyer run in this one.
    ``owners_here``: this process is one of the ``processes`` and holds a share of the owners too;
    it then has more to do than the others, which wait for it at the end of every round (4.9-5.0
    against 4.5 s a round on 2026-11-30's slow host)."""
    bus = await AmqpBus(url).connect()
    names = owner_names(owners)
    children: list = []
    reset_peak_memory()  # (the floor built a table in this process before)
    try:
        await fresh_queues(bus, job_queues(owners))
        agents = [Agent("aggregator", "aggregator", aggregator_core(wallet=load_wallet(None)), bus)]
        groups = [list(enumerate(names))[k::processes] for k in range(processes)]
        for group in groups[1 if owners_here else 0:]:  # the owners in other processes, to use every core
            child = launcher().Process(target=_importable(_owner_group), args=(group, rows, url),
                                       name="deltaml-owners")
            start_quietly(child)
            children.append(child)
        for i, name in groups[0] if owners_here else []:
            agents.append(Agent("owner", name, _owner_core(name, i, rows), bus))
        buyer = Agent("buyer", "buyer", buyer_core("buyer", key, wallet=load_wallet(None)), bus)
        for a in [*agents, buyer]:
            await a.start()
        spec = m.JobSpec(buyer="buyer", features=list(COLUMNS[:-1]), target="y", owners=owners, validators=1,
                         rounds=rounds, lr=0.5, eval_every=rounds, key_bits=key.public.bits,
                         public_key=key.public.to_hex(), leave_one_out=False)
        times: dict[int, float] = {}
        job_id, steps = uuid.uuid4().hex, {}
        started = time.perf_counter()
        watch = asyncio.ensure_future(_watch_rounds(agents[0].core, job_id, steps))
        finished = await run_buyer_job(buyer, spec, job_id=job_id,
                                       on_progress=lambda r, mse, t: times.__setitem__(r, t))
        wall = time.perf_counter() - started
        memory = {"owner processes": [peak_memory_mb(c.pid) for c in children], "this process": peak_memory_mb()}
        watch.cancel()
        for a in [*agents, buyer]:
            await a.stop()
    finally:
        stop_all(children)
        await bus.close()
        await delete_queues(url, [("owner", n) for n in names])
    assert finished.model is not None, finished.reason
    queues = {topology.queue_name("owner", n) for n in names}
    return {"owners": owners, "processes": processes, "rounds": rounds, "first_metric_seconds": times[0],
            "training_from_seconds": steps[0] - started, "wall_seconds": wall,
            "seconds_per_round": (steps[rounds] - steps[0]) / rounds, "queues": len(queues),
            "first_mse": finished.published[0]["all"], "final_mse": finished.published[rounds]["all"],
            "peak_memory_mb": memory}


async def _watch_rounds(aggregator, job_id: str, steps: dict[int, float]) -> None:
    """When the aggregator (in this process) sends each round's requests: ``steps[k]`` is when its
    job reached round ``k`` in training, so ``steps[0]`` is when the first requests left and
    ``steps[R]`` when the last step was taken. The buyer's metrics time the rounds less well: the
    first evaluation shares the cores with the first rounds' training, so it may land rounds late."""
    while True:
        job = aggregator.jobs.get(job_id)
        if job is not None and job.phase not in (AggPhase.RECRUITING, AggPhase.STARTING):
            steps.setdefault(job.round, time.perf_counter())
        await asyncio.sleep(0.005)


def many_owners_floor(owners: int, rounds: int, key, rows: int = 1000, processes: int = os.cpu_count() or 1) -> dict:
    """The Paillier work of (a)'s rounds, from the aggregator's first requests to its last step,
    timed in this process with the protocol's functions: each owner process's obfuscator table,
    which its first encryption builds in the first round; each round every trainer's products and
    re-randomisation and the aggregator's update of the one model; the refreshes the budget rule
    makes in those rounds; the first evaluation, which overlaps them. Spread over the cores (one
    trainer's share of a round is a hundredth of it, so no party's chain of work is longer), per
    round: what (a) would take with no messages, no waiting and no processes besides the work."""
    pub, codec, rng = key.public, FixedPoint(), random.Random(0)
    trainers = owners - 1
    enc_t, enc_v = (encode_stats(sufficient_stats(t[:, :-1], t[:, -1]), codec)
                    for t in (owner_rows(rows, 0), owner_rows(rows, owners - 1)))
    d = enc_t.stats.dim
    # the table as the job's owner processes build it: their trainers announce their draws together,
    # and the first encryption builds the table with the window for them (the last build stays, for
    # the encryptions timed below)
    uses = -(-trainers // processes) * rounds * d

    def process_table():
        forget_table(pub.n)
        expect_uses(pub.n, uses)
        return fixed_base(pub.n)

    t_table, table = timed(process_table, repeat=3)
    s = codec.frac_bits
    w = [key.encrypt(codec.encode(0.01 * j)) for j in range(d)]
    t_grad, grad = timed(lambda: encrypted_gradient(pub, enc_t, w, s, rng))
    eta = step_size_q(codec, 0.5, rows * trainers)
    t_update, _ = timed(lambda: encrypted_update(pub, codec, w, [grad] * trainers, eta))
    refresh_scales, eval_scales = schedule(rounds, rounds, pub.bits, codec)
    parts = {"obfuscator tables (one per owner process, at its first encryption)": processes * np.median(t_table),
             "trainers' products and re-randomisations": rounds * trainers * np.median(t_grad),
             "aggregator's updates": rounds * np.median(t_update)}
    for scale, count in collections.Counter(refresh_scales).items():
        t_masks, t_refresh = time_refresh(pub, key, codec, d, scale, rng)
        parts["refreshes"] = parts.get("refreshes", 0.0) + count * (np.median(t_masks) + np.median(t_refresh))
    t_validator, t_products, t_publish, _ = time_evaluation(pub, key, enc_v, d, eval_scales[0], 1, rng)
    parts["the first evaluation"] = float(np.median(t_validator) + np.median(t_products) + np.median(t_publish))
    forget_table(pub.n)
    cores = os.cpu_count() or 1
    total = sum(parts.values())
    return {"window": table.window, "parts_seconds": {k: float(v) for k, v in parts.items()}, "total_seconds": float(total),
            "cores": cores, "seconds_per_round": float(total / cores / rounds)}


def paid_job(owners: int, rounds: int, keypair=None, url: str = "amqp://guest:guest@127.0.0.1:5672/") -> dict:
    """(c): ``deltaml demo --bus amqp --owners N --rounds R --eval-every R`` in this process, with
    what the ledger takes and sends counted as it goes: requests by type, and messages to the job's
    parties (chain events), to the progress exchange, and answers to whoever asked (receipts,
    chain information)."""
    taken: collections.Counter = collections.Counter()
    sent: collections.Counter = collections.Counter()
    handle = LedgerCore.handle

    def counted(core: LedgerCore, env: m.Envelope) -> list[m.Envelope]:
        out = handle(core, env)
        taken[env.type] += 1
        sent.update("progress" if e.recipient == topology.PROGRESS else
                    "events to parties" if e.type == "chain_event" else "answers" for e in out)
        return out

    LedgerCore.handle = counted  # the demo makes its ledger's core in this process
    try:
        report = run_demo(DemoConfig(owners=owners, validators=1, rounds=rounds, eval_every=rounds), "amqp",
                          keypair=keypair, amqp_url=url)
    finally:
        LedgerCore.handle = handle
    return {"owners": owners, "rounds": rounds, "wall_seconds": report["wall_seconds"],
            "final_mse": report["final_mse"], "paid_wei": sum(report["payments_wei"].values()),
            "ledger_seconds": sum(report["busy_seconds"]["ledger-ledger"].values()),
            **{f"owners_{k}_memory_mb": [b[f"{key} (process)"] for a, b in report["busy_seconds"].items()
                                         if a.startswith("owner-")]
               for k, key in (("peak", "peak memory MB"), ("private", "private memory MB at the end"))},
            "taken": dict(taken), "sent": dict(sent)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owners", type=int, default=100, help="0: skip (a)")
    ap.add_argument("--owner-rounds", type=int, default=10)
    ap.add_argument("--owners-with-aggregator", action="store_true",
                    help="(a): this process, with the aggregator and the buyer, holds a share of the owners too")
    ap.add_argument("--rows", type=int, nargs="*", default=[10_000, 1_000_000], help="none: skip (b)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--paid-owners", type=int, default=40, help="0: skip (c)")
    ap.add_argument("--paid-rounds", type=int, default=2)
    args = ap.parse_args()
    if args.owners == 1 or args.owners < 0:
        ap.error("--owners must be 0 (skip (a)) or at least 2: a validator and a trainer")
    if args.paid_owners == 1 or args.paid_owners < 0:
        ap.error("--paid-owners must be 0 (skip (c)) or at least 2: a validator and a trainer")
    if args.owner_rounds < 1 or args.rounds < 1 or args.paid_rounds < 1:
        ap.error("--owner-rounds, --rounds and --paid-rounds must be at least 1")
    if any(n < 1 for n in args.rows):
        ap.error("--rows must all be at least 1")
    configure_logging("console", "warning")
    keypair = generate_keypair(2048)
    key = keypair[1]
    if args.owners:
        processes = os.cpu_count() or 1
        # this machine's speed drifts by a third within minutes: the floor is timed just before and just after
        floors = [many_owners_floor(args.owners, args.owner_rounds, key, processes=processes)]
        r = asyncio.run(many_owners(args.owners, args.owner_rounds, key, processes=processes,
                                    owners_here=args.owners_with_aggregator))
        floors.append(many_owners_floor(args.owners, args.owner_rounds, key, processes=processes))
        where = "one of them with" if args.owners_with_aggregator else "besides"
        print(f"(a) {r['owners']} owners ({r['owners'] - 1} trainers, 1 validator, {r['queues']} owner queues) "
              f"in {r['processes']} processes ({where} the aggregator's and buyer's) over RabbitMQ, "
              f"{r['rounds']} rounds, full model only:")
        print(f"    {r['seconds_per_round']:.3f} s per round (the aggregator's first requests to its last step); "
              f"{r['training_from_seconds']:.1f} s from the job request to the first requests, "
              f"{r['first_metric_seconds']:.1f} s to the first metric; {r['wall_seconds']:.1f} s in all; "
              f"final MSE {r['final_mse']:.4f}")
        mem = r["peak_memory_mb"]
        print(f"    peak memory: {' and '.join(f'{x:.0f}' for x in mem['owner processes'])} MB in the owner processes "
              f"({-(-(r['owners']) // r['processes'])} owners each at most), {mem['this process']:.0f} MB in this one")
        f = floors[0]
        floor = statistics.mean(x["seconds_per_round"] for x in floors)
        print(f"    its crypto floor: {floor:.3f} s per round, the mean of "
              + " and ".join(f"{x['seconds_per_round']:.3f}" for x in floors)
              + f" timed just before and after ({f['window']}-bit table, {f['cores']} cores; before: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in f["parts_seconds"].items())
              + f"); the rounds took {r['seconds_per_round'] / floor:.2f}x it")
    if args.rows:
        # each size runs twice, in the order 10k, 1M, 1M, 10k: the machine's speed, which drifts by a
        # third within minutes, then weighs on both sizes alike instead of on the one run last
        order = [*args.rows, *reversed(args.rows)]
        runs = [asyncio.run(job(n, args.rounds, key)) for n in order]
        # (the peak is the lower of the two: memory the process took in a run is not all given back,
        # so a run's starting point, which the reset takes as its floor, is higher after a larger one)
        results = [{"rows": n, **{k: statistics.mean(r[k] for r in runs if r["rows"] == n)
                                  for k in ("stats_seconds", "seconds_per_round")},
                    "peak_memory_mb": min(r["peak_memory_mb"] for r in runs if r["rows"] == n),
                    "each": [r["seconds_per_round"] for r in runs if r["rows"] == n],
                    "csv_seconds": csv_read_seconds(n)} for n in args.rows]
        print(f"(b) {'rows per owner':>16}{'CSV read (s, once)':>20}{'stats pass (s, once)':>22}{'s per round':>13}"
              f"{'vs first':>10}{'peak MB':>9}   runs (in the order {', '.join(f'{n:,}' for n in order)})")
        for r in results:
            print(f"    {r['rows']:>16,}{r['csv_seconds']:>20.3f}{r['stats_seconds']:>22.3f}{r['seconds_per_round']:>13.3f}"
                  f"{r['seconds_per_round'] / results[0]['seconds_per_round']:>10.2f}{r['peak_memory_mb']:>9.0f}"
                  f"   {', '.join(f'{x:.3f}' for x in r['each'])}")
        print("    (CSV read: one owner's rows from a file, as its daemon reads its --data; peak MB: this process, "
              "which holds the 5 owners, the aggregator, the buyer and the chain)")

    if args.paid_owners:
        r = paid_job(args.paid_owners, args.paid_rounds, keypair)
        sent, taken = r["sent"], r["taken"]
        print(f"(c) a paid job of {r['owners']} owners ({r['owners'] - 1} trainers and as many leave-one-out "
              f"models, 1 validator) over RabbitMQ, each owner a process; rounds: {r['rounds']}, evaluated before "
              f"training and after it; settled and withdrawn on the embedded chain:")
        print(f"    {r['wall_seconds']:.1f} s in all; final MSE {r['final_mse']:.1f}; {r['paid_wei']:,} wei paid; "
              f"each owner process's peak memory {min(r['owners_peak_memory_mb']):.0f}-"
              f"{max(r['owners_peak_memory_mb']):.0f} MB, of which its own at the end "
              f"{min(r['owners_private_memory_mb']):.0f}-{max(r['owners_private_memory_mb']):.0f} MB")
        print(f"    the ledger took {sum(taken.values())} requests ({taken.get('tx_request', 0)} transactions, "
              f"{taken.get('chain_hello', 0)} greetings) in {r['ledger_seconds']:.2f} s of its handlers and sent "
              f"{sum(sent.values())} messages: {sent.get('events to parties', 0)} chain events to the job's "
              f"parties, {sent.get('progress', 0)} to the progress exchange, {sent.get('answers', 0)} answers")


if __name__ == "__main__":
    main()
