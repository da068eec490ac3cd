"""Committed traces of a complete diabetes job replay exactly, for every role."""

import json
import shutil
from pathlib import Path

import pytest

from deltaml.agents.replay import replay
from deltaml.cli import main

TRACES = Path(__file__).parent / "traces"
ROLES = ["aggregator", "buyer", *(f"owner-{i}" for i in range(1, 6))]


@pytest.mark.parametrize("name", ROLES)
def test_committed_trace_replays_without_difference(name):
    count, diffs = replay(TRACES / f"{name}.jsonl")
    assert count >= 4 and diffs == []


def test_every_role_and_every_message_type_is_covered():
    seen = set()
    for name in ROLES:
        for line in (TRACES / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "message" in record:
                seen.add(record["message"]["payload"]["type"])
    assert {"job_request", "job_offer", "gradient_request", "refresh_request", "product_request",
            "metric_request", "job_result", "job_closed", "job_finished"} - {"refresh_request"} <= seen


def test_a_tampered_trace_is_reported(tmp_path, capsys):
    for f in TRACES.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "owner-1.jsonl"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        record = json.loads(line)
        if record.get("dir") == "out" and record["message"]["payload"]["type"] == "gradient_reply":
            record["message"]["payload"]["rows"] += 1
            lines[i] = json.dumps(record)
            break
    path.write_text("\n".join(lines) + "\n")
    assert main(["replay", str(path)]) == 1
    assert "1 differences" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("", "no trace header: nothing to replay"),
    ("garbage\n", "line 1: not JSON"),
    ('{"trace": 1, "role": "owner"}\n{"dir": "in", "mess', "line 2: not JSON"),  # cut off mid-write
    ("[1, 2]\n", "line 1: not a JSON object"),
    ('{"dir": "in"}\n', "line 1: record before the trace header"),
    ('{"trace": 1, "role": "owner"}\n', "a malformed record (no 'seed')"),
    ('{"trace": 1, "role": "owner", "name": "o", "seed": "zz"}\n', "the header's seed is not hex"),
    ('{"trace": 1, "role": "ledger", "name": "ledger", "seed": "00"}\n', "cannot replay role ledger"),
    ('{"trace": 1, "role": "aggregator", "name": "a", "seed": "00"}\n{"dir": "in", "message": {}}\n',
     "a malformed record"),
])
def test_a_file_that_is_not_a_trace_is_a_one_line_error(tmp_path, capsys, text, message):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltaml: error: {path}: ") and message in err and err.count("\n") == 1


async def test_a_job_the_buyer_gave_up_replays_without_difference(tmp_path, keypair):
    """Giving a job up, or asking after it, is the buyer's own decision, like opening it: the trace
    records it so a replay takes it again (a bare "out" record with no input before it could not be
    replayed)."""
    from deltaml.agents.agent import Agent, Trace
    from deltaml.agents.bus import MemoryBus
    from deltaml.agents.parties import buyer_core, save_key
    from deltaml.agents.runtime import GAVE_UP, ask_aggregator, give_up
    from deltaml.protocol import messages as m

    pub, priv = keypair
    save_key(priv, tmp_path / "buyer.key.json")
    core = buyer_core("buyer", priv, seed=b"\x07" * 32)
    trace = Trace(tmp_path / "buyer.jsonl", {"role": "buyer", "name": "buyer", "seed": (b"\x07" * 32).hex(),
                                             "key": "buyer.key.json"})
    agent = Agent("buyer", "buyer", core, MemoryBus(), trace)
    spec = m.JobSpec(buyer="buyer", features=["a"], target="y", owners=2, validators=1, rounds=2, lr=0.5,
                     eval_every=2, key_bits=2048, public_key=pub.to_hex())
    await agent.act(lambda: core.open_job("j", spec), direction="open")
    await ask_aggregator(agent, "j")  # its daemon came back: does the job go on there?
    assert await give_up(agent, "j", GAVE_UP)
    trace.close()
    assert [json.loads(line)["dir"] for line in (tmp_path / "buyer.jsonl").read_text().splitlines()[1:]] == [
        "open", "ask", "give_up"]
    assert replay(tmp_path / "buyer.jsonl") == (3, [])


