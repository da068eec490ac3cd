"""The ``deltaml`` command line (DESIGN §5): daemons, the buyer, the demo, tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import sys
import time
import uuid
from pathlib import Path

from .data import DataError
from .protocol.errors import KeyTooShort, ProtocolError
from .protocol.paillier import check_key_bits
from .settings import LOG_LEVELS, ConfigError, Settings


class CliError(Exception):
    """A one-line error for the user."""


def _check_names(**names: str) -> None:
    """Party names the bus can route to one queue alone: one word of a routing key, and none of the
    names the bus keeps for itself (the owners' fan-out, the progress feed, the ledger). A name
    such as ``#`` bound its queue to everyone's messages; ``owners``, to every job offer twice."""
    from .agents.topology import BROADCAST_OWNERS, PROGRESS
    from .protocol.chain import LEDGER
    from .protocol.messages import NAME_PATTERN

    for flag, name in names.items():
        if not re.fullmatch(NAME_PATTERN, name):
            raise CliError(f"--{flag} {name!r}: a party's name is 1 to 128 letters, digits, '-' or '_', "
                           f"beginning with a letter or digit")
        if name in (BROADCAST_OWNERS, PROGRESS, LEDGER):
            raise CliError(f"--{flag} {name!r}: the bus keeps that name for itself; choose another")


def _common(p: argparse.ArgumentParser, settings: Settings, daemon: bool = True) -> None:
    p.add_argument("--amqp-url", default=settings.amqp_url, help="the RabbitMQ broker (DELTAML_AMQP_URL)")
    p.add_argument("--log-format", choices=["console", "json"], default=settings.log_format,
                   help="log lines for a person or one JSON object per line")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=settings.log_level,
                   help="the least severe lines logged")
    p.add_argument("--trust", action="append", default=[], metavar="NAME=ADDRESS",
                   help="only ADDRESS may sign as party NAME (e.g. aggregator=0x..., ledger=0x...); repeatable")
    if not daemon:
        return
    p.add_argument("--trace", type=Path, default=None, help="append every message in and out (JSON lines)")
    p.add_argument("--precompute", action=argparse.BooleanOptionalAction, default=settings.precompute,
                   help="compute Paillier obfuscators ahead while idle, on a low-priority thread")


def _pinned(args) -> dict[str, str]:
    from eth_utils import is_address, to_checksum_address

    pinned = {}
    for item in args.trust:
        name, _, address = item.partition("=")
        if not name or not is_address(address):
            raise CliError(f"--trust {item!r}: expected NAME=0x followed by 40 hex digits")
        pinned[name] = to_checksum_address(address)
    return pinned


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="checkpoint every step here (SQLite) and resume from it after a crash")
    p.add_argument("--tick-seconds", type=float, default=1.0, help="how often deadlines are checked, in seconds")


def _check_tick(args) -> None:
    """Before anything is loaded: a tick of 0 would spin a core checking deadlines."""
    if not (math.isfinite(args.tick_seconds) and args.tick_seconds > 0):
        raise CliError(f"--tick-seconds {args.tick_seconds}: must be a positive number of seconds")


def _workers_option(p: argparse.ArgumentParser, settings: Settings, work: str) -> None:
    p.add_argument("--workers", type=int, default=settings.workers,
                   help=f"processes for {work} (0: one per core; 1: this process only)")


def _key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", type=Path, default=None,
                   help="this party's Ethereum key file, created with mode 0600 if missing")


def _progress(round_: int, mse: float, elapsed: float) -> None:
    print(f"round {round_:>5}  validation MSE {mse:12.4f}  elapsed {elapsed:8.1f}s", flush=True)


def _print_earnings(report: dict) -> None:
    names = {a: n for n, a in report.get("participants", {}).items()}
    print(f"{'owner':<10}{'address':<44}{'contribution':>14}{'paid (wei)':>22}")
    for address, paid in report["payments_wei"].items():
        c = report["contributions"].get(address)
        print(f"{names.get(address, ''):<10}{address:<44}{'validator' if c is None else f'{c:.4f}':>14}{paid:>22}")
    for name in report.get("dropped", []):  # silent in training: left out, paid nothing
        print(f"{name:<10}{report.get('participants', {}).get(name, ''):<44}{'dropped':>14}{0:>22}")
    print(f"refund to buyer {report['refund_wei']} wei of a {report['deposit_wei']} wei deposit "
          f"(paid + refund = {sum(report['payments_wei'].values()) + report['refund_wei']})")


