"""Faults on the real broker with real processes: killed owners, a killed aggregator, an absent buyer,
duplicated messages and a restarted broker. Every job finishes or fails cleanly; the harness accounts
for every message and every wei (tests/fault_harness.py). ``make faults`` prints the table."""

import asyncio
import subprocess

import pytest

from deltaml.agents.runtime import GAVE_UP, ask_aggregator, run_buyer_job
from deltaml.marketplace import DemoConfig, baselines, make_spec
from deltaml.protocol.aggregator import AggPhase
from deltaml.protocol.buyer import BuyerPhase

from fault_harness import Market, record
from test_silence import Silent


@pytest.fixture
async def market(tmp_path, keypair):
    markets = []

    async def make(config, **kw):
        mk = Market(tmp_path, config, keypair, **kw)
        markets.append(mk)
        return mk

    yield make
    for mk in markets:
        await mk.close()


def aggregator_job(mk):
    return mk.agents[1].core.jobs.get(mk.job_id)


def in_round(mk, round_):
    job = aggregator_job(mk)
    return job is not None and job.round >= round_ and job.phase is AggPhase.TRAINING


async def assert_books_clean(mk, fault, injected, job):
    books = await mk.books()
    record(fault, injected, job, books)
    assert books.lost == [], books.lost
    assert books.wei_lost == 0
    assert books.sent > 20 and books.handled > 0
    return books


def centralised(mk, drop=None):
    parts = [p for i, p in enumerate(mk.parts) if i != drop]
    config = DemoConfig(owners=len(parts), validators=mk.config.validators, rounds=mk.config.rounds,
                        lr=mk.config.lr, eval_every=mk.config.eval_every)
    return baselines(parts, config)


async def test_an_owner_killed_mid_round_is_dropped_and_the_rest_equals_centralised_training(market):
    mk = await market(DemoConfig(rounds=8, eval_every=4, round_timeout=5.0, quorum=3))
    await mk.start()
    victim = mk.owners[1]

    async def kill(mk):
        await mk.wait_for(lambda: in_round(mk, 2), what="round 2")
        mk.kill(victim)

    job = await mk.run(kill)
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.dropped == [victim]
    expected = centralised(mk, drop=1)["centralized_gd_mse"]
    assert abs(job.published[8]["all"] - expected) / expected < 1e-6
    assert job.addresses[victim] not in job.payments_wei
    await assert_books_clean(mk, "owner SIGKILL mid-round, quorum met", 1, job)


async def test_an_owner_killed_without_a_quorum_fails_the_job_cleanly_with_a_refund(market):
    mk = await market(DemoConfig(rounds=8, eval_every=4, round_timeout=5.0))
    await mk.start()

    async def kill(mk):
        await mk.wait_for(lambda: in_round(mk, 2), what="round 2")
        mk.kill(mk.owners[0])

    job = await mk.run(kill)
    assert job.phase is BuyerPhase.FAILED and "no gradient from" in job.reason
    assert job.settled and job.refund_wei == job.spec.deposit_wei
    await assert_books_clean(mk, "owner SIGKILL mid-round, no quorum", 1, job)


async def test_the_buyer_offline_during_a_refresh_fails_the_job_with_the_escrow_refundable(market):
    mk = await market(DemoConfig(rounds=40, eval_every=3, round_timeout=5.0))
    silent = {}

    def wrap(name, core):
        silent[name] = Silent(core, ("refresh_request", 0))
        return silent[name]

    mk.wrap = wrap
    await mk.start()
    job = await mk.run()
    assert job.phase is BuyerPhase.FAILED and "the buyer's refresh" in job.reason
    assert silent["buyer"].swallowed == 1
    assert job.settled and job.refund_wei == mk.config.variable_pool_wei  # fixed rewards were earned
    assert sum(job.payments_wei.values()) + job.refund_wei == job.spec.deposit_wei
    await assert_books_clean(mk, "buyer offline during a refresh", 1, job)


async def test_the_buyer_interrupted_mid_job_ends_it_at_once_and_gets_its_deposit_back(market):
    """Ctrl-C cancels the buyer's job task: the buyer tells its aggregator, which fails the job and
    gives the escrow up there and then, not when the job next needs the buyer (``round_timeout``,
    600 s here, is far beyond the wait)."""
    mk = await market(DemoConfig(rounds=40, eval_every=4))
    await mk.start()
    task = asyncio.create_task(run_buyer_job(mk.buyer, mk.spec(), aggregator=mk.aggregator, job_id=mk.job_id))
    await mk.wait_for(lambda: in_round(mk, 2), what="round 2")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await mk.wait_for(lambda: aggregator_job(mk).phase is AggPhase.FAILED, timeout=60, what="the job to fail")
    assert aggregator_job(mk).reason == f"{mk.buyer_name}: {GAVE_UP}"
    job = await mk.settled()
    assert job.phase is BuyerPhase.FAILED and job.reason == GAVE_UP
    assert job.settled and job.refund_wei > 0 and job.withdrawn
    assert sum(job.payments_wei.values()) + job.refund_wei == job.spec.deposit_wei
    await assert_books_clean(mk, "buyer Ctrl-C mid-job", 1, job)


class Twice:
    """A bus that publishes everything twice (a publisher retrying after a lost confirm)."""

    def __init__(self, bus) -> None:
        self.bus, self.copies = bus, 0

    async def publish(self, recipient, body, message_id):
        await self.bus.publish(recipient, body, message_id)
        await self.bus.publish(recipient, body, message_id)
        self.copies += 1

    def __getattr__(self, name):
        return getattr(self.bus, name)