async def test_a_message_given_up_replays_as_what_the_party_said_instead(tmp_path, keypair, monkeypatch):
    """After the last try of a handler that failed, the owner tells its aggregator (``fault``): the
    trace records the message as given up, and a replay takes the same step again."""
    import os

    from deltaml.agents.agent import Agent, Trace
    from deltaml.agents.bus import MAX_ATTEMPTS, Delivery, MemoryBus, Verdict
    from deltaml.agents.parties import owner_core
    from deltaml.protocol import messages as m
    from deltaml.protocol import owner as owner_module
    from deltaml.protocol.auth import sign

    pub, _ = keypair
    (tmp_path / "rows.csv").write_text("a,b,y\n" + "".join(f"{i},{i % 3},{2 * i}\n" for i in range(10)))
    seed = b"\x05" * 32
    core = owner_core("owner-1", str(tmp_path / "rows.csv"), True, seed)
    trace = Trace(tmp_path / "owner-1.jsonl", {"role": "owner", "name": "owner-1", "seed": seed.hex(),
                                               "data": "rows.csv"})
    agent = Agent("owner", "owner-1", core, MemoryBus(), trace)
    aggregator = os.urandom(32)
    spec = m.JobSpec(buyer="buyer", features=["a", "b"], target="y", owners=3, validators=1, rounds=4, lr=0.5,
                     eval_every=2, key_bits=2048, public_key=pub.to_hex())

    async def deliver(payload, round_, attempts=0):
        env = m.Envelope(message_id=f"m{round_}-{payload.type}", job_id="j", round=round_, sender="aggregator",
                         recipient="owner-1", payload=payload)
        return await agent.policy(Delivery(m.encode(sign(env, aggregator)), {}, attempts))

    await deliver(m.JobOffer(spec=spec), 0)
    await deliver(m.RoleAssignment(role="trainer", models=["all"]), 0)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room for the products")

    monkeypatch.setattr(owner_module, "encrypted_gradient", out_of_memory)
    ask = m.GradientRequest(scale_bits=32, models={"all": [pub.encrypt(0)] * 3})
    for attempt in range(MAX_ATTEMPTS):
        assert (await deliver(ask, 1, attempt)).verdict is Verdict.RETRY
    monkeypatch.undo()
    trace.close()
    records = [json.loads(line) for line in (tmp_path / "owner-1.jsonl").read_text().splitlines()[1:]]
    said = records[-1]["message"]
    assert [r["dir"] for r in records[-2:]] == ["fault", "out"]
    assert (said["recipient"], said["payload"]) == ("aggregator", {
        "type": "failure", "reason": "could not handle gradient_request of round 1"})
    assert core.jobs["j"].phase.name == "FINISHED"
    assert replay(tmp_path / "owner-1.jsonl") == (3, [])


def test_a_trace_that_cannot_be_written_stops_and_the_agent_goes_on(tmp_path):
    """A full disk under `--trace FILE`: the write's OSError escaped the ack policy after the core
    had stepped, so the delivery was never acknowledged and the daemon stalled. The trace now ends
    there (said once in the log) and the agent goes on: it is a record of the work, not part of it."""
    from deltaml.agents.agent import Trace
    from deltaml.protocol import messages as m
    from deltaml.protocol.machine import Context

    trace = Trace(tmp_path / "t.jsonl", {"role": "owner"})
    env = Context("owner-1").message("j", 0, "aggregator", m.JobQuery())
    trace.record("in", env)
    trace.handle.close()
    trace.handle = open("/dev/full", "a", buffering=1)  # every write: ENOSPC, as on a full disk
    trace.record("out", env)
    trace.tick(1.0)
    trace.close()
    assert trace.handle is None
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert [json.loads(line).get("dir") for line in lines] == [None, "in"]


async def test_a_failure_report_that_cannot_be_saved_leaves_the_message_to_a_successor(tmp_path):
    """The last try of a failing message: the core's failure report (STYLE §4) is a step like any
    other, and one its checkpoint cannot keep must not leave, nor the message be dead-lettered as
    reported: it is held for the daemon's successor, which tries it again."""
    import os

    from deltaml.agents.bus import MAX_ATTEMPTS, Delivery, Verdict
    from deltaml.agents.checkpoint import Checkpoint
    from deltaml.agents.policy import AckPolicy
    from deltaml.protocol import messages as m
    from deltaml.protocol.auth import sign_encoded
    from deltaml.protocol.machine import Context

    checkpoint, published = Checkpoint(tmp_path), []
    checkpoint.save(b"before", {}, None, [])
    full = checkpoint.db.execute("PRAGMA page_count").fetchone()[0]
    checkpoint.db.execute(f"PRAGMA max_page_count = {full}")
    owner = Context("owner-1")

    def failing(env):
        raise RuntimeError("a bug")

    async def publish(env):
        published.append(env)

    policy = AckPolicy(failing, publish, checkpoint=checkpoint, snapshot=lambda: os.urandom(1 << 16),
                       fault=lambda env: [owner.message(env.job_id, 0, "aggregator", m.Failure(reason="x"))])
    env = Context("aggregator").message("j", 0, "owner-1", m.JobQuery())
    body = sign_encoded(env, os.urandom(32))
    outcome = await policy(Delivery(body, {}, MAX_ATTEMPTS - 1))
    assert outcome.verdict is Verdict.HOLD and published == [] and policy.halted.is_set()
    assert (await policy(Delivery(body, {}, 0))).verdict is Verdict.HOLD  # and every later one
    checkpoint.close()
    assert Checkpoint(tmp_path).core() == b"before"