def _check_writable(**paths: Path | None) -> None:
    """Refuse an output file that cannot be written before the job starts: a job's money moves and its
    model arrives only once, and a report or model lost to a typo in a path is not given back."""
    for flag, path in paths.items():
        if path is None:
            continue
        where = path.parent if str(path.parent) else Path(".")
        name = "--" + flag.replace("_", "-")
        if path.is_dir():
            raise CliError(f"{name} {path}: is a directory")
        if not where.is_dir():
            raise CliError(f"{name} {path}: no directory {where}")
        if not os.access(where, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CliError(f"{name} {path}: not writable")


def _spec_error(exc) -> str:
    """The first of a job spec's validation errors, named by its flag: ``--rounds: must be ...``."""
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message
    field = str(error["loc"][0])
    value = error.get("input")
    return f"--{field.replace('_', '-')} {value}: {message[0].lower()}{message[1:]}"


def _write_report(report: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {path}")


def cmd_demo(args) -> int:
    from .agents.runtime import configure_logging
    from .marketplace import DemoConfig, run_demo

    configure_logging("console", "warning")
    check_key_bits(args.key_bits)
    _check_writable(report=args.report)
    config = DemoConfig(owners=args.owners, validators=args.validators, rounds=args.rounds, lr=args.lr,
                        eval_every=args.eval_every, key_bits=args.key_bits, dataset=args.dataset,
                        poison_owner=args.poison_owner, chain=args.chain, round_timeout=args.round_timeout,
                        quorum=args.quorum)
    try:
        report = run_demo(config, args.bus, _progress, amqp_url=args.amqp_url)
    except KeyboardInterrupt:
        kept = ("" if args.chain == "embedded" else
                f"; its throw-away buyer key leaves the deposit in the escrow on {args.chain}")
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


def _write_timings(role: str, name: str, core, agent) -> None:
    """For benchmarks/e2e.py (``DELTAML_TIMINGS_DIR``): the seconds of work per message type and the CPU."""
    timings = os.environ.get("DELTAML_TIMINGS_DIR")
    if not timings:
        return
    streams = getattr(core.ctx.rng, "streams", {}).values()
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    counts = {"cpu seconds (process)": sum(u.ru_utime + u.ru_stime for u in (own, children)),  # with its workers
              "cpu seconds (workers)": children.ru_utime + children.ru_stime,
              "cpu seconds (handlers)": agent.policy.cpu,
              "cpu seconds (obfuscator helper)": agent.precomputer.cpu if agent.precomputer else 0.0,
              "obfuscators taken": sum(st.taken for st in streams),
              "obfuscators computed ahead": agent.precomputer.computed if agent.precomputer else 0,
              "obfuscators found precomputed": sum(st.served_ahead for st in streams)}
    (Path(timings) / f"{role}-{name}.json").write_text(json.dumps({**agent.policy.busy, **counts}))


def _serve(role: str, name: str, core, args, header: dict, key: bytes | None = None, workers=None) -> int:
    from .agents.agent import Agent, Trace
    from .agents.amqp import AmqpBus
    from .agents.checkpoint import Checkpoint
    from .agents.runtime import configure_logging, until_signalled

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
            await until_signalled()
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

    asyncio.run(main())
    return 0


def _wallet(args):
    from .agents.parties import load_wallet

    try:
        return load_wallet(args.key)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_aggregator(args) -> int:
    from .agents.parties import aggregator_core

    _check_tick(args)
    _check_names(name=args.name)
    core = aggregator_core(args.name, wallet=_wallet(args))
    return _serve("aggregator", args.name, core, args, {}, workers=_workers(args, core))


def _workers(args, core, pub=None):
    """The party's worker pool for its per-model work, made before any thread starts (workers.py)."""
    from .agents.workers import workers_for

    if args.workers < 0:
        raise CliError(f"--workers {args.workers}: expected 0 (one per core) or more")
    workers = workers_for(args.workers, pub)
    if workers is not None:
        core.ctx.map = workers.map
    return workers


def cmd_ledger(args) -> int:
    from .agents.ledger import Chain, ChainUnavailable, LedgerCore
    from .agents.parties import context
    from .protocol.chain import LEDGER

    contract = args.contract
    if args.state_dir is not None:
        contract = _saved_contract(args)
    _refuse_a_second_ledger(args.amqp_url)
    try:
        chain = Chain(args.chain, contract=contract)
    except ChainUnavailable as exc:
        raise CliError(str(exc)) from None
    where = "embedded: this process's own chain, gone when it stops" if args.chain == "embedded" else args.chain
    print(f"ledger: escrow contract {chain.address} on chain {chain.chain_id} ({where})", file=sys.stderr)
    return _serve("ledger", LEDGER, LedgerCore(context(LEDGER), chain), args, {"chain": args.chain},
                  key=_wallet(args).private_key)


def _refuse_a_second_ledger(amqp_url: str) -> None:
    """Before deploying an escrow: the broker answers and no ledger is running on it. A second
    ledger was refused only at its exclusive consume, after deploying an escrow nobody would use
    (on a real chain, gas spent and a contract orphaned), and so was a ledger whose broker was down."""
    from .agents.amqp import AmqpBus
    from .agents.bus import QueueBusy
    from .agents.topology import queue_name
    from .protocol.chain import LEDGER

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
    from .agents.checkpoint import Checkpoint
    from .agents.ledger import saved_contract

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
    from .agents.parties import owner_core

    _check_tick(args)
    name = args.name if args.name is not None else Path(args.data).stem
    _check_names(**{"name" if args.name is not None else "name (by default the data file's)": name})
    core = owner_core(name, str(args.data), args.auto_accept, wallet=_wallet(args))
    if not args.auto_accept:
        print(f"owner {name}: without --auto-accept, job offers are logged and not joined", file=sys.stderr)
    header = {"data": str(Path(args.data).resolve()), "auto_accept": args.auto_accept}
    return _serve("owner", name, core, args, header)


def cmd_buyer_train(args) -> int:
    from .agents.agent import Agent, Trace
    from .agents.amqp import AmqpBus
    from .agents.parties import buyer_core, new_key, save_key
    from pydantic import ValidationError

    from .agents.runtime import configure_logging, escrow_outcome, run_buyer_job
    from .protocol import messages as m
    from .protocol.buyer import BuyerPhase
    from .protocol.chain import LEDGER

    check_key_bits(args.key_bits)
    _check_names(name=args.name, aggregator=args.aggregator)
    _check_writable(report=args.report, model_out=args.model_out)
    if args.deadline_hours < 1:  # the contract refuses a deadline already past, after recruiting
        raise CliError(f"--deadline-hours {args.deadline_hours}: must be at least 1")
    if args.key is None:
        raise CliError("--key FILE is needed: the deposit is paid from that key and its refund comes back to it "
                       "(created with mode 0600 if missing); a throwaway key would leave with the process")
    configure_logging(args.log_format, args.log_level)
    key = new_key(args.key_bits)
    try:
        # names as an owner's CSV header gives them: "age, sex" asks for "sex", which an owner has
        spec = m.JobSpec(buyer=args.name, features=[f.strip() for f in args.features.split(",")],
                         target=args.target.strip(), owners=args.owners, validators=args.validators,
                         rounds=args.rounds, lr=args.lr, eval_every=args.eval_every, key_bits=args.key_bits,
                         public_key=key.public.to_hex(),
                         round_timeout=args.round_timeout, quorum=args.quorum, escrow=True,
                         deadline=int(time.time()) + args.deadline_hours * 3600,
                         fixed_reward_wei=args.fixed_reward_wei, variable_pool_wei=args.variable_pool_wei)
    except ValidationError as exc:  # the job's own limits, said with the flag that broke them
        raise CliError(_spec_error(exc)) from None
    core = buyer_core(args.name, key, wallet=_wallet(args))
    workers = _workers(args, core, key.public)

    async def main():
        bus = await AmqpBus(args.amqp_url).connect()
        trace = None
        if args.trace:
            key_path = args.trace.with_suffix(".key.json")
            save_key(key, key_path)
            trace = Trace(args.trace, {"role": "buyer", "name": args.name,
                                       "seed": core.ctx.rng.seed_bytes.hex(), "key": str(key_path.resolve())})
        agent = Agent("buyer", args.name, core, bus, trace, pinned=_pinned(args), precompute=args.precompute)
        await agent.start()
        watchers = []
        try:
            served.update(await _check_served(bus, [("aggregator", args.aggregator), ("ledger", LEDGER)]))
            watchers = _watch_job(agent, bus, served, job_id)
            return await run_buyer_job(agent, spec, aggregator=args.aggregator, on_progress=_progress, job_id=job_id)
        finally:
            for watcher in watchers:
                watcher.cancel()
            await bus.close()

    started = time.perf_counter()
    job_id = uuid.uuid4().hex
    served: dict[tuple[str, str], bool] = {}  # who consumes its queue, as last seen
    try:
        job = asyncio.run(main())
    except KeyboardInterrupt:
        job = core.jobs.get(job_id)
        if job is not None and job.model is not None:  # Ctrl-C while its escrow settled: the model is paid for
            _keep_result(job, job_id, args, time.perf_counter() - started)
        running = served.get(("aggregator", args.aggregator), True)
        print(f"deltaml: interrupted: {_left(job, job_id, args.key, running)}", file=sys.stderr)
        raise
    finally:
        if workers is not None:
            workers.close()
    if job.phase is not BuyerPhase.FINISHED:
        settle = (f": `deltaml buyer withdraw --key {args.key} --settle {job_id} --owners {spec.owners}` settles and "
                  f"withdraws it then" if job.escrow_open and job.deposit == "made" else "")
        raise CliError(f"job {job_id} failed: {job.reason}; {escrow_outcome(job)}{settle}")
    if job.escrow_open or job.withdraw_error:
        print(f"deltaml: note: {escrow_outcome(job)}", file=sys.stderr)
    _keep_result(job, job_id, args, time.perf_counter() - started)
    return 0


def _keep_result(job, job_id: str, args, wall: float) -> None:
    """Print what each owner was paid; write the report and the model where asked."""
    from .agents.runtime import buyer_report

    report = buyer_report(job, job_id, args.key_bits, wall)
    _print_earnings(report)
    _write_report(report, args.report)
    if args.model_out:
        args.model_out.write_text(json.dumps({"features": job.spec.features, "target": job.spec.target,
                                              "intercept": report["model"][0],
                                              "coefficients": report["model"][1:]}, indent=2) + "\n")


async def _check_served(bus, parties: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Refuse to start if one of these parties has no queue on this broker (what the buyer sent it
    would be dead-lettered and the buyer wait for ever); one line naming those no daemon serves
    now (what is sent waits in their queues, and the buyer would otherwise wait without a word).
    Which of them are served now, for :func:`_watch_served` to go on from."""
    from .agents.topology import queue_name

    counts = {(role, name): await bus.consumers(role, name) for role, name in parties}
    for (role, name), count in counts.items():
        if count is None:
            raise CliError(f"no {role} named {name!r} has run on this broker (no queue {queue_name(role, name)}: "
                           f"what is sent there would be dead-lettered); start `deltaml {role}` first"
                           + (" or name it with --aggregator" if role == "aggregator" else ""))
    absent = [f"{role} {name!r}" for (role, name), count in counts.items() if count == 0]
    if absent:
        print(f"deltaml: note: nothing serves {' or '.join(absent)} on this broker yet; what is sent there "
              f"waits in the queue until a daemon starts (Ctrl-C gives up)", file=sys.stderr)
    return {party: bool(count) for party, count in counts.items()}


def _watch_job(agent, bus, served: dict[tuple[str, str], bool], job_id: str) -> list[asyncio.Task]:
    """While the buyer's job runs: say when a party it waits on stops or comes back, and ask the
    aggregator whether the job goes on whenever its daemon is back, and once a minute besides (a
    restart quicker than a look); one that lost the job says so and the job fails at once."""
    from .agents.runtime import ask_aggregator

    async def back(role: str, name: str) -> None:
        if role == "aggregator":
            await ask_aggregator(agent, job_id)

    async def ask_now_and_then() -> None:
        while True:
            await asyncio.sleep(60)
            try:
                await ask_aggregator(agent, job_id)
            except Exception:  # the broker away: asked again in a minute
                pass

    return [asyncio.create_task(_watch_served(bus, served, on_back=back)), asyncio.create_task(ask_now_and_then())]


async def _watch_served(bus, served: dict[tuple[str, str], bool], every: float = 5.0, on_back=None) -> None:
    """While a job runs, one note line when a party it waits on stops consuming its queue (a daemon
    that died: the job would wait without a word) and one when it is back, then ``on_back(role,
    name)``. ``served`` is what was said at the start; a broker that does not answer is asked again
    at the next look."""
    while True:
        await asyncio.sleep(every)
        for (role, name), was in list(served.items()):
            try:
                now = bool(await bus.consumers(role, name))
            except Exception:  # a dropped connection: the robust one comes back, and so does the question
                continue
            if now == was:
                continue
            served[(role, name)] = now
            when = time.strftime("%H:%M:%S")
            print(f"deltaml: note: {role} {name!r} " + (
                f"is serving its queue again ({when}); a job it ran goes on if it kept its --state-dir" if now else
                f"stopped serving its queue ({when}); the job waits for it: "
                + ("one restarted with its --state-dir resumes it, " if role != "ledger" else "a restarted ledger "
                   "with its --state-dir goes on, ")
                + "Ctrl-C gives the job up"), file=sys.stderr)
            if now and on_back is not None:
                try:
                    await on_back(role, name)
                except Exception:  # asked again only at its next return; the job's own messages go on
                    pass


def _left(job, job_id: str, key: Path, aggregator_running: bool = True) -> str:
    """What became of a job its buyer left on Ctrl-C, and of its deposit."""
    from .agents.runtime import GAVE_UP, escrow_outcome
    from .protocol.buyer import BuyerPhase

    if job is None or job.deposit in ("", "refused"):
        return f"job {job_id} is given up before any deposit and costs nothing"
    withdraw = f"`deltaml buyer withdraw --key {key}` takes it back"
    if job.reason == GAVE_UP and not aggregator_running:
        deadline = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(job.spec.deadline))
        return (f"job {job_id} is given up; its aggregator is not running and hears it when it starts (one "
                f"restarted with its --state-dir then gives the escrow up); else the escrow may be settled after "
                f"its deadline, {deadline}: `deltaml buyer withdraw --key {key} --settle {job_id} --owners "
                f"{job.spec.owners}` then refunds the deposit to {job.buyer_address}")
    if job.reason == GAVE_UP:
        return (f"job {job_id} is given up and its aggregator told: it gives the escrow up and the "
                f"deposit is refunded to {job.buyer_address} (at the latest at the escrow's deadline); {withdraw}")
    if job.reason.startswith(GAVE_UP):
        return (f"job {job_id} is given up, but its aggregator was not told: the job fails when it next needs "
                f"its buyer (within {job.spec.round_timeout:g} s) and the deposit is then refunded to "
                f"{job.buyer_address}; {withdraw}")
    # a job with its model: _keep_result wrote what there was to keep
    ended = "finished (its model and report are kept)" if job.model is not None else f"failed ({job.reason})"
    return f"job {job_id} had {ended}; {escrow_outcome(job)}" + (
        f"; {withdraw}" if job.escrow_open or job.withdraw_error else "")


def cmd_buyer_withdraw(args) -> int:
    """Take back what the escrow credits this key: a refund left behind (a buyer that stopped before
    its job was settled), after settling the job first if the contract lets anyone do so now."""
    from .agents.agent import Agent
    from .agents.amqp import AmqpBus
    from .agents.parties import context
    from .agents.runtime import collect, configure_logging
    from .protocol.chain import LEDGER, Collector

    if (args.settle is None) != (args.owners is None):
        raise CliError("--settle JOB and --owners N go together (the settle's gas grows with the owners)")
    if args.key is None or not args.key.exists():
        raise CliError("--key FILE: the key the deposit was made with (a new key has nothing to withdraw)")
    configure_logging(args.log_format, args.log_level)
    _check_names(name=args.name)
    core = Collector(context(args.name, wallet=_wallet(args)))

    async def main():
        bus = await AmqpBus(args.amqp_url).connect()
        try:
            agent = Agent("buyer", args.name, core, bus, pinned=_pinned(args))
            await agent.start()
            await _check_served(bus, [("ledger", LEDGER)])
            return await collect(agent, args.settle, args.owners, wait=args.wait)
        finally:
            await bus.close()

    done = asyncio.run(main())
    address = core.wallet.address
    settle = done.receipts.get("settle")
    if settle is not None:
        print(f"job {args.settle}: " + ("settled" if settle.ok else f"not settled: {settle.reason}"))
    withdraw = done.receipts.get("withdraw")
    if withdraw is None:
        raise CliError(f"no answer from the ledger within {args.wait:g} s; is `deltaml ledger` running?")
    if withdraw.ok:
        print(f"withdrew {done.withdrawn_wei} wei to {address}")
        return 0
    if "NothingToWithdraw" in withdraw.reason:
        print(f"nothing is credited to {address}")
        return 0
    raise CliError(f"withdraw to {address} failed: {withdraw.reason}")


def cmd_dataset_split(args) -> int:
    from .data import demo_split, load, write_csv

    parts = demo_split(load(args.source), args.parts)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts, start=1):
        path = args.out / f"owner-{i}.csv"
        write_csv(part, path)
        print(f"{path}: {len(part.y)} rows")
    return 0


def cmd_replay(args) -> int:
    from .agents.replay import TraceError, replay

    try:
        count, diffs = replay(args.file)
    except TraceError as exc:
        raise CliError(str(exc)) from None
    for d in diffs:
        print(d)
    print(f"{count} inputs replayed, {len(diffs)} differences")
    return 1 if diffs else 0


class HELP(argparse.HelpFormatter):
    """Help that shows a flag's default when it has one worth saying (not None, False or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or action.required or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def _job_shape(p: argparse.ArgumentParser, owners, validators, rounds, lr, key_bits: int) -> None:
    """The flags that shape a job, shared by the demo and the buyer (a default of None: required)."""
    def add(flag, kind, default, text):
        p.add_argument(flag, type=kind, default=default, required=default is None, help=text)

    add("--owners", int, owners, "owners taking part, validators included")
    add("--validators", int, validators, "of the owners, how many score the model instead of training it")
    add("--rounds", int, rounds, "gradient steps (1 to 100000)")
    add("--lr", float, lr, "learning rate")
    p.add_argument("--eval-every", type=int, default=10, help="validate the model every this many rounds")
    p.add_argument("--key-bits", type=int, default=key_bits, help="Paillier modulus (2048 or more)")
    p.add_argument("--round-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long the aggregator waits for a phase's replies before it acts on the silence")
    p.add_argument("--quorum", type=int, default=0,
                   help="go on without silent trainers while this many still answer (0: a silent party fails "
                        "the job); the silent are dropped and not paid")


def build_parser() -> argparse.ArgumentParser:
    settings = Settings.from_environment()
    parser = argparse.ArgumentParser(prog="deltaml", description="DeltaML: a privacy-preserving ML marketplace")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run a whole marketplace locally", formatter_class=HELP,
                       description="A buyer, an aggregator, a ledger and the owners, each in its own process "
                                   "over RabbitMQ (or in this one over the memory bus), train on a data set "
                                   "split as DESIGN §5 says and settle on chain.")
    _job_shape(p, owners=5, validators=1, rounds=100, lr=1.5, key_bits=settings.key_bits)
    p.add_argument("--dataset", default="diabetes", help="diabetes or a CSV file (last column is the target)")
    p.add_argument("--bus", choices=["memory", "amqp"], default=settings.bus,
                   help="amqp: separate processes over RabbitMQ; memory: one process")
    p.add_argument("--amqp-url", default=settings.amqp_url, help="the RabbitMQ broker (DELTAML_AMQP_URL)")
    p.add_argument("--chain", default=settings.chain, help="embedded (an in-process EVM) or a JSON-RPC URL")
    p.add_argument("--poison-owner", type=int, default=None, metavar="I",
                   help="shuffle trainer I's targets, to see an owner that hurts the model earn no variable share")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report (DESIGN §5) here")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("aggregator", help="run the aggregator daemon", formatter_class=HELP)
    p.add_argument("--name", default="aggregator", help="the party's name on the bus (its queue)")
    _workers_option(p, settings, "the models' gradient steps")
    _common(p, settings)
    _key(p)
    _state(p)
    p.set_defaults(func=cmd_aggregator)

    p = sub.add_parser("ledger", help="run the ledger daemon, the only chain client", formatter_class=HELP)
    p.add_argument("--chain", default=settings.chain, help="embedded (an in-process EVM) or a JSON-RPC URL")
    p.add_argument("--contract", default=None, help="use this deployed escrow instead of deploying one")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="checkpoint who is who and each job's parties here (SQLite) and resume from it, on the "
                        "same escrow, after a crash (with --chain URL: the embedded chain ends with the process)")
    _common(p, settings)
    _key(p)
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("owner", help="run a data owner daemon", formatter_class=HELP)
    p.add_argument("--data", type=Path, required=True, help="the owner's CSV (header row; last column the target)")
    p.add_argument("--name", default=None, help="defaults to the data file's name")
    p.add_argument("--auto-accept", action="store_true", help="join every job the data matches")
    _common(p, settings)
    _key(p)
    _state(p)
    p.set_defaults(func=cmd_owner)

    buyer = sub.add_parser("buyer", help="buy a model").add_subparsers(dest="action", required=True)
    p = buyer.add_parser("train", help="request a model, follow it, write the report", formatter_class=HELP,
                         description="Make a key pair, deposit the escrow, have the model trained by the "
                                     "owners whose data has these columns, and print what each was paid.")
    p.add_argument("--features", required=True, help="comma-separated feature columns the owners' data must have")
    p.add_argument("--target", required=True, help="the column to predict")
    _job_shape(p, owners=None, validators=None, rounds=None, lr=None, key_bits=settings.key_bits)
    p.add_argument("--name", default="buyer", help="the party's name on the bus (its queue)")
    p.add_argument("--aggregator", default="aggregator", help="the name the aggregator daemon runs under")
    _workers_option(p, settings, "the refreshes and masked products of several models")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--model-out", type=Path, default=None,
                   help="write the final model here (JSON: features, target, intercept, coefficients)")
    p.add_argument("--fixed-reward-wei", type=int, default=10**16, help="paid to every owner that did its work")
    p.add_argument("--variable-pool-wei", type=int, default=10**18,
                   help="shared among trainers by contribution, scaled by the improvement; the rest is refunded")
    p.add_argument("--deadline-hours", type=int, default=24,
                   help="after this the escrow can be settled or refunded without the buyer")
    _common(p, settings)
    _key(p)
    p.set_defaults(func=cmd_buyer_train)

    p = buyer.add_parser("withdraw", formatter_class=HELP,
                         help="take back what the escrow credits this key (a refund left behind)")
    p.add_argument("--key", type=Path, required=True, help="the buyer's Ethereum key file")
    p.add_argument("--name", default="buyer", help="the party's name on the bus (not while a buyer of that "
                                                   "name is running)")
    p.add_argument("--settle", metavar="JOB", default=None,
                   help="first settle this job (anyone may once it is given up or past its deadline)")
    p.add_argument("--owners", type=int, default=None, help="with --settle: the owners the job enrolled")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the ledger's receipts")
    _common(p, settings, daemon=False)
    p.set_defaults(func=cmd_buyer_withdraw)

    data = sub.add_parser("dataset", help="data tools").add_subparsers(dest="action", required=True)
    p = data.add_parser("split", help="the DESIGN §5 split as one CSV per owner")
    p.add_argument("source", help="diabetes or a CSV file")
    p.add_argument("--parts", type=int, required=True, help="how many owners")
    p.add_argument("--out", type=Path, required=True, help="directory for owner-1.csv, owner-2.csv, ...")
    p.set_defaults(func=cmd_dataset_split)

    p = sub.add_parser("replay", help="replay a trace into a fresh core and compare outputs")
    p.add_argument("file", type=Path, help="a trace written with --trace")
    p.set_defaults(func=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltaml`` command."""
    try:
        parser = build_parser()
    except ConfigError as exc:  # a DELTAML_* variable the settings cannot take
        print(f"deltaml: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from .agents.amqp import BrokerUnavailable

    try:
        return args.func(args)
    except (CliError, ConfigError, DataError, KeyTooShort, ProtocolError, RuntimeError, BrokerUnavailable,
            OSError) as exc:
        print(f"deltaml: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
