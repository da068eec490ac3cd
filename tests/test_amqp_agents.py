"""Agents on the real broker: garbage is dead-lettered with a reason, the honest job is unaffected."""

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import aio_pika
import aiormq
import numpy as np
import pytest

from deltaml.agents import topology as t
from deltaml.agents.agent import Agent
from deltaml.agents.amqp import AmqpBus, BrokerUnavailable
from deltaml.agents.checkpoint import Checkpoint
from deltaml.agents.bus import RETRY_DELAYS, Outcome, Verdict
from deltaml.agents.ledger import Chain, LedgerCore
from deltaml.agents.parties import aggregator_core, buyer_core, context, load_wallet
from deltaml.protocol.chain import LEDGER
from deltaml.agents.runtime import GAVE_UP, run_buyer_job
from deltaml.marketplace import DemoConfig, baselines, make_spec, prepare_parts
from deltaml.protocol.machine import owner_names
from deltaml.protocol import messages as m
from deltaml.protocol.auth import sign, sign_encoded, signer
from deltaml.protocol.buyer import BuyerPhase
from deltaml.protocol.owner import OwnerCore, OwnerData

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).parent.parent


async def read_dead_letters(queue):
    await asyncio.sleep(1.0)
    out = {}
    while (msg := await queue.get(fail=False, timeout=2)) is not None:
        await msg.ack()
        out[msg.message_id] = (msg.headers or {}).get(t.REASON_HEADER, "")
    return out


async def tagged_market(parts, priv, wrap=lambda i, core: core) -> SimpleNamespace:
    """A running marketplace on the real broker under names no other test uses (a tag), one owner
    per part (``wrap`` may replace the i-th owner's core), and a spy queue on the dead letters."""
    tag = uuid.uuid4().hex[:6]
    aggregator, buyer_name = f"aggregator-{tag}", f"buyer-{tag}"
    names = [f"{n}-{tag}" for n in owner_names(len(parts))]
    spy_conn = await aio_pika.connect_robust(AMQP_URL)
    spy = await (await spy_conn.channel()).declare_queue(exclusive=True)
    await spy.bind(t.DEAD_LETTER_EXCHANGE)
    bus = await AmqpBus(AMQP_URL).connect()
    agents = [Agent("ledger", LEDGER, LedgerCore(context(LEDGER), Chain("embedded")), bus),
              Agent("aggregator", aggregator, aggregator_core(aggregator, wallet=load_wallet(None)), bus)]
    for i, (name, part) in enumerate(zip(names, parts)):
        core = OwnerCore(context(name, wallet=load_wallet(None)), OwnerData(part.columns, part.table()))
        agents.append(Agent("owner", name, wrap(i, core), bus))
    buyer = Agent("buyer", buyer_name, buyer_core(buyer_name, priv, wallet=load_wallet(None)), bus)
    for a in [*agents, buyer]:
        await a.start()
    return SimpleNamespace(bus=bus, agents=agents, buyer=buyer, names=names, aggregator=aggregator,
                           buyer_name=buyer_name, spy=spy, spy_conn=spy_conn)


