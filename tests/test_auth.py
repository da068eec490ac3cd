"""Envelope signatures: who may speak as whom, in pure code and through the ack policy."""

import json
import os

import pytest

from deltaml.agents import topology as t
from deltaml.agents.bus import Delivery, Verdict
from deltaml.agents.parties import load_wallet
from deltaml.agents.policy import AckPolicy
from deltaml.protocol import messages as m
from deltaml.protocol.auth import AuthError, Keyring, sign, sign_encoded, signer
from deltaml.protocol.chain import Wallet
from deltaml.protocol.errors import InvalidTransition, ProtocolError

ALICE, MALLORY = os.urandom(32), os.urandom(32)
ALICE_ADDRESS = Wallet(private_key=ALICE).address


def join(sender="owner-1", job="job-1", rows=5, **payload):
    return m.Envelope(message_id=os.urandom(8).hex(), job_id=job, sender=sender, recipient="aggregator",
                      payload=m.JoinRequest(rows=rows, **payload))


def test_a_signature_names_its_signer():
    assert signer(sign(join(), ALICE)) == ALICE_ADDRESS


@pytest.mark.parametrize("field,value", [("job_id", "job-2"), ("round", 3), ("recipient", "owner-2"),
                                         ("sender", "owner-9"), ("message_id", "other"),
                                         ("payload", m.JoinRequest(rows=6))])
def test_changing_any_field_changes_the_signer(field, value):
    signed = sign(join(), ALICE)
    assert signer(signed.model_copy(update={field: value})) != ALICE_ADDRESS


@pytest.mark.parametrize("envelope", [
    join(),
    join(job='job-"signature":null,"payload":{}'),  # the text the signature is spliced at (names can't hold it)
    sign(join(job="job-3"), MALLORY),  # signed before: the new signature replaces the old one
    m.Envelope(message_id="g", job_id="j", round=4, sender="aggregator", recipient="owner-1",
               payload=m.GradientRequest(scale_bits=96, models={"all": [2**4000 + 7, 3], "without:owner-2": [5]})),
])
def test_signing_into_wire_form_is_signing_then_encoding(envelope):
    wire = sign_encoded(envelope, ALICE)
    assert wire == m.encode(sign(envelope, ALICE))
    assert signer(m.decode(wire)) == ALICE_ADDRESS


def test_the_signature_survives_the_wire():
    signed = sign(join(address=ALICE_ADDRESS), ALICE)
    assert signer(m.decode(m.encode(signed))) == ALICE_ADDRESS


def test_a_process_of_fifty_agents_derives_each_signing_key_once():
    """The scale bench's owner processes hold 50 agents, each signing with its own key: deriving
    a key's public half is a third of a signature's cost, and it is done once per key."""
    from deltaml.protocol.auth import _signing_key

    keys = [os.urandom(32) for _ in range(50)]
    for key in keys:
        sign_encoded(join(), key)
    before = _signing_key.cache_info().misses
    for key in keys:  # a round later: every agent signs again
        assert signer(m.decode(sign_encoded(join(), key))) == Wallet(private_key=key).address
    assert _signing_key.cache_info().misses == before


@pytest.mark.parametrize("signature,reason", [(None, "unsigned"), ("zz", "invalid signature"),
                                              ("00" * 65, "invalid signature"), ("ab" * 10, "invalid signature")])
def test_missing_or_malformed_signatures_are_refused(signature, reason):
    with pytest.raises(AuthError, match=reason):
        signer(join().model_copy(update={"signature": signature}))


def test_the_first_accepted_signer_owns_the_name_in_that_job_only():
    ring = Keyring()
    first = sign(join(), ALICE)
    ring.bind(first, ring.check(first))
    with pytest.raises(AuthError, match="forged sender: owner-1 in job job-1"):
        ring.check(sign(join(), MALLORY))
    assert ring.check(sign(join(), ALICE)) == ALICE_ADDRESS
    assert ring.check(sign(join(job="job-2"), MALLORY))  # another job, another binding