async def test_every_message_delivered_twice_changes_nothing(market):
    mk = await market(DemoConfig(rounds=4, eval_every=2))
    await mk.start()
    twice = Twice(mk.bus)
    for agent in mk.agents:
        agent.bus = twice
    job = await mk.run()
    assert job.phase is BuyerPhase.FINISHED, job.reason
    expected = centralised(mk)
    assert abs(job.published[4]["all"] - expected["centralized_gd_mse"]) / expected["centralized_gd_mse"] < 1e-6
    assert job.model == pytest.approx(expected["centralized_gd_model"], rel=1e-6, abs=1e-6)
    assert sum(job.payments_wei.values()) + job.refund_wei == job.spec.deposit_wei
    assert len(mk.ledger.withdrawn) == len(job.payments_wei) + 1  # each payee withdrew once, not twice
    await assert_books_clean(mk, "every message duplicated", twice.copies, job)


async def test_the_aggregator_killed_and_restarted_resumes_from_its_checkpoint(market):
    mk = await market(DemoConfig(rounds=8, eval_every=4), aggregator_process=True)
    await mk.start()
    kills = 0

    async def kill_and_restart(mk):
        nonlocal kills
        for round_ in (0, 4):  # once right after the baseline, once after the mid-job evaluation
            await mk.wait_for(lambda: mk.buyer_job() is not None and round_ in mk.buyer_job().published,
                              what=f"the metric of round {round_}")
            await asyncio.sleep(0.3)  # in the middle of the next training round
            mk.kill(mk.aggregator, resumes=True)
            kills += 1
            mk.start_aggregator()

    job = await mk.run(kill_and_restart)
    assert job.phase is BuyerPhase.FINISHED, job.reason
    expected = centralised(mk)
    assert job.model == pytest.approx(expected["centralized_gd_model"], rel=1e-6, abs=1e-6)
    assert abs(job.published[8]["all"] - expected["centralized_gd_mse"]) / expected["centralized_gd_mse"] < 1e-6
    await assert_books_clean(mk, "aggregator SIGKILL and restart", kills, job)


@pytest.mark.parametrize("escrow", [True, False], ids=["paid", "unpaid"])
async def test_an_aggregator_restarted_without_its_state_ends_the_job_for_its_buyer_and_owners(market, escrow):
    """It used to refuse every message of the job it had lost as for an unknown one: owners and buyer
    waited for ever, and then a paid job's deposit waited for the escrow's deadline. Now the owners
    whose replies were in its queue are told; it finds a paid job's escrow on chain through the
    ledger and gives it up and settles it at once, which ends the job for everyone on the chain's
    word (the refund withdrawn). An unpaid job has no such word: the buyer learns through the
    question `buyer train` asks when it sees the daemon back, the validator through its own after a
    silence of the round timeout."""
    import shutil

    from deltaml.protocol.chain import ABANDONED

    mk = await market(DemoConfig(rounds=8, eval_every=4, round_timeout=10.0), aggregator_process=True)
    await mk.start()
    spec = make_spec(mk.config, mk.data, mk.keypair[0].to_hex(), mk.buyer_name, escrow=escrow)
    task = asyncio.create_task(run_buyer_job(mk.buyer, spec, aggregator=mk.aggregator, job_id=mk.job_id))
    await mk.wait_for(lambda: mk.buyer_job() is not None and 0 in mk.buyer_job().published,
                      what="the metric of round 0")
    await asyncio.sleep(0.3)  # in the middle of the next training round
    mk.kill(mk.aggregator)
    shutil.rmtree(mk.tmp / "aggregator-state")
    mk.start_aggregator()
    await mk.until_consuming([mk.aggregator], role="aggregator")
    if not escrow:
        await ask_aggregator(mk.buyer, mk.job_id)
    job = await asyncio.wait_for(task, timeout=120)
    lost = f"aggregator {mk.aggregator} does not know job {mk.job_id}"
    assert job.phase is BuyerPhase.FAILED, job.reason
    if escrow:  # (a refresh reply of the buyer's in flight is answered before the chain's word comes)
        assert job.reason == ABANDONED or job.reason.startswith(lost), job.reason
        assert job.settled and job.withdrawn and not job.escrow_open
        spec = job.spec  # all back, or less the fixed rewards if a metric after round 0 was on chain
        assert job.refund_wei in (spec.deposit_wei, spec.deposit_wei - spec.fixed_reward_wei * spec.owners)
    else:
        assert job.lost and job.reason.startswith(lost), job.reason

    def over() -> set[str]:  # owners whose trace shows the job's end: the aggregator's word or the chain's
        return {o for o in mk.owners if any(('"job_finished"' in line or '"Abandoned"' in line) and '"dir": "in"' in line
                                            for line in (mk.tmp / f"{o}.jsonl").read_text().splitlines())}

    await mk.wait_for(lambda: over() == set(mk.owners), timeout=60, what="the job over for every owner")
    await assert_books_clean(mk, f"aggregator lost its state ({'paid' if escrow else 'unpaid'} job)",
                             1, job)


def restart_broker() -> None:
    """Stop and start the RabbitMQ application: every connection drops, durable queues come back from disk."""
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True, timeout=120)


async def test_a_broker_restart_mid_job_loses_nothing_and_the_job_finishes(market):
    mk = await market(DemoConfig(rounds=8, eval_every=4))
    await mk.start()

    async def restart(mk):
        await mk.wait_for(lambda: in_round(mk, 2), what="round 2")
        await asyncio.to_thread(restart_broker)

    job = await mk.run(restart)
    assert job.phase is BuyerPhase.FINISHED, job.reason
    expected = centralised(mk)
    assert job.model == pytest.approx(expected["centralized_gd_model"], rel=1e-6, abs=1e-6)
    assert all(p.poll() is None for p in mk.procs.values())  # the daemons reconnected, none died
    await assert_books_clean(mk, "broker restart mid-job", 1, job)
