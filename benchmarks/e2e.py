"""End to end: the diabetes job over RabbitMQ with separate processes, against its crypto floor.

One sitting, on this machine: the whole job (5 owners, 1 validator, 100
rounds, an evaluation every 10, leave-one-out contributions, settlement on the
embedded chain, 2048-bit keys) through ``deltaml demo --bus amqp``, run
``--repeat`` times (3); the crypto floor of the job's Paillier work
(``crypto_floor.measure``) timed before the first run and after each, so that
each run is compared with the floors just before and after it (the machine's
speed drifts within minutes) and the ratio counts by the median run; the
job's other figures by the run of median wall time; the same
training in plain numpy, and two reference runs of the 2019 original's algorithm,
timed for a few rounds and scaled to the job's rounds: as the issue describes
it (``original.run``: training and the buyer's refresh, one core) and as its
services ran it (``original.run_as_it_ran``: also its evaluation of the model
and of every leave-one-out model every two rounds, the trainers on both cores).
Also the same job with encryption switched off (``marketplace.run_plain``:
the same processes, rounds, leave-one-out models and signed messages over
RabbitMQ, plain numpy inside), which is what the agents, the broker and the
serialisation cost by themselves. Each lever the issue names, timed with it
and without it (``levers.measure``: the operation it changes, times how often
the job does it). Prints the tables and writes ``benchmarks/results.json``.
``--levers`` also runs the job without the idle-time obfuscators
(``DELTAML_PRECOMPUTE=false``), to measure that lever on the whole job.

Phases come from each agent's own account of the seconds it spent handling
each message type (``busy_seconds`` in the report). Trainers work in parallel,
so the slowest trainer's products are on the path; evaluations overlap
training except the last, and every process shares two cores, so the phases
add up to more than the wall. What the job left undone is measured instead:
the wall time minus every process's CPU seconds, the broker's included, spread
over the cores (start-up and waiting with a core idle). Messaging is measured
three ways: as the CPU seconds the daemons spent outside their handlers, helper
threads and workers (receiving, decoding, signature checks, signing, publishing,
the event loop); as the CPU seconds of the RabbitMQ node, when it runs on this
machine (it shares the job's two cores); and by the plain-numpy run through the
same bus.

    python benchmarks/e2e.py [--rounds 100] [--repeat 3] [--original-rounds 10] [--levers] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crypto_floor  # noqa: E402
import levers as lever_table  # noqa: E402
import original  # noqa: E402

from deltaml.agents.runtime import configure_logging  # noqa: E402
from deltaml.marketplace import DemoConfig, baselines, prepare_parts, run_demo, run_plain  # noqa: E402


CORES = os.cpu_count() or 1
IDLE = f"wall time the {CORES} cores were not working (wall - all CPU seconds / {CORES})"
BROKER = "messaging: CPU seconds of the broker (RabbitMQ on this machine)"


#: The floor's other readings, each a dict with its own ``floor_seconds``.
VARIANTS = ("fastest", "without_tables")


def mean_floor(floors, variant: str | None = None) -> float:
    """The mean floor of several timings, or of one of their ``VARIANTS``."""
    return statistics.mean((f[variant] if variant else f)["floor_seconds"] for f in floors)


def bracketed(wall: float, before: dict, after: dict) -> dict:
    """One run against the floors timed just before and just after it (their mean)."""
    floor = mean_floor((before, after))
    return {"wall_seconds": wall, "floor_seconds": floor, "ratio": wall / floor,
            "ratio_to_fastest": wall / mean_floor((before, after), "fastest"),
            "ratio_without_tables": wall / mean_floor((before, after), "without_tables")}


def phases(busy: dict[str, dict[str, float]]) -> dict[str, float]:
    """Seconds on the job's path, by phase, from the agents' own timings."""
    def of(agent: str, *types: str) -> float:
        return sum(busy.get(agent, {}).get(t, 0.0) for t in types)

    trainers = [a for a in busy if a.startswith("owner-") and busy[a].get("gradient_request")]
    validators = [a for a in busy if a.startswith("owner-") and busy[a].get("eval_request")]
    return {
        "trainer products (slowest trainer)": max(of(t, "gradient_request") for t in trainers),
        "aggregator updates and masks": of("aggregator-aggregator", "gradient_reply", "refresh_reply", "eval_reply",
                                           "metric_reply", "role_accepted", "join_request", "job_request"),
        "buyer refresh": of("buyer-buyer", "refresh_request"),
        "evaluation (validators + buyer; all but the last overlap training)": sum(of(v, "eval_request", "product_reply") for v in validators)
        + of("buyer-buyer", "product_request", "metric_request", "job_result"),
        "chain (ledger)": of("ledger-ledger", "tx_request", "chain_hello"),
        "chain (parties' events and receipts)": sum(of(a, "chain_event", "tx_receipt", "chain_info")
                                                    for a in busy if not a.startswith("ledger")),
        MESSAGING: messaging_cpu(busy),
    }


MESSAGING = "messaging: CPU seconds of the daemons outside handlers (all daemons)"


def messaging_cpu(busy: dict[str, dict[str, float]]) -> float:
    """What the daemons' processes did besides their handlers, helpers and workers: receiving,
    decoding and checking signatures, signing and publishing, the event loop (CPU seconds, summed
    over the daemons: they run side by side, so this is no stretch of the wall)."""
    parts = ("cpu seconds (handlers)", "cpu seconds (obfuscator helper)", "cpu seconds (workers)")
    return sum(b["cpu seconds (process)"] - sum(b[k] for k in parts)
               for b in busy.values() if all(k in b for k in parts))


def work_in_the_job(busy: dict[str, dict[str, float]], floor_by_party: dict[str, float]) -> dict[str, dict]:
    """Each trainer's and the validator's Paillier work as the job did it (CPU seconds of the
    handler thread and of the idle-time helper) against the floor's figure for that party: the
    ratio is what two busy cores and the job's processes cost the same work."""
    out = {}
    for agent, b in sorted(busy.items()):
        role = "trainer" if b.get("gradient_request") else "validator" if b.get("eval_request") else None
        if role is None or "cpu seconds (handlers)" not in b:
            continue
        job = b["cpu seconds (handlers)"] + b["cpu seconds (obfuscator helper)"]
        out[agent] = {"party": role, "job_cpu_seconds": job, "floor_seconds": floor_by_party[role],
                      "ratio": job / floor_by_party[role], "process_cpu_seconds": b["cpu seconds (process)"]}
    return out