async def test_bad_messages_are_dead_lettered_while_an_honest_job_finishes(keypair):
    pub, priv = keypair
    config = DemoConfig(rounds=2, eval_every=2)
    data, parts = prepare_parts(config)
    market = await tagged_market(parts, priv)
    bus, agents, buyer, names, spy = market.bus, market.agents, market.buyer, market.names, market.spy
    agg_name, buyer_name = market.aggregator, market.buyer_name

    spec = make_spec(config, data, pub.to_hex(), buyer_name)
    job_id = uuid.uuid4().hex
    job_task = asyncio.create_task(run_buyer_job(buyer, spec, aggregator=agg_name, job_id=job_id))

    mallory = load_wallet(None).private_key
    good = m.Envelope(message_id="x", job_id=job_id, sender=names[0], recipient=agg_name,
                      payload=m.JoinRequest(rows=5))
    raw = json.loads(m.encode(sign(good, mallory)))
    short = {**spec.model_dump(mode="json"), "key_bits": 1024, "public_key": format((1 << 1023) + 1, "x")}
    garbage = {
        "g-notjson": b"{{{ not json",
        "g-version": json.dumps({**raw, "schema_version": 99}).encode(),
        "g-type": json.dumps({**raw, "payload": {"type": "give_me_the_key"}}).encode(),
        "g-invalid": json.dumps({**raw, "payload": {"type": "join_request", "rows": -3}}).encode(),
        "g-short-key": json.dumps({**raw, "payload": {"type": "job_offer", "spec": short}}).encode(),
        "g-unsigned": m.encode(good.model_copy(update={"job_id": "no-such-job", "message_id": "n"})),
        "g-bad-signature": json.dumps({**raw, "message_id": "b", "signature": "00" * 65}).encode(),
        "g-unknown-job": m.encode(sign(good.model_copy(update={"job_id": "no-such-job", "message_id": "u"}),
                                       mallory)),
        "g-forged-join": m.encode(sign(good.model_copy(update={"sender": "mallory", "message_id": "f",
                                                               "payload": m.GradientReply(rows=1, gradients={})}),
                                       mallory)),
    }
    for message_id, body in garbage.items():
        await bus.publish(agg_name, body, message_id)
        await bus.publish(names[1], body, message_id)

    job = await asyncio.wait_for(job_task, timeout=300)
    # once owner 0 has joined, its name in this job belongs to its key: mallory cannot speak for it,
    # and the owner's own signature does not survive a changed field
    honest = agents[2]
    impostor = good.model_copy(update={"message_id": "i", "payload": m.GradientReply(rows=1, gradients={})})
    tampered = json.loads(m.encode(sign(impostor.model_copy(update={"message_id": "t"}), honest.key)))
    garbage["g-impostor"] = m.encode(sign(impostor, mallory))
    garbage["g-tampered"] = json.dumps({**tampered, "round": 7}).encode()
    for message_id in ("g-impostor", "g-tampered"):
        await bus.publish(agg_name, garbage[message_id], message_id)
    dead = await read_dead_letters(spy)
    await bus.close()
    await market.spy_conn.close()

    assert job.phase is BuyerPhase.FINISHED
    assert job.settled and sum(job.payments_wei.values()) + job.refund_wei == job.spec.deposit_wei
    expected = baselines(parts, config)["centralized_gd_mse"]
    assert abs(job.published[config.rounds]["all"] - expected) / expected < 1e-6
    reasons = {k: v for k, v in dead.items() if k in garbage}
    assert set(reasons) == set(garbage)
    assert "not JSON" in reasons["g-notjson"]
    assert "unsupported schema version 99" in reasons["g-version"]
    assert "give_me_the_key" in reasons["g-type"]
    assert "rows" in reasons["g-invalid"]
    assert "at least 2048 bits, got 1024" in reasons["g-short-key"]
    assert "unknown job" in reasons["g-unknown-job"]
    assert "unsigned envelope" in reasons["g-unsigned"]
    assert "invalid signature" in reasons["g-bad-signature"]
    assert "forged sender" in reasons["g-impostor"] and honest.address in reasons["g-impostor"]
    assert "forged sender" in reasons["g-tampered"]
    assert "InvalidTransition" in reasons["g-forged-join"] or "ProtocolError" in reasons["g-forged-join"]


class OutOfMemory:
    """An owner core whose handler fails at every try from some round on (its machine ran out of memory)."""

    def __init__(self, core, from_round: int) -> None:
        self.core, self.from_round, self.tries = core, from_round, 0

    def __getattr__(self, name):
        return getattr(self.core, name)

    def handle(self, env):
        if env.type == "gradient_request" and env.round >= self.from_round:
            self.tries += 1
            raise MemoryError("no room for the products")
        return self.core.handle(env)


async def test_an_owner_whose_handler_fails_is_dropped_at_once_over_the_real_broker(keypair):
    """The broker retries the message, dead-letters it with the exception, and the owner tells its
    aggregator: under the quorum the job goes on without it (before, it waited its round timeout)."""
    pub, priv = keypair
    config = DemoConfig(rounds=4, eval_every=2, quorum=3)
    data, parts = prepare_parts(config)
    market = await tagged_market(parts, priv, wrap=lambda i, core: OutOfMemory(core, 3) if i == 1 else core)
    agents, buyer, names = market.agents, market.buyer, market.names
    try:
        spec = make_spec(config, data, pub.to_hex(), market.buyer_name)
        job = await asyncio.wait_for(run_buyer_job(buyer, spec, aggregator=market.aggregator), timeout=300)
        dead = await read_dead_letters(market.spy)
    finally:
        for a in [*agents, buyer]:
            await a.stop()
        await market.bus.close()
        await market.spy_conn.close()
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.dropped == [names[1]] and agents[3].core.tries == 3
    assert any("MemoryError: no room for the products" in reason for reason in dead.values())
    stayed = [p for i, p in enumerate(parts) if i != 1]
    expected = baselines(stayed, DemoConfig(owners=4, validators=1, rounds=4, eval_every=2))["centralized_gd_mse"]
    assert abs(job.published[config.rounds]["all"] - expected) / expected < 1e-6
    assert job.settled and sum(job.payments_wei.values()) + job.refund_wei == job.spec.deposit_wei