def test_a_pinned_name_is_bound_in_every_job():
    ring = Keyring(pinned={"aggregator": ALICE_ADDRESS})
    offer = join(sender="aggregator", job="any")
    assert ring.check(sign(offer, ALICE)) == ALICE_ADDRESS
    with pytest.raises(AuthError, match="forged sender: aggregator"):
        ring.check(sign(offer, MALLORY))


def test_a_declared_address_must_be_the_signer():
    with pytest.raises(AuthError, match="declares address"):
        Keyring().check(sign(join(address=ALICE_ADDRESS), MALLORY))
    hello = m.Envelope(message_id="h", job_id="", sender="owner-1", recipient="ledger",
                       payload=m.ChainHello(address=ALICE_ADDRESS))
    with pytest.raises(AuthError, match="declares address"):
        Keyring().check(sign(hello, MALLORY))


async def test_the_policy_dead_letters_forgeries_and_binds_only_accepted_messages():
    accepted = []

    def step(env):
        if env.payload.rows == 13:
            raise ProtocolError("unlucky rows")
        accepted.append(env.message_id)
        return []

    async def publish(env):
        pass

    policy = AckPolicy(step, publish)
    # mallory speaks first but is refused by the protocol: the name is not hers
    refused = sign(join().model_copy(update={"payload": m.JoinRequest(rows=13)}), MALLORY)
    assert (await policy(Delivery(m.encode(refused), {}))).verdict is Verdict.DEAD_LETTER
    honest = sign(join(), ALICE)
    assert (await policy(Delivery(m.encode(honest), {}))).verdict is Verdict.ACK
    forged = sign(join(), MALLORY)
    outcome = await policy(Delivery(m.encode(forged), {}))
    assert outcome.verdict is Verdict.DEAD_LETTER and outcome.reason.startswith("unauthenticated: forged sender")
    unsigned = json.loads(m.encode(join()))
    outcome = await policy(Delivery(json.dumps(unsigned).encode(), {}))
    assert outcome.reason == "unauthenticated: unsigned envelope"
    assert accepted == [honest.message_id]


async def test_a_long_running_partys_keyring_keeps_the_signers_of_the_jobs_it_holds_only():
    """The keyring bound each job's parties for good: a daemon that served thousands of jobs wrote
    them all into every checkpoint (2.9 MB of them after 10,000 jobs of seven parties). It now keeps
    the signers of the jobs its core holds, and a forger is still refused in each of those."""
    held: list[str] = []

    def step(env):
        if env.job_id not in held:
            held.append(env.job_id)
            del held[:-100]  # the core keeps its newest jobs (protocol/ended.py)
        return []

    async def publish(env):
        pass

    policy = AckPolicy(step, publish, holds=lambda job_id: job_id in held)
    hello = sign(join(job=""), ALICE)  # outside any job: stays bound
    assert (await policy(Delivery(m.encode(hello), {}))).verdict is Verdict.ACK
    most = 0
    for j in range(1000):
        for sender in ("buyer", "owner-1", "owner-2"):
            env = sign(join(sender=sender, job=f"job-{j}"), ALICE)
            assert (await policy(Delivery(m.encode(env), {}))).verdict is Verdict.ACK
        most = max(most, len(policy.keyring.bound))
    assert most < 2 * 3 * 100 + 3 + 256 + 3  # bounded by the jobs held, not the 3,000 bindings ever made
    assert all((job, sender) in policy.keyring.bound for job in held for sender in ("buyer", "owner-1", "owner-2"))
    assert ("", "owner-1") in policy.keyring.bound
    forged = await policy(Delivery(m.encode(sign(join(sender="owner-2", job=held[0]), MALLORY)), {}))
    assert forged.reason.startswith("unauthenticated: forged sender")


def test_an_agent_trims_its_keyring_by_the_jobs_its_core_holds():
    from deltaml.agents.agent import Agent
    from deltaml.agents.bus import MemoryBus
    from deltaml.agents.ledger import Chain, LedgerCore
    from deltaml.agents.parties import aggregator_core
    from deltaml.protocol.chain import LEDGER
    from deltaml.protocol.machine import Context

    core = aggregator_core(wallet=load_wallet(None))
    assert Agent("aggregator", "aggregator", core, MemoryBus()).policy.holds == core.holds
    assert not core.holds("job-1")
    ledger = LedgerCore(Context(LEDGER), Chain("embedded"))
    assert Agent("ledger", LEDGER, ledger, MemoryBus()).policy.holds == ledger.holds  # the jobs whose parties it keeps