def peak_memory(busy: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each daemon's resident memory in MB, as it reported it: its process's peak, which counts the
    pages it shares with this process it was forked from, and what it held alone at the end; the
    largest of its workers' peaks (the aggregator's). The buyer, the ledger and the chain share this
    process."""
    keys = {"process": "peak memory MB (process)", "private at the end": "private memory MB at the end (process)",
            "largest worker": "peak memory MB (largest worker)"}
    return {a: {k: b[key] for k, key in keys.items() if b.get(key)} for a, b in sorted(busy.items()) if keys["process"] in b}


def cpu_seconds(busy: dict[str, dict[str, float]], before: os.times_result) -> dict[str, float]:
    """CPU seconds each daemon reported (with its workers'), and this process's during the job."""
    out = {a: b["cpu seconds (process)"] for a, b in busy.items() if "cpu seconds (process)" in b}
    here = os.times()
    # the daemons are this process's children too (forked from it): their seconds, which each
    # reported with its workers', are in children_* once they are reaped, so they are taken out
    out["this process (buyer with its workers, ledger, embedded chain)"] = (
        here.user + here.system + here.children_user + here.children_system
        - before.user - before.system - before.children_user - before.children_system) - sum(out.values())
    out["total"] = sum(out.values())
    return out


def broker_cpu() -> float | None:
    """CPU seconds the local RabbitMQ node (its Erlang VM) has used so far; None if none runs here.
    The broker shares the job's cores, so what it does is neither the agents' work nor idle time."""
    ticks = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmdline = (stat.parent / "cmdline").read_bytes()
            if b"beam" not in cmdline or b"rabbit" not in cmdline:
                continue
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:  # gone meanwhile, or not ours to read
            continue
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--original-rounds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the job; the one of median wall time counts")
    ap.add_argument("--levers", action="store_true", help="also run without idle-time obfuscators")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results.json"))
    args = ap.parse_args()
    configure_logging("console", "warning")

    floor_args = SimpleNamespace(rounds=args.rounds, eval_every=10, key_bits=2048, json=None)
    print("== crypto floor, before run 1 ==")
    floors = [crypto_floor.measure(floor_args)]

    config = DemoConfig(rounds=args.rounds, eval_every=10)
    runs = []
    for i in range(args.repeat):
        print(f"\n== the job over RabbitMQ, separate processes, embedded chain ({i + 1} of {args.repeat}) ==")
        before, broker = os.times(), broker_cpu()
        report = run_demo(config, "amqp", on_progress=lambda r, mse, t: print(f"round {r:>4} {mse:10.2f} {t:7.1f}s"))
        cpu = cpu_seconds(report["busy_seconds"], before)
        if broker is not None:
            cpu["broker"] = broker_cpu() - broker
        runs.append((report, cpu))
        print(f"\n== crypto floor, after run {i + 1} ==")
        floors.append(crypto_floor.measure(floor_args))
    # this machine's speed drifts within minutes: each run is compared with the floors timed just before
    # and just after it, and the ratio counts by the median run; the job's figures by its median run
    per_run = [bracketed(r["wall_seconds"], floors[i], floors[i + 1]) for i, (r, _) in enumerate(runs)]
    runs.sort(key=lambda run: run[0]["wall_seconds"])
    report, cpu = runs[len(runs) // 2]
    walls = [r["wall_seconds"] for r, _ in runs]
    wall = report["wall_seconds"]
    path = phases(report["busy_seconds"])
    # the agents' busy seconds include time spent preempted by the other processes on these two cores,
    # so the wall minus their sum is no residual; what the cores did not do is: the wall minus every
    # process's CPU seconds spread over the cores
    if "broker" in cpu:
        path[BROKER] = cpu["broker"]
    path[IDLE] = wall - (cpu["total"] + cpu.get("broker", 0.0)) / CORES
    floor = {**floors[0], **{k: statistics.mean(f[k] for f in floors)
                            for k in ("floor_seconds", "total_seconds", "critical_path_seconds")},
             **{v: {"floor_seconds": mean_floor(floors, v)} for v in VARIANTS},
             "by_party_seconds": {p: statistics.mean(f["by_party_seconds"][p] for f in floors)
                                  for p in floors[0]["by_party_seconds"]},
             "sittings": [{k: f[k] for k in ("floor_seconds", "total_seconds", "critical_path_seconds", *VARIANTS)}
                          for f in floors]}
    data, parts = prepare_parts(config)
    started = time.perf_counter()
    baselines(parts, config)
    numpy_seconds = time.perf_counter() - started

    print("\n== the same job with encryption switched off, same processes and bus ==")
    plain = run_plain(config)
    print(f"plain job: {plain['job_seconds']:.2f} s for the rounds, {plain['wall_seconds']:.2f} s with start-up; "
          f"final MSE {plain['final_mse']:.4f}")

    print("\n== each lever, with and without it ==")
    levers = {"operations": lever_table.measure(floor_args)}
    if args.levers:
        print("\n== lever: the job without idle-time obfuscators ==")
        os.environ["DELTAML_PRECOMPUTE"] = "false"
        try:
            off = run_demo(config, "amqp")
        finally:
            os.environ.pop("DELTAML_PRECOMPUTE")
        levers["without idle-time obfuscators"] = {"wall_seconds": off["wall_seconds"],
                                                   "phases_seconds": phases(off["busy_seconds"])}
        print(f"without idle-time obfuscators: {off['wall_seconds']:.2f} s (with: {wall:.2f} s)")

    print(f"\n== the original's algorithm, {args.original_rounds} rounds ==")
    ref = original.run(args.original_rounds)
    ref_scaled = ref["seconds_per_round"] * args.rounds
    ran = original.run_as_it_ran(args.original_rounds)
    ran_scaled = ran["seconds_per_round"] * args.rounds

    rows = [
        (f"end-to-end wall time (median of {len(walls)} runs: {', '.join(f'{w:.1f}' for w in walls)})", wall),
        *((f"  {k}", v) for k, v in path.items()),
        ("crypto floor, same work, this machine (median of 5 timings each)", floor["floor_seconds"]),
        *(("  timed before run 1" if i == 0 else f"  timed after run {i}", f["floor_seconds"])
          for i, f in enumerate(floors)),
        ("  the same from the fastest of the 5 (the machine at its best)", floor["fastest"]["floor_seconds"]),
        ("  the same without the obfuscator tables (one per party, built once)",
         floor["without_tables"]["floor_seconds"]),
        ("  all Paillier work in one process", floor["total_seconds"]),
        ("  critical path with trainers in parallel", floor["critical_path_seconds"]),
        ("CPU seconds of every process (all cores)", cpu["total"]),
        ("plain numpy through the same bus and processes, encryption off", plain["wall_seconds"]),
        ("  of which the rounds (job request to result)", plain["job_seconds"]),
        ("plain numpy, same training and leave-one-out models (in process)", numpy_seconds),
        (f"original's algorithm, {args.original_rounds} rounds scaled to {args.rounds}", ref_scaled),
        (f"  as its services ran it: also its evaluations, trainers on {ran['trainer_workers']} cores", ran_scaled),
        *((f"    {party}", seconds * args.rounds / args.original_rounds)
          for party, seconds in ran["by_party_seconds"].items()),
    ]
    work = work_in_the_job(report["busy_seconds"], floor["by_party_seconds"])
    print(f"\n{'Paillier work of one owner: CPU seconds in the job (handler + helper) against the floor':<78}")
    for agent, w in work.items():
        print(f"  {agent + ' (' + w['party'] + ')':<40}{w['job_cpu_seconds']:>8.2f} s in the job, "
              f"{w['floor_seconds']:>6.2f} s in the floor: {w['ratio']:.2f}x  (process: {w['process_cpu_seconds']:.2f} s)")
    memory = peak_memory(report["busy_seconds"])
    print("\nresident memory of each daemon, MB: its peak (with the pages it shares with this process, which "
          "forked it) and its own at the end (the buyer, the ledger and the chain run in this process)")
    for agent, mb in memory.items():
        print(f"  {agent:<40}" + ", ".join(f"{v:.0f} ({k})" for k, v in mb.items()))
    print(f"\n{'':<78}{'seconds':>10}")
    for name, value in rows:
        print(f"{name:<78}{value:>10.2f}" if value >= 0.1 else f"{name:<78}{value:>10.4f}")
    ratio_floor = statistics.median(r["ratio"] for r in per_run)
    ratio_fastest = statistics.median(r["ratio_to_fastest"] for r in per_run)
    ratio_untabled = statistics.median(r["ratio_without_tables"] for r in per_run)
    speedup = ref_scaled / wall
    ceiling = ref_scaled / floor["floor_seconds"]
    print("\neach run against the floors timed just before and after it:")
    for i, r in enumerate(per_run, start=1):
        print(f"  run {i}: {r['wall_seconds']:.2f} s / {r['floor_seconds']:.2f} s = {r['ratio']:.2f}x "
              f"(without the tables in the floor {r['ratio_without_tables']:.2f}x)")
    print(f"end-to-end / crypto floor, median run: {ratio_floor:.2f}x (against the fastest timings "
          f"{ratio_fastest:.2f}x, without the tables {ratio_untabled:.2f}x)   original / end-to-end: {speedup:.1f}x")
    print(f"original / crypto floor: {ceiling:.1f}x (what the end-to-end could reach with nothing but the floor)")
    print(f"the original as it ran: / end-to-end {ran_scaled / wall:.1f}x, / crypto floor "
          f"{ran_scaled / floor['floor_seconds']:.1f}x")
    print(f"final MSE {report['final_mse']:.4f} (centralised GD {report['centralized_gd_mse']:.4f})")
    results = {
        "rounds": args.rounds, "wall_seconds": wall, "wall_seconds_of_each_run": walls, "phases_seconds": path,
        "floor": floor,
        "numpy_seconds": numpy_seconds, "plain_bus": plain, "cpu_seconds": cpu, "levers": levers,
        "original": {**ref, "scaled_seconds": ref_scaled},
        "original_as_it_ran": {**ran, "scaled_seconds": ran_scaled,
                               "speedup": ran_scaled / wall, "ceiling": ran_scaled / floor["floor_seconds"]},
        "ratio_to_floor": ratio_floor, "ratio_to_fastest_floor": ratio_fastest,
        "ratio_to_floor_without_tables": ratio_untabled, "speedup_over_original": speedup,
        "speedup_ceiling_at_the_floor": ceiling,
        "runs_against_their_floors": per_run,
        "final_mse": report["final_mse"],
        "centralized_gd_mse": report["centralized_gd_mse"], "gas": report["chain"]["gas"],
        "busy_seconds": report["busy_seconds"], "owners_work_in_the_job": work, "peak_memory_mb": memory,
    }
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