async def test_a_duplicate_is_acknowledged_and_not_answered_twice(keypair):
    pub, priv = keypair
    tag = uuid.uuid4().hex[:6]
    agg_name = f"aggregator-{tag}"
    bus = await AmqpBus(AMQP_URL).connect()
    agent = Agent("aggregator", agg_name, aggregator_core(agg_name), bus)
    await agent.start()
    owner_q = await bus.declare("owner", f"watch-{tag}")
    spec = make_spec(DemoConfig(), prepare_parts(DemoConfig())[0], pub.to_hex(), f"buyer-{tag}", escrow=False)
    request = m.Envelope(message_id=f"req-{tag}", job_id=f"job-{tag}", sender=f"buyer-{tag}", recipient=agg_name,
                         payload=m.JobRequest(spec=spec, initial_model=[pub.encrypt(0) for _ in range(11)]))
    request = sign(request, load_wallet(None).private_key)
    for _ in range(2):
        await bus.publish(agg_name, m.encode(request), request.message_id)
    offers = []
    for _ in range(40):
        msg = await owner_q.get(fail=False, timeout=1)
        if msg is not None:
            await msg.ack()
            offers.append(m.decode(msg.body))
        elif offers:
            break
        await asyncio.sleep(0.1)
    await bus.close()
    mine = [o for o in offers if o.job_id == f"job-{tag}"]
    assert len(mine) == 1  # one job, one offer: duplicates must not multiply
    assert len(agent.core.jobs) == 1
    assert agent.policy.busy.get("job_request", 0) > 0


async def test_a_role_user_may_send_a_failed_delivery_to_wait_for_its_retry():
    """The retry exchanges are in every role's write permission: without it the broker closes the
    channel at the first retry, and the daemon's every later delivery with it."""
    bus = await AmqpBus("amqp://deltaml-owner:deltaml-owner@127.0.0.1:5672/", retry_delays=(0.2, 0.2)).connect()
    name, got = f"retry-{uuid.uuid4().hex[:6]}", []

    async def handler(delivery):
        got.append(delivery.attempts)
        return Outcome(Verdict.RETRY if delivery.attempts == 0 else Verdict.ACK)

    try:
        await bus.consume("owner", name, handler)
        await bus.publish(name, b"once more", "m-retry")
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.05)
        assert got == [0, 1]
    finally:
        await bus.close()


async def test_a_step_its_checkpoint_cannot_keep_halts_the_agent_and_its_successor_handles_the_message(tmp_path):
    """A daemon whose state database cannot be written (a full disk) went on without saying so:
    the failed write escaped the ack policy ("cannot rollback - no transaction is active" hid
    SQLite's own error), the message stayed unacknowledged and the daemon took the next ones the
    same way, until its prefetch was spent and it fell silent for good. Now nothing of the step
    leaves, the agent halts (the daemon exits, saying why) and the message, never acknowledged,
    goes to its successor started from the last saved step."""
    chain, tag = Chain("embedded"), uuid.uuid4().hex[:6]
    name, parties = f"ledger-{tag}", [context(f"buyer-{tag}-{k}", wallet=load_wallet(None)) for k in range(3)]
    heard = []

    async def hear(delivery):
        heard.append(m.decode(delivery.body))
        return Outcome(Verdict.ACK)

    async def greet(party, bus):
        env = party.wallet.hello(party)
        await bus.publish(name, sign_encoded(env, party.wallet.private_key), env.message_id)

    async def greeted(party):
        for _ in range(200):
            if any(e.recipient == party.name and e.type == "chain_info" for e in heard):
                return True
            await asyncio.sleep(0.05)
        return False

    listen = await AmqpBus(AMQP_URL).connect()
    for party in parties:
        await listen.consume("buyer", party.name, hear)
    checkpoint = Checkpoint(tmp_path)
    bus = await AmqpBus(AMQP_URL).connect()
    agent = Agent("ledger", name, LedgerCore(context(LEDGER), chain), bus, checkpoint=checkpoint)
    try:
        await agent.start()
        await greet(parties[0], bus)
        assert await greeted(parties[0])
        full = checkpoint.db.execute("PRAGMA page_count").fetchone()[0]
        checkpoint.db.execute(f"PRAGMA max_page_count = {full}")  # SQLite's SQLITE_FULL, as on a full disk
        for party in parties[1:]:
            await greet(party, bus)
        await asyncio.wait_for(agent.policy.halted.wait(), 30)
        assert "cannot write the state (database or disk is full)" in str(agent.policy.halted_by)
        await asyncio.sleep(0.5)
        assert not any(e.recipient != parties[0].name for e in heard)  # nothing of an unsaved step left
    finally:
        await agent.stop()
        await bus.close()
        checkpoint.close()
    checkpoint = Checkpoint(tmp_path)
    bus = await AmqpBus(AMQP_URL).connect()
    successor = Agent("ledger", name, LedgerCore(context(LEDGER), chain), bus, checkpoint=checkpoint)
    try:
        assert successor.resumed and set(successor.core.addresses) == {parties[0].name}
        await successor.start()
        assert all([await greeted(party) for party in parties[1:]])
        assert set(successor.core.addresses) == {party.name for party in parties}
        assert not successor.policy.halted.is_set()
    finally:
        await successor.stop()
        await bus.close()
        await listen.close()
        checkpoint.close()