async def test_a_message_for_an_ended_job_is_dead_lettered_without_a_warning():
    from structlog.testing import capture_logs

    from deltaml.protocol.errors import JobOver

    def step(env):
        raise JobOver("ended") if env.payload.rows == 1 else InvalidTransition("out of turn")

    async def publish(env):
        pass

    policy = AckPolicy(step, publish)
    with capture_logs() as logs:
        late = await policy(Delivery(m.encode(sign(join(rows=1), ALICE)), {}))
        wrong = await policy(Delivery(m.encode(sign(join(), ALICE)), {}))
    assert late.verdict is wrong.verdict is Verdict.DEAD_LETTER
    assert late.reason == "JobOver: ended" and wrong.reason == "InvalidTransition: out of turn"
    assert [e["reason"] for e in logs if e["log_level"] == "warning"] == ["out of turn"]


def test_role_urls_use_the_roles_broker_users():
    url = "amqp://guest:guest@127.0.0.1:5672/"
    assert t.role_url(url, "owner") == "amqp://deltaml-owner:deltaml-owner@127.0.0.1:5672/"
    assert t.role_url("amqp://127.0.0.1/", "owner") == "amqp://127.0.0.1/"
    with pytest.raises(ValueError):
        t.role_url(url, "root")


async def test_a_redelivered_message_is_answered_again_and_a_mere_duplicate_is_not():
    sent = []

    async def publish(env):
        sent.append(env.message_id)

    answer = join(sender="aggregator")
    policy = AckPolicy(lambda env: [answer], publish)
    body = m.encode(sign(join(), ALICE))
    for redelivered in (False, False, True):
        assert (await policy(Delivery(body, {}, redelivered=redelivered))).verdict is Verdict.ACK
    assert sent == [answer.message_id, answer.message_id]  # first handling, then the broker's redelivery


@pytest.mark.parametrize("other", [
    # found by the fuzzer: a stranger's message under an honest message's id was acknowledged as a duplicate
    {"sender": "owner-9"},
    # found by the fuzzer too: a name is bound to a signer per job, so "owner-1" of another job may be
    # another party, and its message under a handled message's id was acknowledged as a duplicate
    {"job_id": "job-2"},
])
async def test_a_handled_message_id_reused_by_another_sender_or_in_another_job_is_judged_on_its_own(other):
    handled = []

    def step(env):
        handled.append((env.job_id, env.sender))
        return []

    async def publish(env):
        pass

    policy = AckPolicy(step, publish)
    honest = join()
    assert (await policy(Delivery(m.encode(sign(honest, ALICE)), {}))).verdict is Verdict.ACK
    stranger = honest.model_copy(update=other)
    assert (await policy(Delivery(m.encode(sign(stranger, MALLORY)), {}))).reason != "duplicate"
    assert (await policy(Delivery(m.encode(sign(honest, ALICE)), {}))).reason == "duplicate"
    assert handled == [("job-1", "owner-1"), (stranger.job_id, stranger.sender)]


def test_a_key_file_others_may_read_or_that_holds_no_valid_key_is_refused(tmp_path):
    """Whoever reads the file signs for the party and withdraws its pay (ssh refuses such a file too);
    a key of zero used to pass the load and fail in a traceback once the daemon first signed."""
    path = tmp_path / "owner.key"
    created = load_wallet(path)
    assert path.stat().st_mode & 0o777 == 0o600 and load_wallet(path).address == created.address
    path.chmod(0o644)
    with pytest.raises(ValueError, match=r"others may read \(mode 644\); chmod 600"):
        load_wallet(path)
    for bad in ("00" * 32, "ff" * 32):
        path.chmod(0o600)
        path.write_text(json.dumps({"private_key": bad}))
        with pytest.raises(ValueError, match="not a secp256k1 private key"):
            load_wallet(path)
    path.write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="not a DeltaML Ethereum key file"):
        load_wallet(path)
