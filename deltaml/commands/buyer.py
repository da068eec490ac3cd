"""The buyer's commands: ``buyer train`` (a job from request to refund) and ``buyer withdraw``."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from ..protocol.paillier import check_key_bits
from .common import (CliError, _check_names, _check_writable, _pinned, _print_earnings, _progress, _spec_error,
                     _wallet, _workers, _write_report)


def cmd_buyer_train(args) -> int:
    from ..agents.agent import Agent, Trace
    from ..agents.amqp import AmqpBus
    from ..agents.parties import buyer_core, new_key, save_key
    from pydantic import ValidationError

    from ..agents.runtime import configure_logging, escrow_outcome, run_buyer_job
    from ..protocol import messages as m
    from ..protocol.buyer import BuyerPhase
    from ..protocol.chain import LEDGER

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
    from ..agents.runtime import buyer_report

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
    from ..agents.topology import queue_name

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
    from ..agents.runtime import ask_aggregator

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
            if now:  # a restarted ledger is taken at its word only if it signs as before (its key)
                kept = "--state-dir" if role != "ledger" else "key"
                line = f"is serving its queue again ({when}); a job it ran goes on if it kept its {kept}"
            else:
                resumes = ("one restarted with its --state-dir resumes it" if role != "ledger" else
                           "a ledger restarted with its key and --state-dir (or --contract) goes on")
                line = f"stopped serving its queue ({when}); the job waits for it: {resumes}, Ctrl-C gives the job up"
            print(f"deltaml: note: {role} {name!r} {line}", file=sys.stderr)
            if now and on_back is not None:
                try:
                    await on_back(role, name)
                except Exception:  # asked again only at its next return; the job's own messages go on
                    pass


def _left(job, job_id: str, key: Path, aggregator_running: bool = True) -> str:
    """What became of a job its buyer left on Ctrl-C, and of its deposit."""
    from ..agents.runtime import GAVE_UP, escrow_outcome

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
    from ..agents.agent import Agent
    from ..agents.amqp import AmqpBus
    from ..agents.parties import context
    from ..agents.runtime import collect, configure_logging
    from ..protocol.chain import LEDGER, Collector

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