async def test_an_owner_broker_user_cannot_read_the_buyer_queue():
    admin = await AmqpBus(AMQP_URL).connect()
    await admin.declare("buyer", "buyer")
    await admin.close()
    conn = await aio_pika.connect_robust("amqp://deltaml-owner:deltaml-owner@127.0.0.1:5672/")
    try:
        channel = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="ACCESS_REFUSED"):
            queue = await channel.get_queue("deltaml.buyer.buyer", ensure=False)
            async def ignore(message):
                pass

            await queue.consume(ignore)
        own = await AmqpBus("amqp://deltaml-owner:deltaml-owner@127.0.0.1:5672/").connect()
        await own.declare("owner", f"perm-{uuid.uuid4().hex[:6]}")  # its own role's queue is fine
        await own.close()
    finally:
        await conn.close()


def test_definitions_mirror_the_topology_module():
    defs = json.loads((ROOT / "deploy/rabbitmq/definitions.json").read_text())
    exchanges = {e["name"]: e for e in defs["exchanges"]}
    assert exchanges[t.PROTOCOL_EXCHANGE]["type"] == "topic"
    assert exchanges[t.PROTOCOL_EXCHANGE]["arguments"]["alternate-exchange"] == t.DEAD_LETTER_EXCHANGE
    assert exchanges[t.PROGRESS_EXCHANGE]["type"] == "fanout"
    assert exchanges[t.DEAD_LETTER_EXCHANGE]["type"] == "fanout"
    queues = {q["name"]: q for q in defs["queues"]}
    assert {t.DEAD_LETTER_QUEUE, t.PROGRESS_QUEUE, t.queue_name("aggregator", "aggregator")} <= set(queues)
    assert queues[t.queue_name("aggregator", "aggregator")]["arguments"] == t.QUEUE_ARGUMENTS
    bound = {(b["source"], b["destination"]) for b in defs["bindings"]}
    for attempt, delay in enumerate(RETRY_DELAYS, 1):  # where the n-th failure waits its delay
        name = t.retry_exchange(attempt)
        assert exchanges[name]["type"] == "fanout" and (name, name) in bound
        assert queues[name]["arguments"] == t.retry_queue_arguments(delay)
        for perm in defs["permissions"]:
            assert re.match(perm["write"], name)
    users = {u["name"] for u in defs["users"]}
    assert users == {f"deltaml-{r}" for r in t.ROLES}
    for perm in defs["permissions"]:
        role = perm["user"].removeprefix("deltaml-")
        others = [r for r in t.ROLES if r != role]
        for kind in ("configure", "write", "read"):
            assert re.match(perm[kind], t.queue_name(role, "x"))
            assert not any(re.match(perm[kind], t.queue_name(o, "x")) for o in others)


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "deltaml.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_demo_over_rabbitmq_with_separate_processes(tmp_path):
    report_path = tmp_path / "r.json"
    proc = run_cli("demo", "--bus", "amqp", "--rounds", "2", "--eval-every", "1", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["bus"] == "amqp" and report["key_bits"] == 2048
    assert abs(report["final_mse"] - report["centralized_gd_mse"]) / report["centralized_gd_mse"] < 1e-6
    assert [r for r, _ in report["mse_history"]] == [0, 1, 2]
    assert sum(report["payments_wei"].values()) + report["refund_wei"] == report["deposit_wei"]
    assert report["settlement_as_predicted"] and report["chain"]["contract_balance_wei"] == 0
    # each daemon's own account of what it used, which benchmarks/e2e.py reads: CPU seconds and peak memory
    daemons = {a: b for a, b in report["busy_seconds"].items() if a.startswith(("owner-", "aggregator-"))}
    assert len(daemons) == 6
    for used in daemons.values():
        assert used["cpu seconds (process)"] > 0 and used["peak memory MB (process)"] > 20
        assert 0 < used["private memory MB at the end (process)"] < used["peak memory MB (process)"]

    async def owner_queues():
        bus = await AmqpBus(AMQP_URL).connect()
        try:
            return [await bus.consumers("owner", name) for name in owner_names(5)]
        finally:
            await bus.close()

    # the run's owner queues are gone with it: none is left to collect the job offers made after it
    assert asyncio.run(owner_queues()) == [None] * 5


def test_no_broker_is_one_clear_line():
    proc = run_cli("demo", "--bus", "amqp", "--rounds", "1", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/",
                   timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "no RabbitMQ" in lines[0] and "make broker" in lines[0] and "guest:***" in lines[0]


@pytest.mark.parametrize("daemon", [
    ["aggregator", "--state-dir", "{blocked}/state"],
    ["owner", "--data", "{csv}", "--auto-accept", "--trace", "{blocked}/trace.jsonl"],
])
def test_a_daemon_that_cannot_open_its_files_says_so_in_one_line(tmp_path, daemon):
    """A trace or state directory that cannot be opened is refused before the broker connection,
    which used to be left open as the event loop closed (asyncio's complaints after the error)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    csv = tmp_path / "owner.csv"
    csv.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{2 * i}\n" for i in range(10)))
    proc = run_cli(*(a.format(blocked=blocked, csv=csv) for a in daemon), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("deltaml: error:") and str(blocked) in lines[0]


async def test_a_second_daemon_under_a_running_daemons_name_is_refused_in_one_line(tmp_path):
    """Two owners named alike took turns at one queue, each missing the other's messages (a job
    stalled); the second is now refused by the broker's exclusive consume and the first runs on."""
    csv = tmp_path / "owner.csv"
    csv.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{2 * i}\n" for i in range(10)))
    name = f"twin-{uuid.uuid4().hex[:6]}"
    daemon = [sys.executable, "-m", "deltaml.cli", "owner", "--data", str(csv), "--name", name]
    first = subprocess.Popen([*daemon, "--key", str(tmp_path / "first.key")], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bus = await AmqpBus(AMQP_URL).connect()
    try:
        for _ in range(600):
            queue = await bus.declare("owner", name)
            if queue.declaration_result.consumer_count:
                break
            await asyncio.sleep(0.1)
        second = await asyncio.to_thread(run_cli, *daemon[3:], "--key", str(tmp_path / "second.key"), timeout=60)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 2, second.stderr  # the --auto-accept notice, then
        assert lines[1] == (f"deltaml: error: queue deltaml.owner.{name} already has a consumer: owner {name!r} "
                            f"is running on this broker; stop it, or give this one another --name")
        assert first.poll() is None
        assert (await bus.declare("owner", name)).declaration_result.consumer_count == 1
    finally:
        first.terminate()
        first.wait(30)
        with contextlib.suppress(Exception):
            await (await bus.declare("owner", name)).delete(if_unused=False, if_empty=False)
        await bus.close()


async def test_a_second_ledger_is_refused_before_it_deploys_an_escrow(tmp_path):
    """It used to deploy its escrow (gas and an orphaned contract, on a real chain) and only then
    meet the first ledger's exclusive consume; a ledger whose broker is down deployed one too."""
    first = subprocess.Popen([sys.executable, "-m", "deltaml.cli", "ledger", "--key", str(tmp_path / "first.key")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bus = await AmqpBus(AMQP_URL).connect()
    try:
        for _ in range(600):
            if await bus.consumers("ledger", LEDGER):
                break
            await asyncio.sleep(0.1)
        second = await asyncio.to_thread(run_cli, "ledger", "--key", str(tmp_path / "second.key"), timeout=60)
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"deltaml: error: queue deltaml.ledger.{LEDGER} already has a consumer: ledger {LEDGER!r} is running "
            f"on this broker; stop it first"], second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(30)
        await bus.close()
    down = await asyncio.to_thread(run_cli, "ledger", "--key", str(tmp_path / "third.key"), "--amqp-url",
                                   "amqp://guest:guest@127.0.0.1:1/", timeout=60)
    lines = down.stderr.strip().splitlines()
    assert down.returncode == 2 and len(lines) == 1 and "127.0.0.1:1" in lines[0], down.stderr
    assert "escrow contract" not in down.stderr  # nothing deployed for a ledger that cannot run


async def test_ctrl_c_of_the_demo_says_what_became_of_it_and_stops_its_daemons():
    """It used to leave without a word (exit 130, the round lines its last output), and what was on
    its way to its stopped agents stayed in their queues: a `buyer train` under the default name
    then met the interrupted demo's chain events."""
    proc = subprocess.Popen([sys.executable, "-m", "deltaml.cli", "demo", "--bus", "amqp", "--rounds", "200"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = await asyncio.to_thread(proc.stdout.readline)  # round 0's metric: the daemons are at work
    assert first.startswith("round     0"), first
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("deltaml: interrupted: the demo's job is dropped and its daemons are "
                                            "stopped; nothing is kept")
    bus = await AmqpBus(AMQP_URL).connect()
    try:
        queues = [("aggregator", "aggregator"), ("buyer", "buyer"), ("ledger", LEDGER)]
        assert [await bus.consumers(role, name) for role, name in queues] == [0, 0, 0]
        declared = [await bus.declare(role, name) for role, name in queues]
        assert [q.declaration_result.message_count for q in declared] == [0, 0, 0]
        assert await bus.consumers("owner", "owner-1") is None  # the owners' queues went with the run
    finally:
        await bus.close()


def test_the_dead_letter_queue_is_bounded_on_the_broker():
    """Every refused message was kept for ever: on a long-running broker the queue grows until the
    disk alarm blocks every publisher. A policy (applied to the existing queue by `make broker`)
    keeps at most a GiB of the newest dead letters, for a week."""
    defs = json.loads((ROOT / "deploy/rabbitmq/definitions.json").read_text())
    (policy,) = [p for p in defs["policies"] if re.fullmatch(p["pattern"], t.DEAD_LETTER_QUEUE)]
    assert policy["definition"] == {"max-length-bytes": 2**30, "overflow": "drop-head", "message-ttl": 7 * 86400_000}
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "policy"], capture_output=True, text=True,
                            timeout=120, check=True).stdout.splitlines()
    assert f"{t.DEAD_LETTER_QUEUE}\t{policy['name']}" in listed


BUYER_TRAIN = ["buyer", "train", "--features", "age,sex,bmi,bp,s1,s2,s3,s4,s5,s6", "--target", "progression",
               "--owners", "5", "--validators", "1", "--rounds", "10", "--lr", "1.5"]


def test_a_buyer_naming_an_aggregator_the_broker_never_saw_is_refused_before_sending(tmp_path):
    """Its job request would be unroutable (dead-lettered) and the buyer wait for ever."""
    name = f"nobody-{uuid.uuid4().hex[:6]}"
    proc = run_cli(*BUYER_TRAIN, "--key", str(tmp_path / "buyer.key"), "--aggregator", name, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"deltaml: error: no aggregator named {name!r} has run on this broker (no queue "
                        f"deltaml.aggregator.{name}: what is sent there would be dead-lettered); start "
                        f"`deltaml aggregator` first or name it with --aggregator")


async def test_a_buyer_whose_aggregator_is_not_running_says_so_and_ctrl_c_costs_nothing(tmp_path):
    """The request waits in the aggregator's queue: the buyer says so at once (it used to wait
    without a word), and Ctrl-C before any deposit says nothing was paid (not "refunded")."""
    name = f"stopped-{uuid.uuid4().hex[:6]}"
    bus = await AmqpBus(AMQP_URL).connect()
    queue = await bus.declare("aggregator", name)  # an aggregator that ran here once and stopped
    await bus.declare("ledger", LEDGER)
    try:
        spaced = [" age, sex" if a == "age,sex,bmi,bp,s1,s2,s3,s4,s5,s6" else a for a in BUYER_TRAIN]
        proc = subprocess.Popen([sys.executable, "-m", "deltaml.cli", *spaced, "--key",
                                 str(tmp_path / "buyer.key"), "--aggregator", name, "--quorum", "1",
                                 "--round-timeout", "42"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(600):  # the request is in the queue: the buyer is waiting
            if (await bus.declare("aggregator", name)).declaration_result.message_count:
                break
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 130, err
        assert f"deltaml: note: nothing serves aggregator {name!r}" in err
        assert "waits in the queue until a daemon starts (Ctrl-C gives up)" in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("deltaml: interrupted: job ") and last.endswith(
            " is given up before any deposit and costs nothing"), err
        assert "Traceback" not in err and "refunded" not in err
        # behind its request, the word that it is given up: an aggregator started later drops the job
        # at once instead of recruiting owners for a buyer that is gone
        waiting = []
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            await message.ack()
            waiting.append(m.decode(message.body))
        assert [w.type for w in waiting] == ["job_request", "failure"]
        spec = waiting[0].payload.spec  # the flags as asked, names as an owner's CSV header gives them
        assert (spec.quorum, spec.round_timeout, spec.features) == (1, 42.0, ["age", "sex"])
        assert waiting[1].job_id == waiting[0].job_id and waiting[1].payload.reason == GAVE_UP
        assert signer(waiting[1]) == signer(waiting[0])
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await bus.close()


@pytest.mark.parametrize("role", ["aggregator", "ledger"])
def test_a_state_directory_holding_another_file_is_one_line_and_left_as_it_was(tmp_path, role):
    """A state.sqlite that is not a database was an sqlite3 traceback."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite").write_bytes(b"not a database, and not ours to overwrite")
    chain = ["--chain", "http://127.0.0.1:1"] if role == "ledger" else []
    proc = run_cli(role, *chain, "--state-dir", str(state), "--key", str(tmp_path / "k.key"), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"deltaml: error: {state / 'state.sqlite'}: not a state database (file is not a "
                        f"database); move it aside to start afresh")
    assert (state / "state.sqlite").read_bytes() == b"not a database, and not ours to overwrite"


async def test_an_owner_with_a_broker_user_of_its_own_hears_its_own_messages_only():
    """deploy/rabbitmq/add-owner.sh: with the shared role user an owner could bind its queue to
    another owner's name and read its messages. Its own user runs the owner daemon's agent as
    usual (its name, its address, the owners' fan-out) and is refused anything else."""
    name, other = f"owner-{uuid.uuid4().hex[:6]}", f"owner-{uuid.uuid4().hex[:6]}"
    user, password = f"deltaml-owner-{name}", uuid.uuid4().hex
    script = ROOT / "deploy/rabbitmq/add-owner.sh"
    done = subprocess.run([str(script), name, password], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    url = f"amqp://{user}:{password}@127.0.0.1:5672/"
    bus = await AmqpBus(url).connect()
    parts = prepare_parts(DemoConfig(owners=2))[1]
    agent = Agent("owner", name, OwnerCore(context(name, wallet=load_wallet(None)),
                                           OwnerData(parts[0].columns, parts[0].table())), bus)
    try:
        await agent.start()  # its queue, bound to its name, its address and the owners' fan-out
        for attempt in (lambda ch: _bind(ch, t.queue_name("owner", name), t.routing_key(other)),
                        lambda ch: _bind(ch, t.queue_name("owner", name), "to.#"),
                        lambda ch: ch.declare_queue(t.queue_name("owner", other), durable=True,
                                                    arguments=t.QUEUE_ARGUMENTS)):
            connection = await aio_pika.connect(url)
            try:
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    await attempt(await connection.channel())
            finally:
                await connection.close()
        # what is sent to its name and to its address reaches it: the agent itself refuses the junk
        # (with its reason; a message no queue took would reach the dead letters without one)
        spy_connection = await aio_pika.connect(AMQP_URL)
        admin = await AmqpBus(AMQP_URL).connect()
        try:
            spy = await (await spy_connection.channel()).declare_queue(exclusive=True)
            await spy.bind(t.DEAD_LETTER_EXCHANGE)
            junk = {uuid.uuid4().hex.encode(): recipient for recipient in (name, t.address_recipient(agent.address))}
            for body, recipient in junk.items():
                await admin.publish(recipient, body, uuid.uuid4().hex)
            reasons = {}
            for _ in range(200):
                message = await spy.get(fail=False, timeout=5)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                await message.ack()
                if message.body in junk:
                    reasons[message.body] = (message.headers or {}).get(t.REASON_HEADER, "")
                if len(reasons) == len(junk):
                    break
            assert sorted(reasons) == sorted(junk) and all(r.startswith("undecodable") for r in reasons.values())
        finally:
            await admin.close()
            await spy_connection.close()
    finally:
        await agent.stop()
        await bus.close()
        await _delete_queue("owner", name)
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)


async def _bind(channel, queue_name: str, key: str) -> None:
    queue = await channel.declare_queue(queue_name, passive=True)
    await queue.bind(await channel.get_exchange(t.PROTOCOL_EXCHANGE, ensure=False), key)


@pytest.mark.parametrize("role", ["aggregator", "owner"])
def test_a_daemon_restarted_from_its_state_dir_signs_as_the_same_address(tmp_path, role):
    """Without --key a daemon signed with a key for its run alone; restarted from its state it went on
    with its jobs under a new address, which the parties refuse and the escrow does not know (an
    owner's pay credited to an address whose key was gone). It keeps its key in its state dir."""
    state, csv = tmp_path / "state", tmp_path / "owner.csv"
    csv.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{2 * i}\n" for i in range(10)))
    name = f"{role}-{uuid.uuid4().hex[:6]}"
    args = [role, "--name", name, "--state-dir", str(state), "--log-level", "info",
            *(["--data", str(csv), "--auto-accept"] if role == "owner" else [])]
    signed_as = []
    for _ in range(2):
        log = tmp_path / "daemon.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen([sys.executable, "-m", "deltaml.cli", *args], cwd=ROOT, stdout=out, stderr=out)
        try:
            for _ in range(600):
                if "agent started" in log.read_text():
                    break
                assert daemon.poll() is None, log.read_text()
                time.sleep(0.1)
        finally:
            daemon.terminate()
            daemon.wait(10)
        signed_as.append(log.read_text().split("signing as", 1)[1].split("address=", 1)[1].split()[0])
    assert signed_as[0] == signed_as[1] == load_wallet(state / f"{role}.key").address
    assert (state / f"{role}.key").stat().st_mode & 0o777 == 0o600
    asyncio.run(_delete_queue(role, name))  # an owner's queue nobody reads would collect every later offer


async def _delete_queue(role: str, name: str) -> None:
    bus = await AmqpBus(AMQP_URL).connect()
    try:
        await (await bus.declare(role, name)).delete(if_unused=False, if_empty=False)
    finally:
        await bus.close()


@pytest.mark.parametrize("role", ["aggregator", "owner"])
def test_a_state_directory_that_is_a_file_is_one_line_in_our_words(tmp_path, role):
    """It was "[Errno 17] File exists", which names neither the flag nor the fix."""
    state = tmp_path / "state"
    state.write_text("a file, not a directory")
    csv = tmp_path / "owner.csv"
    csv.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{2 * i}\n" for i in range(10)))
    data = ["--data", str(csv), "--auto-accept"] if role == "owner" else []
    proc = run_cli(role, *data, "--state-dir", str(state), "--key", str(tmp_path / "k.key"), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == (f"deltaml: error: {state}: not a directory; give --state-dir "
                                                  f"a directory (created if missing)"), proc.stderr
    assert len(lines) == 1 and state.read_text() == "a file, not a directory"


@pytest.mark.parametrize("args, line", [
    (["owner", "--name", "#"], "--name '#': a party's name is 1 to 128 letters, digits, '-' or '_', beginning "
                               "with a letter or digit"),
    (["owner", "--name", ""], "--name '': a party's name is 1 to 128"),
    (["owner"], "--name (by default the data file's) 'owner 1': a party's name is 1 to 128"),
    (["owner", "--name", "owners"], "--name 'owners': the bus keeps that name for itself; choose another"),
    (["aggregator", "--name", "agg.1"], "--name 'agg.1': a party's name is 1 to 128"),
    ([*BUYER_TRAIN, "--aggregator", "ledger"], "--aggregator 'ledger': the bus keeps that name for itself"),
    (["buyer", "withdraw", "--name", "*"], "--name '*': a party's name is 1 to 128"),
    (["owner", "--name", "0x" + "Ab" * 20], f"--name '0x{'Ab' * 20}': a party's name may not be an Ethereum address"),
])
def test_a_party_name_the_bus_cannot_route_to_one_queue_is_one_line(tmp_path, args, line):
    """A name such as '#' bound the daemon's queue to every message on the bus (and its refusals
    filled the dead-letter queue); 'owners' heard every job offer twice; an empty --name silently
    became the data file's name. Refused before anything connects."""
    data = tmp_path / "owner 1.csv"
    data.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{2 * i}\n" for i in range(10)))
    (tmp_path / "k.key").write_text("")  # exists: buyer withdraw looks for it before the name
    extra = ["--data", str(data), "--auto-accept"] if args[0] == "owner" else []
    proc = run_cli(*args, *extra, "--key", str(tmp_path / "k.key"), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"deltaml: error: {line}"), proc.stderr


def test_dataset_split_writes_the_design_split(tmp_path):
    proc = run_cli("dataset", "split", "diabetes", "--parts", "5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    from deltaml.data import load_csv
    parts = [load_csv(tmp_path / f"owner-{i}.csv") for i in range(1, 6)]
    assert [len(p.y) for p in parts] == [89, 89, 88, 88, 88]
    assert parts[0].features[0] == "age" and parts[0].target == "progression"
    assert np.isclose(sum(p.y.sum() for p in parts), prepare_parts(DemoConfig())[0].y.sum())


@pytest.mark.parametrize("url, message", [
    ("garbage", "--amqp-url garbage: expected amqp://USER:PASSWORD@HOST:PORT/VHOST"),  # used to hang
    ("http://127.0.0.1:5672/", "--amqp-url http://127.0.0.1:5672/: expected amqp://"),
    ("amqp://guest:not-the-password@127.0.0.1:5672/",  # used to say "no RabbitMQ ... start one"
     "RabbitMQ at amqp://guest:***@127.0.0.1:5672/ refused user 'guest': wrong user name or password"),
    ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost",  # used to be an InvalidFrameError traceback
     "closed the connection as it opened: no virtual host 'no-such-vhost', or user 'guest' may not use it"),
])
async def test_a_broker_that_refuses_us_says_why_in_one_line(url, message):
    """Against the real broker: each way of not getting in names the fix, and no password is shown."""
    with pytest.raises(BrokerUnavailable) as info:
        await asyncio.wait_for(AmqpBus(url).connect(), timeout=60)
    assert message in str(info.value) and "not-the-password" not in str(info.value)


def test_a_broker_without_our_exchanges_is_one_line_and_no_traceback(tmp_path):
    """A virtual host the definitions were never loaded into (or an older version's, without the
    retry exchanges): the daemon said so in one line, but after pages of tracebacks from the
    connection it had left open."""
    vhost = f"deltaml-bare-{uuid.uuid4().hex[:6]}"
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True, timeout=120)
        data = tmp_path / "o.csv"
        data.write_text("a,b\n1,2\n")
        proc = run_cli("owner", "--data", str(data), "--auto-accept",
                       "--amqp-url", f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
                       timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            "deltaml: error: the broker lacks DeltaML's exchanges (NOT_FOUND - no exchange 'deltaml.protocol' in "
            f"vhost '{vhost}'); load deploy/rabbitmq/definitions.json with `make broker`"], proc.stderr
    finally:
        subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, timeout=120)


async def test_a_demo_beside_a_running_marketplace_is_refused_and_empties_nothing(keypair):
    """The demo names its daemons as the README's are named: it used to empty their queues and
    consume beside them, and both jobs hung. A queue with a consumer is left as it is."""
    from deltaml.marketplace import run_demo

    bus = await AmqpBus(AMQP_URL).connect()
    try:
        queue = await bus.declare("owner", "owner-3")
        await queue.purge()
        for k in (1, 2):
            await bus.publish("owner-3", b"a message for the running owner", f"kept-{k}")
        running = await aio_pika.connect_robust(AMQP_URL)  # the running owner, busy with its first message
        channel = await running.channel()
        await channel.set_qos(prefetch_count=1)
        taken = asyncio.Event()

        async def busy(message):
            taken.set()  # never acknowledged while the owner "works"

        await (await channel.get_queue(queue.name)).consume(busy)
        await asyncio.wait_for(taken.wait(), 10)
        with pytest.raises(BrokerUnavailable, match="deltaml.owner.owner-3 has a consumer"):
            await asyncio.to_thread(run_demo, DemoConfig(rounds=1, eval_every=1), "amqp", keypair=keypair)
        await running.close()  # the owner stops: its unacknowledged message goes back to the queue
        await asyncio.sleep(0.5)
        left = []
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            left.append(message.message_id)
            await message.ack()
        assert sorted(left) == ["kept-1", "kept-2"]  # nothing was purged
    finally:
        await bus.close()
