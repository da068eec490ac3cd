"""The daemons' commands (``aggregator``, ``ledger``, ``owner``), the demo and the tools."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from pathlib import Path

from ..protocol.paillier import check_key_bits
from .common import (CliError, _check_names, _check_tick, _check_writable, _pinned, _print_earnings, _progress,
                     _wallet, _workers, _write_report)


def cmd_demo(args) -> int:
    from ..marketplace import DemoConfig, check_config

    check_key_bits(args.key_bits)
    _check_writable(report=args.report)
    config = DemoConfig(owners=args.owners, validators=args.validators, rounds=args.rounds, lr=args.lr,
                        eval_every=args.eval_every, key_bits=args.key_bits, dataset=args.dataset,
                        poison_owner=args.poison_owner, chain=args.chain, round_timeout=args.round_timeout,
                        quorum=args.quorum)
    check_config(config)  # a mistyped flag is told before the agents, the broker client and the chain load
    from ..agents.runtime import configure_logging
    from ..marketplace import run_demo

    configure_logging("console", "warning")
    try:
        report = run_demo(config, args.bus, _progress, amqp_url=args.amqp_url)
    except KeyboardInterrupt:
        from ..agents.ledger.node import shown

        kept = ("" if args.chain == "embedded" else
                f"; its throw-away buyer key leaves the deposit in the escrow on {shown(args.chain)}")
        print(f"deltaml: interrupted: the demo's job is dropped and its daemons are stopped; nothing is "
              f"kept{kept}", file=sys.stderr)
        raise
    rel = abs(report["final_mse"] - report["centralized_gd_mse"]) / report["centralized_gd_mse"]
    print(f"final MSE {report['final_mse']:.4f}  centralised GD {report['centralized_gd_mse']:.4f} "
          f"(relative difference {rel:.1e})  least squares {report['closed_form_mse']:.4f}")
    _print_earnings(report)
    print(f"wall time {report['wall_seconds']:.1f}s over the {args.bus} bus")
    _write_report(report, args.report)
    return 0


def _private_mb() -> float:
    """The resident memory this process shares with no other (``/proc/self/smaps_rollup``), in MB;
    0.0 where the kernel does not say."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0
    return sum(int(line.split()[1]) for line in lines if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def _write_timings(role: str, name: str, core, agent) -> None:
    """For benchmarks/e2e.py (``DELTAML_TIMINGS_DIR``): the seconds of work per message type, the CPU
    and the peak memory."""
    timings = os.environ.get("DELTAML_TIMINGS_DIR")
    if not timings:
        return
    streams = getattr(core.ctx.rng, "streams", {}).values()
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    counts = {"cpu seconds (process)": sum(u.ru_utime + u.ru_stime for u in (own, children)),  # with its workers
              "cpu seconds (workers)": children.ru_utime + children.ru_stime,
              "cpu seconds (handlers)": agent.policy.cpu,
              "cpu seconds (obfuscator helper)": agent.precomputer.cpu if agent.precomputer else 0.0,
              # resident memory in MB (Linux counts ru_maxrss in kB): the obfuscator table, the data; a
              # forked daemon's peak counts the pages it still shares with its parent, its private part not
              "peak memory MB (process)": own.ru_maxrss / 1024,
              "private memory MB at the end (process)": _private_mb(),
              "peak memory MB (largest worker)": children.ru_maxrss / 1024,
              "obfuscators taken": sum(st.taken for st in streams),
              "obfuscators computed ahead": agent.precomputer.computed if agent.precomputer else 0,
              "obfuscators found precomputed": sum(st.served_ahead for st in streams)}
    (Path(timings) / f"{role}-{name}.json").write_text(json.dumps({**agent.policy.busy, **counts}))


def _serve(role: str, name: str, core, args, header: dict, key: bytes | None = None, workers=None) -> int:
    from ..agents.agent import Agent, Trace
    from ..agents.amqp import AmqpBus
    from ..agents.checkpoint import Checkpoint, CheckpointError
    from ..agents.runtime import configure_logging, until_signalled

    configure_logging(args.log_format, args.log_level)
    pinned = _pinned(args)
    import structlog

    async def main() -> None:
        # local files first: a path that cannot be opened fails before any broker connection
        trace = Trace(args.trace, {"role": role, "name": name, "seed": core.ctx.rng.seed_bytes.hex(), **header}) \
            if args.trace else None
        state_dir = getattr(args, "state_dir", None)
        checkpoint = Checkpoint(state_dir) if state_dir else None
        bus = None
        try:
            bus = await AmqpBus(args.amqp_url).connect()
            agent = Agent(role, name, core, bus, trace, key=key, pinned=pinned, checkpoint=checkpoint,
                          tick_seconds=getattr(args, "tick_seconds", 1.0), precompute=args.precompute)
            if agent.resumed:
                structlog.get_logger().info("resumed from checkpoint", jobs=len(core.jobs), state_dir=str(state_dir))
            await agent.start()
            structlog.get_logger().info("signing as", address=agent.address)
            wallet = getattr(core, "wallet", None)
            if wallet is not None:  # the ledger must know this party before any event concerns it
                await agent.send_all(wallet.greet(core.ctx))
            structlog.get_logger().info("agent started", role=role, name=name)
            signalled = asyncio.ensure_future(until_signalled())
            halted = asyncio.ensure_future(agent.policy.halted.wait())
            await asyncio.wait({signalled, halted}, return_when=asyncio.FIRST_COMPLETED)
            for waiting in (signalled, halted):
                waiting.cancel()
            structlog.get_logger().info("agent stopping", role=role, name=name)
            await agent.stop()
        finally:
            if bus is not None:
                await bus.close()
            if workers is not None:
                workers.close()
            if trace:
                trace.close()
            if checkpoint:
                checkpoint.close()
        _write_timings(role, name, core, agent)  # after the workers ended: their CPU counts then
        if agent.policy.halted_by is not None:
            raise CheckpointError(f"{agent.policy.halted_by}: the {role} stopped without acknowledging the message "
                                  "under way; start it again once the state can be written, and it goes on from "
                                  "its last saved step")

    asyncio.run(main())
    return 0


def cmd_aggregator(args) -> int:
    from ..agents.parties import aggregator_core

    _check_tick(args)
    _check_names(name=args.name)
    core = aggregator_core(args.name, wallet=_wallet(args, "aggregator"))
    return _serve("aggregator", args.name, core, args, {}, workers=_workers(args, core))


def cmd_ledger(args) -> int:
    from ..agents.ledger import Chain, ChainUnavailable, LedgerCore
    from ..agents.ledger.node import shown
    from ..agents.parties import context
    from ..protocol.chain import LEDGER

    contract = args.contract
    if args.state_dir is not None:
        contract = _saved_contract(args)
    key = _wallet(args, "ledger")
    if args.key is None and args.state_dir is None and args.contract is not None:
        print("deltaml: note: no --key: this ledger signs with a key of its own for this run; the parties of "
              "jobs an earlier ledger relayed on this escrow know that one's address and refuse this one's "
              "word (give the earlier --key to go on with them)", file=sys.stderr)
    _refuse_a_second_ledger(args.amqp_url)
    try:
        chain = Chain(args.chain, contract=contract)
    except ChainUnavailable as exc:
        raise CliError(str(exc)) from None
    where = "embedded: this process's own chain, gone when it stops" if args.chain == "embedded" else shown(args.chain)
    print(f"ledger: escrow contract {chain.address} on chain {chain.chain_id} ({where})", file=sys.stderr)
    return _serve("ledger", LEDGER, LedgerCore(context(LEDGER), chain), args, {"chain": args.chain},
                  key=key.private_key)


def _refuse_a_second_ledger(amqp_url: str) -> None:
    """Before deploying an escrow: the broker answers and no ledger is running on it. A second
    ledger was refused only at its exclusive consume, after deploying an escrow nobody would use
    (on a real chain, gas spent and a contract orphaned), and so was a ledger whose broker was down."""
    from ..agents.amqp import AmqpBus
    from ..agents.bus import QueueBusy
    from ..agents.topology import queue_name
    from ..protocol.chain import LEDGER

    async def running() -> bool:
        bus = await AmqpBus(amqp_url).connect()
        try:
            return bool(await bus.consumers("ledger", LEDGER, refused=0))  # may not look: the consume decides
        finally:
            await bus.close()

    if asyncio.run(running()):
        raise QueueBusy(queue_name("ledger", LEDGER), "ledger", LEDGER)


def _saved_contract(args) -> str | None:
    """The escrow a ledger's state directory belongs to (None for a new one): a restarted ledger
    goes on with it rather than deploying another, which would orphan every job of the first."""
    from ..agents.checkpoint import Checkpoint
    from ..agents.ledger import saved_contract

    if args.chain == "embedded":
        raise CliError("--state-dir needs --chain URL: the embedded chain lives in the ledger's process and "
                       "ends with it, so there would be nothing to resume on")
    checkpoint = Checkpoint(args.state_dir)
    try:
        saved = checkpoint.core()
    finally:
        checkpoint.close()
    if saved is None:
        return args.contract
    contract = saved_contract(saved)
    if args.contract is not None and args.contract.lower() != contract.lower():
        raise CliError(f"--contract {args.contract}: the state in {args.state_dir} is of escrow {contract}")
    return contract


def cmd_owner(args) -> int:
    from ..agents.parties import owner_core

    _check_tick(args)
    name = args.name if args.name is not None else Path(args.data).stem
    _check_names(**{"name" if args.name is not None else "name (by default the data file's)": name})
    core = owner_core(name, str(args.data), args.auto_accept, wallet=_wallet(args, "owner"))
    if not args.auto_accept:
        print(f"owner {name}: without --auto-accept, job offers are logged and not joined", file=sys.stderr)
    header = {"data": str(Path(args.data).resolve()), "auto_accept": args.auto_accept}
    return _serve("owner", name, core, args, header)


def cmd_dataset_split(args) -> int:
    from ..data import demo_split, load, write_csv

    parts = demo_split(load(args.source), args.parts)
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out}: not a directory (it names the directory for the parts)")
    args.out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts, start=1):
        path = args.out / f"owner-{i}.csv"
        write_csv(part, path)
        print(f"{path}: {len(part.y)} rows")
    return 0


def cmd_replay(args) -> int:
    from ..agents.replay import TraceError, replay

    try:
        count, diffs = replay(args.file)
    except TraceError as exc:
        raise CliError(str(exc)) from None
    for d in diffs:
        print(d)
    print(f"{count} inputs replayed, {len(diffs)} differences")
    return 1 if diffs else 0
