"""The ledger agent: it relays only what the right party signed, and only verified metrics.

Then the whole job against a real anvil node started here (npm @foundry-rs/anvil), with the
contract's balances read back from that node rather than from the report.
"""

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from web3 import Web3

from deltaml.agents.agent import Agent
from deltaml.agents.amqp import AmqpBus
from deltaml.agents.bus import Outcome, Verdict
from deltaml.agents.ledger import FAUCET_TOPUP, Chain, ChainUnavailable, LedgerCore
from deltaml.agents.ledger.node import MAX_TIP, PATIENCE, TIP, NonceAhead, shown
from deltaml.agents.parties import aggregator_core, buyer_core, context, load_wallet
from deltaml.agents.runtime import run_buyer_job
from deltaml.agents.topology import PROGRESS, address_recipient
from deltaml.marketplace import DemoConfig, baselines, make_spec, prepare_parts, run_demo
from deltaml.protocol.buyer import BuyerPhase
from deltaml.protocol.owner import OwnerCore, OwnerData
from deltaml.protocol import messages as m
from deltaml.protocol.chain import LEDGER, METRICS_PER_TX, artifact, job_key, key_hash, metric_args, parse_tx
from deltaml.protocol.auth import sign, sign_encoded
from deltaml.protocol.errors import ProtocolError
from deltaml.protocol.machine import Context

ROOT = Path(__file__).resolve().parents[1]
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
AN_ADDRESS = "0x000000000000000000000000000000000000bEEF"


class Party:
    def __init__(self, name, ledger):
        self.ctx = Context(name, wallet=load_wallet(None))
        self.ledger = ledger
        self.events: list[m.Envelope] = []
        self.receipts: list[m.TxReceipt] = []
        self.deliver(ledger.handle(self.ctx.wallet.hello(self.ctx)))

    @property
    def address(self):
        return self.ctx.wallet.address

    def deliver(self, envelopes):
        """What the bus would route to this party's queue: its name's and its address's messages."""
        for env in envelopes:
            if env.recipient not in (self.ctx.name, address_recipient(self.address)):
                continue
            if env.type == "chain_info":
                self.ctx.wallet.on_info(self.ctx, env.payload)
            elif env.type == "tx_receipt":
                self.ctx.wallet.on_receipt(env.payload)
                self.receipts.append(env.payload)
            else:
                self.events.append(env)

    def call(self, job_id, function, args, value=0, proof=None, everyone=(), participants=None):
        [request] = self.ctx.wallet.call(self.ctx, job_id, 0, function, args, value=value, proof=proof,
                                         participants=participants)
        out = self.ledger.handle(sign(request, self.ctx.wallet.private_key))  # as its agent publishes it
        for p in dict.fromkeys((self, *everyone)):  # each once, as a queue gets each message once
            p.deliver(out)
        return self.receipts[-1]


@pytest.fixture(scope="module")
def ledger():
    return LedgerCore(Context(LEDGER), Chain("embedded"))


@pytest.fixture
def training(ledger, keypair):
    """A job in training: created, staffed, every participant confirmed, all through the ledger."""
    pub, _ = keypair
    job = f"job-{time.monotonic_ns()}"
    buyer, agg = Party(f"buyer-{job}", ledger), Party(f"aggregator-{job}", ledger)
    owners = [Party(f"owner-{i}-{job}", ledger) for i in range(3)]
    everyone = (buyer, agg, *owners)
    deadline = ledger.chain.w3.eth.get_block("latest")["timestamp"] + 3600
    r = buyer.call(job, "createJob", [job_key(job), agg.address, 3, 1, 10, 100, deadline, key_hash(pub)],
                   value=130, everyone=everyone)
    assert r.ok, r.reason
    assert [e.payload.event for e in agg.events] == ["JobCreated"]  # the aggregator hears of it
    assert agg.call(job, "setParticipants", [job_key(job), [o.address for o in owners[:2]], [owners[2].address]],
                    everyone=everyone).ok
    for o in owners:
        assert o.call(job, "confirm", [job_key(job)], everyone=everyone).ok
    assert "TrainingStarted" in [e.payload.event for e in agg.events]
    return job, buyer, agg, owners


def metric_call(job, keypair, sse=12345 << 64, tamper=None, round_=0, model=0):
    pub, priv = keypair
    c = pub.encrypt(sse)
    dec = priv.decrypt_verifiably(c)
    plain, rand, cipher, key = dec.plaintext, dec.randomness, c, pub.to_hex()
    if tamper == "plaintext":
        plain += 1
    elif tamper == "randomness":
        rand = rand * 2 % pub.n
    elif tamper == "ciphertext":
        cipher = pub.encrypt(sse)  # same plaintext, another ciphertext: the hash no longer matches
    args = metric_args(job, round_, model, c, plain, 64, 10, rand)
    return args, m.MetricProof(ciphertext=cipher, public_key=key)


@pytest.mark.parametrize("tamper", ["plaintext", "randomness", "ciphertext", "no proof", "other key"])
def test_a_wrong_metric_proof_is_refused_and_nothing_is_recorded(ledger, training, keypair, tamper):
    job, buyer, agg, owners = training
    args, proof = metric_call(job, keypair, tamper=tamper if tamper in ("plaintext", "randomness", "ciphertext")
                              else None)
    if tamper == "no proof":
        proof = None
    if tamper == "other key":
        proof = m.MetricProof(ciphertext=proof.ciphertext, public_key=format(int(proof.public_key, 16) + 2, "x"))
    receipt = agg.call(job, "recordMetric", args, proof=proof)
    assert not receipt.mined and not receipt.ok and receipt.reason.startswith("refused by the ledger")
    assert not ledger.chain.contract.functions.metricOf(job_key(job), 0, 0).call()[3]
    # the refused transaction did not use up the aggregator's nonce: the honest one goes through next
    args, proof = metric_call(job, keypair)
    assert agg.call(job, "recordMetric", args, proof=proof, everyone=(buyer,)).ok
    recorded = [e for e in buyer.events if e.payload.event == "MetricRecorded"]
    assert recorded and recorded[-1].payload.args["mseMicro"] == 12345 * 10**6 // 10


@pytest.mark.parametrize("fault", ["one tampered", "one proof missing", "a single proof"])
def test_a_batch_of_metrics_needs_a_valid_proof_for_each_or_nothing_is_recorded(ledger, training, keypair, fault):
    job, buyer, agg, owners = training
    calls = [metric_call(job, keypair, sse=(12345 + k) << 64, round_=1, model=k,
                         tamper="randomness" if fault == "one tampered" and k == 2 else None) for k in range(3)]
    args = [job_key(job), [a[1] for a, _ in calls]]
    proofs = [p for _, p in calls]
    proof = {"one tampered": proofs, "one proof missing": proofs[:2], "a single proof": proofs[0]}[fault]
    receipt = agg.call(job, "recordMetrics", args, proof=proof)
    assert not receipt.mined and receipt.reason.startswith("refused by the ledger")
    assert not any(ledger.chain.contract.functions.metricOf(job_key(job), 1, k).call()[3] for k in range(3))
    calls = [metric_call(job, keypair, sse=(12345 + k) << 64, round_=1, model=k) for k in range(3)]
    args = [job_key(job), [a[1] for a, _ in calls]]
    assert agg.call(job, "recordMetrics", args, proof=[p for _, p in calls], everyone=(buyer,)).ok
    recorded = [e.payload.args for e in buyer.events if e.payload.event == "MetricRecorded"]
    assert [(r["model"], r["mseMicro"]) for r in recorded] == [(k, (12345 + k) * 10**6 // 10) for k in range(3)]


def test_a_transaction_signed_by_someone_else_is_refused(ledger, training):
    job, buyer, agg, owners = training
    [request] = owners[0].ctx.wallet.call(owners[0].ctx, job, 0, "settle", [job_key(job)], participants=3)
    forged = request.model_copy(update={"sender": agg.ctx.name})
    with pytest.raises(ProtocolError, match="not by aggregator"):
        ledger.handle(forged)


def test_a_ledger_restarted_without_its_state_relays_for_the_parties_and_jobs_of_the_one_before(
        ledger, training, keypair):
    """A fresh ledger on the same escrow knows no name and no job. It used to refuse every request
    ("has not greeted the ledger") and could tell an event to no one; now a request is taken from
    the address that signed it, and the job's parties and its buyer and aggregator are read from
    the contract: a metric reaches those two, the job given up reaches everyone."""
    job, buyer, agg, owners = training
    fresh = LedgerCore(Context(LEDGER), ledger.chain)
    everyone = (buyer, agg, *owners)
    for party in everyone:
        party.ledger, party.events = fresh, []
    [request] = owners[0].ctx.wallet.call(owners[0].ctx, job, 0, "settle", [job_key(job)], participants=3)
    with pytest.raises(ProtocolError, match=f"not by {owners[0].ctx.name}'s address"):
        fresh.handle(sign(request, buyer.ctx.wallet.private_key))  # someone else's envelope around it
    assert owners[0].ctx.name not in fresh.addresses  # a refusal binds no name to an address

    args, proof = metric_call(job, keypair)
    receipt = agg.call(job, "recordMetric", args, proof=proof, everyone=everyone)
    assert receipt.ok, receipt.reason
    assert fresh.parties[job] == {p.address.lower() for p in everyone}  # from the contract
    assert fresh.principals[job] == {buyer.address.lower(), agg.address.lower()}
    assert fresh.addresses == {agg.ctx.name: agg.address}
    assert agg.call(job, "abandon", [job_key(job), 0], everyone=everyone).ok
    for party in everyone:
        heard = ["MetricRecorded", "Abandoned"] if party in (buyer, agg) else ["Abandoned"]
        assert [e.payload.event for e in party.events] == heard, party.ctx.name
        assert {e.recipient for e in party.events} == {address_recipient(party.address)}


def test_on_the_embedded_chain_asking_for_a_transaction_reads_no_block_however_long_the_chain(monkeypatch):
    """Before it sends a transaction the ledger asks whether the chain mined it already (a request
    delivered again). eth-tester answers "no" by reading every block back from the head: 146 ms
    with 1,000 blocks, so the ledger slowed with each job relayed. py-evm's index says it at once;
    a transaction mined long ago is still found, with its receipt."""
    chain_ = Chain("embedded")
    to = Web3.to_checksum_address("0x" + "11" * 20)
    first = chain_.w3.eth.send_transaction({"from": chain_.faucet, "to": to, "value": 1, "gas": 21_000})
    for _ in range(40):
        chain_.w3.eth.send_transaction({"from": chain_.faucet, "to": to, "value": 1, "gas": 21_000})
    reads, evm = [], chain_.w3.provider.ethereum_tester.backend.chain
    read = evm.get_canonical_block_by_number
    monkeypatch.setattr(evm, "get_canonical_block_by_number", lambda n: reads.append(n) or read(n))
    assert chain_.mined(b"\x42" * 32) is None and chain_.held("0x" + "42" * 32) is None
    assert reads == []
    receipt = chain_.mined(first)
    assert receipt is not None and bytes(receipt.transactionHash) == bytes(first) and receipt.status == 1
    assert chain_.held(first).nonce == chain_.w3.eth.get_transaction(first)["nonce"]


def test_a_transaction_for_another_job_than_its_envelope_is_refused(ledger, training):
    job, buyer, agg, owners = training
    receipt = agg.call("some-other-job", "settle", [job_key(job)], participants=3)
    assert not receipt.mined and "another job" in receipt.reason


def test_a_revert_is_reported_with_the_contracts_reason(ledger, training):
    job, buyer, agg, owners = training
    receipt = owners[0].call(job, "settle", [job_key(job)], participants=3)  # not complete, deadline not passed
    assert not receipt.ok and "TooEarly" in receipt.reason
    # with the error's arguments: confirming again, once training has begun, names the state it is in
    again = owners[0].call(job, "confirm", [job_key(job)])
    assert not again.ok and again.reason == "WrongState(Training)", again.reason  # State 3, by its name
    assert owners[0].call(job, "confirm", [job_key(job)]).reason  # confirming twice is refused too


def test_a_redelivered_transaction_gets_its_receipt_and_events_not_a_used_nonce(ledger, keypair):
    """The ledger stopped after the chain mined a transaction and before it published what happened;
    the broker delivers the request again. The chain holds the effect: the signer must hear that it
    went through (not that its nonce is used) and the job's parties must get the events, once mined."""
    pub, _ = keypair
    job = f"job-{time.monotonic_ns()}"
    buyer, agg = Party(f"buyer-{job}", ledger), Party(f"aggregator-{job}", ledger)
    deadline = ledger.chain.w3.eth.get_block("latest")["timestamp"] + 3600
    [request] = buyer.ctx.wallet.call(buyer.ctx, job, 0, "createJob",
                                      [job_key(job), agg.address, 3, 1, 10, 100, deadline, key_hash(pub)], value=130)
    first = ledger.handle(request)  # mined, and then everything it said is lost
    nonce = ledger.chain.nonce(buyer.address)
    again = ledger.handle(request)
    for p in (buyer, agg):
        p.deliver(again)
    [receipt] = buyer.receipts
    assert receipt.ok and receipt.reason == ""
    assert receipt.tx_hash == next(e.payload.tx_hash for e in first if e.type == "tx_receipt")
    assert [e.payload.event for e in agg.events] == ["JobCreated"]
    assert ledger.chain.nonce(buyer.address) == nonce  # nothing was sent a second time


@pytest.fixture(scope="module")
def many_owners_job(ledger, keypair):
    """A paid job of 30 owners through the ledger, from its escrow to its settlement, each party
    hearing what the bus would route to it: (job, buyer, aggregator, owners, settle's receipt)."""
    pub, _ = keypair
    n, job = 30, f"job-{time.monotonic_ns()}"
    buyer, agg = Party(f"buyer-{job}", ledger), Party(f"aggregator-{job}", ledger)
    owners = [Party(f"owner-{i}-{job}", ledger) for i in range(n)]
    everyone = (buyer, agg, *owners)
    deadline = ledger.chain.w3.eth.get_block("latest")["timestamp"] + 3600
    assert buyer.call(job, "createJob", [job_key(job), agg.address, n, 1, 10, 100, deadline, key_hash(pub)],
                      value=10 * n + 100, everyone=everyone).ok
    staffed = agg.call(job, "setParticipants", [job_key(job), [o.address for o in owners[:-1]], [owners[-1].address]],
                       everyone=everyone)
    assert staffed.ok, staffed.reason
    for o in owners:
        assert o.call(job, "confirm", [job_key(job)], everyone=everyone).ok
    args, proof = metric_call(job, keypair, round_=0)
    assert agg.call(job, "recordMetric", args, proof=proof, everyone=everyone).ok
    final = [metric_call(job, keypair, sse=(12345 - k) << 64, round_=1, model=k) for k in range(n)]  # full + LOO
    for start in range(0, n, METRICS_PER_TX):
        batch = final[start:start + METRICS_PER_TX]
        recorded = agg.call(job, "recordMetrics", [job_key(job), [a[1] for a, _ in batch]], proof=[p for _, p in batch],
                            everyone=everyone)
        assert recorded.ok, recorded.reason
    settled = agg.call(job, "settle", [job_key(job)], participants=n, everyone=everyone)
    assert settled.ok, settled.reason
    return job, buyer, agg, owners, settled


def test_a_paid_job_with_many_owners_fits_the_gas_its_parties_sign_for(many_owners_job):
    """setParticipants and settle loop over the participants: the gas the aggregator signs for grows
    with them (a fixed limit failed a paid job of 14 owners with a bare "reverted")."""
    *_, settled = many_owners_job
    assert settled.gas_used > 1_000_000  # a job this size needs what the old fixed limits did not give


def test_a_jobs_events_go_to_the_parties_they_concern_so_they_grow_with_its_owners_not_their_square(
        many_owners_job):
    """Each of 30 owners' confirmation and credit and each of the 31 metrics went to all 32 parties:
    2,900 messages, nearly all to owners whose cores drop them (31,000 for 100 owners). An owner
    hears its job staffed, started and settled, and its own confirmation and credit; the buyer and
    the aggregator, who run the job, hear everything."""
    job, buyer, agg, owners, _ = many_owners_job
    everything = [e.payload.event for e in buyer.events]
    assert [e.payload.event for e in agg.events] == everything
    assert everything.count("Confirmed") == everything.count("Credited") == len(owners)
    assert everything.count("MetricRecorded") == len(owners) + 1
    for o in owners:
        heard = [(e.payload.event, e.payload.args.get("participant") or e.payload.args.get("payee")) for e in o.events]
        assert heard == [("ParticipantsSet", None), ("Confirmed", o.address), ("TrainingStarted", None),
                         ("Credited", o.address), ("Settled", None)], o.ctx.name
    sent = len(buyer.events) + len(agg.events) + sum(len(o.events) for o in owners)
    assert sent == 2 * len(everything) + 5 * len(owners)  # against (len(owners) + 2) * len(everything) before


def test_a_settled_job_leaves_nothing_in_the_ledgers_state(ledger, many_owners_job):
    """A ledger kept every job's parties, key and gas for ever and wrote them with each message
    (``--state-dir``): its state grew with every job it relayed. A job settled (or cancelled) is
    dropped; the gas is kept as totals per function."""
    job, *_ = many_owners_job
    assert job not in ledger.parties and job not in ledger.principals and job_key(job) not in ledger.jobs
    assert not ledger.holds(job)
    assert all(set(totals) == {"calls", "total", "max"} for totals in ledger.gas.values())
    report = ledger.gas_report()
    assert report["confirm"]["calls"] >= 30 and report["settle"]["total"] >= report["settle"]["max"] > 1_000_000


def test_a_settle_delivered_again_after_the_ledger_dropped_its_job_reaches_every_party(ledger, training):
    """Redelivered once the job was dropped, the settle is answered from the chain, and its events
    go to the parties read back from the contract; the job is dropped again after."""
    job, buyer, agg, owners = training
    assert agg.call(job, "abandon", [job_key(job), 0]).ok
    [request] = agg.ctx.wallet.call(agg.ctx, job, 0, "settle", [job_key(job)], participants=3)
    signed = sign(request, agg.ctx.wallet.private_key)
    first = ledger.handle(signed)
    assert [e.payload.event for e in first if e.type == "chain_event" and e.recipient == PROGRESS] == ["Settled"]
    assert job not in ledger.parties
    again = ledger.handle(signed)
    told = {e.recipient for e in again if e.type == "chain_event" and e.payload.event == "Settled"}
    assert told == {PROGRESS, *(address_recipient(p.address) for p in (buyer, agg, *owners))}
    assert job not in ledger.parties and job not in ledger.principals


def test_gas_saved_as_a_list_per_call_is_read_as_totals():
    from deltaml.agents.ledger import _gas_totals

    assert _gas_totals([50_000, 70_000, 60_000]) == {"calls": 3, "total": 180_000, "max": 70_000}
    assert _gas_totals({"calls": 1, "total": 5, "max": 5}) == {"calls": 1, "total": 5, "max": 5}


@pytest.mark.parametrize("event, args, audience", [
    ("ParticipantsSet", {}, {"0xb", "0xa", "0x1", "0x2"}),
    ("Abandoned", {}, {"0xb", "0xa", "0x1", "0x2"}),
    ("Dropped", {"trainer": "0x2"}, {"0xb", "0xa", "0x2"}),
    ("Credited", {"payee": "0x1"}, {"0xb", "0xa", "0x1"}),
    ("MetricRecorded", {}, {"0xb", "0xa"}),
])
def test_an_event_goes_to_every_party_or_to_the_one_it_names_and_the_principals(event, args, audience):
    from deltaml.protocol.chain import event_audience

    assert event_audience(event, args, {"0xb", "0xa", "0x1", "0x2"}, {"0xb", "0xa"}) == audience


def test_a_transaction_out_of_gas_says_so(ledger, keypair, monkeypatch):
    from deltaml.protocol import chain

    pub, _ = keypair
    job = f"job-{time.monotonic_ns()}"
    buyer, agg = Party(f"buyer-{job}", ledger), Party(f"aggregator-{job}", ledger)
    owners = [Party(f"owner-{i}-{job}", ledger) for i in range(3)]
    deadline = ledger.chain.w3.eth.get_block("latest")["timestamp"] + 3600
    assert buyer.call(job, "createJob", [job_key(job), agg.address, 3, 1, 10, 100, deadline, key_hash(pub)],
                      value=130, everyone=(agg,)).ok
    monkeypatch.setitem(chain.GAS_LIMITS, "setParticipants", 60_000)
    monkeypatch.setitem(chain.GAS_PER_PARTICIPANT, "setParticipants", 0)
    receipt = agg.call(job, "setParticipants", [job_key(job), [o.address for o in owners[:2]], [owners[2].address]])
    assert not receipt.ok and receipt.reason == "out of gas (the transaction's limit: 60000)"


def test_a_call_whose_gas_depends_on_the_participants_must_name_them():
    from deltaml.protocol.chain import gas_limit

    with pytest.raises(ValueError, match="participants"):
        gas_limit("settle", [b"k"])
    assert gas_limit("settle", [b"k"], participants=40) > gas_limit("settle", [b"k"], participants=5)
    assert gas_limit("setParticipants", [b"k", ["a"] * 39, ["b"]]) > gas_limit("setParticipants", [b"k", ["a"] * 4, ["b"]])


def test_the_ledger_takes_only_its_messages(ledger):
    env = m.Envelope(message_id="x", job_id="j", sender="buyer", recipient=LEDGER, payload=m.Failure(reason="?"))
    with pytest.raises(ProtocolError):
        ledger.handle(env)
    hello = m.Envelope(message_id="y", job_id="", sender="z", recipient=LEDGER,
                       payload=m.ChainHello(address="0xnot-an-address"))
    with pytest.raises(ProtocolError):
        ledger.handle(hello)


def test_no_node_at_the_url_is_one_clear_error():
    with pytest.raises(ChainUnavailable, match="no Ethereum node answers"):
        Chain("http://127.0.0.1:1")


def test_a_nodes_url_is_shown_without_what_may_be_an_api_key():
    """RPC providers put the API key in the URL's path, query or user part; the error said the
    URL whole, and a daemon's log kept it."""
    with pytest.raises(ChainUnavailable) as refused:
        Chain("http://user:s3cret@127.0.0.1:1/v3/0123abcd?key=zz9")
    assert "at http://127.0.0.1:1/… (" in str(refused.value)
    assert not any(secret in str(refused.value) for secret in ("s3cret", "0123abcd", "zz9", "user"))
    assert shown("http://127.0.0.1:8545") == "http://127.0.0.1:8545" and shown("nonsense") == "the given URL"


# ---- the whole job against a real anvil ----------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def anvil_node(*flags):
    """A real anvil on a free port: (url, web3), stopped at the end."""
    binary = ROOT / "contracts/node_modules/.bin/anvil"
    assert binary.exists() and shutil.which("node"), "make test installs @foundry-rs/anvil first"
    port = free_port()
    proc = subprocess.Popen([str(binary), "--port", str(port), "--silent", *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        w3 = Web3(Web3.HTTPProvider(url))
        for _ in range(100):
            if w3.is_connected():
                break
            time.sleep(0.1)
        assert w3.is_connected(), "anvil did not start"
        yield url, w3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def anvil():
    with anvil_node() as node:
        yield node


def test_a_whole_job_settles_on_a_real_anvil_node(anvil, keypair):
    url, w3 = anvil
    report = run_demo(DemoConfig(rounds=2, eval_every=1, chain=url), "amqp", keypair=keypair)
    chain = report["chain"]
    assert chain["chain_id"] == 31337 and chain["url"] == url
    escrow = w3.eth.contract(address=chain["contract"], abi=artifact()["abi"])
    assert w3.eth.get_balance(escrow.address) == 0
    payees = [*report["payments_wei"], report["buyer_address"]]
    assert all(escrow.functions.credit(a).call() == 0 for a in payees)
    # every Withdrawn on anvil's own log matches the report, to the wei
    logs = escrow.events.Withdrawn().get_logs(from_block=0)
    withdrawn = {}
    for log in logs:
        withdrawn[log.args.payee] = withdrawn.get(log.args.payee, 0) + log.args.amount
    assert withdrawn.pop(report["buyer_address"]) == report["refund_wei"]
    assert withdrawn == report["payments_wei"]
    assert sum(report["payments_wei"].values()) + report["refund_wei"] == report["deposit_wei"]
    assert report["settlement_as_predicted"]


def test_a_ledger_given_a_contract_uses_only_this_versions_escrow(anvil):
    """``deltaml ledger --contract ADDRESS`` on a real node: an address without code would take a
    buyer's deposit as a plain transfer that nothing could give back, and other code would not
    enforce this version's rules."""
    url, w3 = anvil
    deployed = Chain(url)
    assert Chain(url, contract=deployed.address).address == deployed.address
    payee = artifact("ReentrantPayee")
    other = w3.eth.contract(abi=payee["abi"], bytecode=payee["bytecode"])
    elsewhere = w3.eth.wait_for_transaction_receipt(
        other.constructor(deployed.address).transact({"from": w3.eth.accounts[0]})).contractAddress
    for contract, reason in [("0x1234", "not an Ethereum address"),
                             (w3.eth.accounts[1], "no contract at that address"),
                             (elsewhere, "holds other code than this version's DeltaEscrow")]:
        with pytest.raises(ChainUnavailable, match=reason):
            Chain(url, contract=contract)


def test_on_a_chain_that_mines_blocks_the_ledger_does_not_wait_for_each_receipt():
    """A node that mines a block every few seconds (a testnet, anvil --block-time): the ledger sent
    a transaction and waited for its receipt, holding every other party's request, so a job's
    transactions were mined one block each. It now sends, goes on, and answers each signer at
    its first tick after the block: two parties' transactions go into one block. Greetings alike:
    each waited for its faucet transfer (seven blocks before a job's first transaction); now the
    parties greeting together are funded in one block, and each answered once it can pay."""
    with ledger_without_mining() as (w3, mine, core):
        parties = [Party(f"p{k}-{uuid.uuid4().hex[:6]}", core) for k in range(2)]
        assert all(p.ctx.wallet.chain_id is None for p in parties)  # not answered: not funded yet
        assert len(core.pending) == 2 and core.tick(1.0) == []
        again = core.handle(parties[0].ctx.wallet.hello(parties[0].ctx))  # a greeting delivered again
        assert again == [] and len(core.pending) == 2  # its latest greeting answered when funded, once
        dropped = list(core.pending)[-1]  # (the faucet's last: no gap in its nonces)
        w3.provider.make_request("anvil_dropTransaction", [dropped])  # a top-up the node let go
        assert core.tick(1.0) == [] and len(core.pending) == 2
        assert core.chain.pooled(dropped)  # sent again (the same transfer, the same hash)
        mine()
        answered = core.tick(1.0)
        for p in parties:
            p.deliver(answered)
        assert not core.pending and all(p.ctx.wallet.chain_id == 31337 for p in parties)
        assert sorted(e.type for e in answered) == ["chain_info"] * 2
        first = [e.correlation_id for e in answered if e.recipient == parties[0].ctx.name]
        assert first == [parties[0].ctx.wallet.hello_id]  # the greeting its wallet waits for
        funded = [w3.eth.get_balance(p.address) for p in parties]
        assert funded == [FAUCET_TOPUP] * 2 and w3.eth.block_number == 2  # one block for both
        requests = [p.ctx.wallet.call(p.ctx, "j", 0, "withdraw", [])[0] for p in parties]
        started = time.monotonic()
        for p, request in zip(parties, requests):
            assert core.handle(sign(request, p.ctx.wallet.private_key)) == []  # sent, not waited for
        assert time.monotonic() - started < 30  # (it waited 60 s for the first receipt before)
        assert len(core.pending) == 2 and core.tick(1.0) == []  # nothing mined yet
        mine()
        answered = core.tick(1.0)
        for p in parties:
            p.deliver(answered)
        assert not core.pending
        receipts = [p.receipts[-1] for p in parties]
        assert all(r.mined and r.reason == "NothingToWithdraw" and r.next_nonce == 1 for r in receipts)
        blocks = {w3.eth.get_transaction_receipt(r.tx_hash).blockNumber for r in receipts}
        assert len(blocks) == 1  # one block for both


@contextlib.contextmanager
def ledger_without_mining():
    """A ledger on ``anvil --no-mining``, whose blocks the test mines: (web3, mine, ledger)."""
    with anvil_node("--no-mining") as (url, w3):
        def mine():
            w3.provider.make_request("evm_mine", [])

        deploying = threading.Timer(1.0, mine)
        deploying.start()
        core = LedgerCore(context(LEDGER), Chain(url))  # the deployment waits for its block
        deploying.join()
        yield w3, mine, core


@contextlib.contextmanager
def ledger_on_a_chain_without_mining():
    """A ledger on ``anvil --no-mining`` (blocks mined by the test), and a party greeted and funded
    through it: (web3, mine, ledger, party, its signing)."""
    from deltaml.protocol.chain import Collector
    with ledger_without_mining() as (w3, mine, core):
        party = Collector(Context(f"c-{uuid.uuid4().hex[:6]}", wallet=load_wallet(None)))
        assert core.handle(party.wallet.hello(party.ctx)) == []
        mine()
        [info] = core.tick(1.0)
        assert party.handle(info) == []
        yield w3, mine, core, party, lambda env: sign(env, party.wallet.private_key)


def base_fee_from_next_block(w3, wei):
    w3.provider.make_request("anvil_setNextBlockBaseFeePerGas", [hex(wei)])


def test_a_transaction_below_the_base_fee_is_signed_again_at_the_chains_price_not_failed():
    """A wallet signs at the gas price it learnt when it greeted the ledger. A daemon that greeted
    days ago, or a fee that rose since, meant a price below the chain's base fee: anvil refused the
    transaction and the job failed on the receipt; geth would have held it for ever. The ledger now
    sends none such. Its receipt says "sign again" with the chain's price, and the wallet signs the
    same call at the same nonce; the party's job never hears of the first. Every receipt carries
    the price to sign at (twice the base fee and a tip), which the wallet follows."""
    with ledger_on_a_chain_without_mining() as (w3, mine, core, party, signed):
        old_price = party.wallet.gas_price
        base_fee_from_next_block(w3, 20 * old_price)
        [request] = party.collect()
        [receipt] = core.handle(signed(request))
        r = receipt.payload
        assert r.sign_again and not r.mined and "below the chain's base fee" in r.reason
        assert w3.eth.get_transaction_count(party.wallet.address, "pending") == 0  # not sent
        assert len(core.replaced) == 1  # (a node may hold it all the same, sent by an earlier ledger)
        assert r.gas_price > 20 * old_price
        [again] = party.handle(receipt)
        assert party.receipts == {}  # the collector (a job) did not hear of it
        first, second = (parse_tx(bytes.fromhex(e.payload.raw[2:])) for e in (request, again))
        assert (second.nonce, second.gas_price, second.data) == (first.nonce, r.gas_price, first.data)
        assert core.handle(signed(again)) == [] and not core.replaced  # sent; mined at the next block
        mine()
        [mined] = core.tick(1.0)
        party.handle(mined)
        assert party.receipts["withdraw"].mined and party.receipts["withdraw"].reason == "NothingToWithdraw"
        assert party.wallet.nonce == 1 and party.wallet.gas_price == mined.payload.gas_price  # it follows the chain
        # an EIP-1559 transaction: it paid the block's base fee and its tip, not its whole cap
        on_chain = w3.eth.get_transaction_receipt(mined.payload.tx_hash)
        base = w3.eth.get_block(on_chain.blockNumber).baseFeePerGas
        assert w3.eth.get_transaction(mined.payload.tx_hash).type == 2 and second.tip == r.tip
        assert on_chain.effectiveGasPrice == base + second.tip < second.gas_price
        assert mined.payload.gas_price < r.gas_price  # twice the base fee: the fee falls after an empty block


@pytest.mark.parametrize("how", ["fee rose", "fee rose, mined after all", "dropped"])
def test_a_transaction_stranded_in_the_pool_is_replaced(how):
    """Sent, then the base fee rose above its price before a block took it (anvil drops such a
    transaction from its pool; geth keeps it), or the node dropped it: the ledger waited for its
    receipt for ever, and so did its signer. At its next tick the ledger now tells the signer to
    sign it again, and the same call at the same nonce and a price that replaces it in any pool
    (above the base fee, and at least 1/8 more) takes its place. If the first is mined after all
    before its replacement reaches the ledger, the replacement is answered with the first's receipt
    (one nonce, one effect)."""
    with ledger_on_a_chain_without_mining() as (w3, mine, core, party, signed):
        [request] = party.collect()
        assert core.handle(signed(request)) == [] and len(core.pending) == 1
        assert core.tick(1.0) == []  # priced right and held: it waits for its block
        first_hash = next(iter(core.pending))
        first_price = parse_tx(bytes.fromhex(request.payload.raw[2:])).gas_price
        if how == "dropped":
            w3.provider.make_request("anvil_dropTransaction", [first_hash])
        else:
            base_fee_from_next_block(w3, 20 * party.wallet.gas_price)
        [receipt] = core.tick(1.0)
        expected = "no longer holds it" if how == "dropped" else "fell below the chain's base fee"
        assert receipt.payload.sign_again and expected in receipt.payload.reason
        assert receipt.payload.gas_price > first_price * 9 // 8
        assert not core.pending and core.tick(1.0) == []
        [again] = party.handle(receipt)
        if how == "fee rose, mined after all":
            base_fee_from_next_block(w3, 1)
            mine()
            assert w3.eth.get_transaction_receipt(first_hash).status == 0  # (NothingToWithdraw)
            [answer] = core.handle(signed(again))
            assert answer.payload.tx_hash == first_hash  # the first's receipt, nothing sent
        else:
            assert core.handle(signed(again)) == []
            mine()
            [answer] = core.tick(1.0)
            assert answer.payload.tx_hash != first_hash
        party.handle(answer)
        assert party.receipts["withdraw"].mined and party.receipts["withdraw"].reason == "NothingToWithdraw"
        assert w3.eth.get_transaction_count(party.wallet.address) == 1 and not core.replaced


@contextlib.contextmanager
def blocks_too_small_for_it(w3, gas: int):
    """What a busy chain does to a transaction with a low tip (blocks full of better-paying ones),
    done on anvil: blocks whose gas limit is below the transaction's, until the ``with`` ends."""
    w3.provider.make_request("evm_setBlockGasLimit", [hex(gas - 1)])
    try:
        yield
    finally:
        w3.provider.make_request("evm_setBlockGasLimit", [hex(30_000_000)])


def test_a_transaction_left_in_the_pool_while_blocks_go_by_is_signed_again_with_twice_its_tip():
    """Priced above the base fee and still not taken: a busy chain's block producers fill their
    blocks with better tips first, and the parties' tip is a fixed 1 gwei. The ledger waited for
    it for ever, and so did its signer. Once it has stayed in the pool for ``PATIENCE`` blocks, the
    signer now signs it again with twice its tip, and the replacement takes its place and is mined.
    The next transactions go at the chain's own tip again."""
    with ledger_on_a_chain_without_mining() as (w3, mine, core, party, signed):
        [request] = party.collect()
        first = parse_tx(bytes.fromhex(request.payload.raw[2:]))
        assert core.handle(signed(request)) == [] and core.tick(1.0) == []
        [first_hash] = core.pending
        with blocks_too_small_for_it(w3, first.gas):
            for _ in range(PATIENCE - 1):
                mine()
            assert core.tick(1.0) == [] and core.chain.pooled(first_hash)  # a few blocks: it waits on
            mine()
        [receipt] = core.tick(1.0)
        r = receipt.payload
        assert r.sign_again and f"not mined in {PATIENCE} blocks at a tip of {first.tip} wei" in r.reason
        assert r.tip == 2 * first.tip == 2 * TIP and r.gas_price > first.gas_price * 9 // 8
        [again] = party.handle(receipt)
        assert party.receipts == {}  # the collector (a job) did not hear of it
        second = parse_tx(bytes.fromhex(again.payload.raw[2:]))
        assert (second.nonce, second.tip, second.data) == (first.nonce, 2 * first.tip, first.data)
        assert core.handle(signed(again)) == [] and not core.chain.pooled(first_hash)  # replaced in the pool
        mine()
        [answer] = core.tick(1.0)
        party.handle(answer)
        assert answer.payload.tx_hash != first_hash and party.receipts["withdraw"].mined
        assert w3.eth.get_transaction(answer.payload.tx_hash).maxPriorityFeePerGas == 2 * TIP
        assert w3.eth.get_transaction_count(party.wallet.address) == 1 and party.wallet.tip == TIP


def test_a_tip_is_raised_up_to_a_ceiling_and_no_further():
    """Doubled each ``PATIENCE`` blocks without end, a tip in a long spell of full blocks would
    reach hundreds of gwei; it stops at ``MAX_TIP``, and the transaction then waits."""
    from deltaml.protocol.chain import RawTx

    core = LedgerCore(context(LEDGER), Chain("embedded"))

    def sent_at(tip):
        return RawTx(sender=AN_ADDRESS, nonce=0, to=AN_ADDRESS, value=0, data=b"", gas=21_000, gas_price=3 * tip,
                     tip=tip)

    def next_tip(tip):
        return core._advice(sent_at(tip), outbid=True)[1]

    assert next_tip(TIP) == 2 * TIP and next_tip(MAX_TIP // 2) == MAX_TIP
    assert next_tip(MAX_TIP * 5 // 8) == MAX_TIP  # (not twice: 80 gwei)
    assert next_tip(MAX_TIP * 15 // 16) > MAX_TIP  # enough to replace it, the least above the ceiling
    waited = 10 * PATIENCE
    assert core._stranded(sent_at(MAX_TIP // 2), True, core.chain.base_fee, waited)[1]  # raised again
    assert core._stranded(sent_at(MAX_TIP), True, core.chain.base_fee, waited) == ("", False)  # waits


def test_a_greetings_top_up_left_in_the_pool_is_sent_again_with_twice_its_tip():
    """A greeting is answered once the faucet's transfer is mined: one left in the pool waited for
    ever, and so did the party. After ``PATIENCE`` blocks the ledger now sends it again at the same
    nonce with twice its tip, and the greeting is answered once that one is mined."""
    from deltaml.protocol.chain import Collector
    with ledger_without_mining() as (w3, mine, core):
        party = Collector(Context(f"c-{uuid.uuid4().hex[:6]}", wallet=load_wallet(None)))
        assert core.handle(party.wallet.hello(party.ctx)) == [] and core.tick(1.0) == []
        [first_hash] = core.pending
        first = core.chain.held(first_hash)
        with blocks_too_small_for_it(w3, first.gas):
            for _ in range(PATIENCE):
                mine()
        assert core.tick(1.0) == []
        [second_hash] = core.pending
        second = core.chain.held(second_hash)
        assert second_hash != first_hash and not core.chain.pooled(first_hash)
        assert (second.sender, second.nonce, second.to, second.value) == (first.sender, first.nonce, first.to,
                                                                          FAUCET_TOPUP)
        assert second.tip == 2 * first.tip and second.gas_price > first.gas_price * 9 // 8
        mine()
        [info] = core.tick(1.0)
        assert party.handle(info) == [] and party.wallet.chain_id == 31337 and not core.pending
        assert w3.eth.get_balance(party.wallet.address) == FAUCET_TOPUP


def test_a_jobs_key_hash_is_read_from_the_chain_once(ledger, training, keypair, monkeypatch):
    job, buyer, agg, owners = training
    calls = []
    real = ledger.chain.contract.functions.jobInfo

    def counting(key):
        calls.append(key)
        return real(key)

    monkeypatch.setattr(ledger.chain.contract.functions, "jobInfo", counting)
    assert ledger.chain.key_hash(job_key(job)) == key_hash(keypair[0])
    for round_ in (0, 1):
        args, proof = metric_call(job, keypair, round_=round_)
        assert agg.call(job, "recordMetric", args, proof=proof).ok
    assert calls == [job_key(job)]
    unknown = job_key(f"no-such-job-{time.monotonic_ns()}")
    assert ledger.chain.key_hash(unknown) == bytes(32) and ledger.chain.key_hash(unknown) == bytes(32)
    assert calls.count(unknown) == 2  # a job not created yet is asked again, not remembered as zero


def test_a_refund_left_behind_is_settled_and_withdrawn_by_the_buyers_key_alone(ledger, training):
    """``deltaml buyer withdraw``'s core against the ledger and the EVM: the aggregator gave the job
    up and nobody settled it (a buyer that had stopped, an aggregator that died after abandoning);
    a fresh process holding only the buyer's key settles it, then withdraws the refund."""
    from deltaml.protocol.chain import Collector, Wallet

    job, buyer, agg, owners = training
    assert agg.call(job, "abandon", [job_key(job), 0]).ok
    collector = Collector(Context(buyer.ctx.name, wallet=Wallet(private_key=buyer.ctx.wallet.private_key)))
    pending = collector.collect(job, owners=3)
    while pending:  # the bus, by hand: the ledger's answers to the collector, the collector's to the ledger
        env = pending.pop(0)
        if env.recipient == LEDGER:
            pending += ledger.handle(env)
        elif env.recipient == collector.ctx.name:
            pending += collector.handle(env)
    assert collector.done(settling=True)
    assert collector.receipts["settle"].ok and collector.receipts["withdraw"].ok
    # given up at round 0, before anyone's work was done: the whole deposit comes back
    assert collector.withdrawn_wei == 130 and ledger.chain.credit(buyer.address) == 0
    # asked again, there is nothing left: the withdraw is refused by the contract, not paid twice
    again = Collector(Context(buyer.ctx.name, wallet=Wallet(private_key=buyer.ctx.wallet.private_key)))
    pending = again.collect()
    while pending:
        env = pending.pop(0)
        pending += ledger.handle(env) if env.recipient == LEDGER else again.handle(env)
    assert not again.receipts["withdraw"].ok and "NothingToWithdraw" in again.receipts["withdraw"].reason


def test_an_aggregator_that_lost_a_job_gives_its_escrow_up_and_settles_it_after_asking(ledger, training, keypair):
    """Restarted without its --state-dir, the aggregator hears of a job it lost from a trainer's
    reply; it asks the ledger where the escrow stands (a view: no gas, no nonce) and, since the
    escrow names it and is training, abandons and settles it: the buyer's deposit comes back at
    once, less the fixed rewards only if training had verified progress (here none). A made-up job
    id is asked about too and costs nothing: the aggregator signs nothing for it."""
    from deltaml.protocol.aggregator import AggregatorCore
    from deltaml.protocol.chain import Wallet

    pub, _ = keypair
    job, buyer, agg, owners = training
    restarted = AggregatorCore(Context(agg.ctx.name, wallet=Wallet(private_key=agg.ctx.wallet.private_key)))
    reply = m.GradientReply(rows=10, gradients={"all": [pub.encrypt(0)] * 3})
    pending = [m.Envelope(message_id=f"late-{i}", job_id=j, round=3, sender=owners[0].ctx.name,
                          recipient=agg.ctx.name, payload=reply) for i, j in enumerate([job, "made-up"])]
    sent, others = [], []
    while pending:  # the bus, by hand
        env = pending.pop(0)
        if env.recipient == LEDGER:
            sent.append(env)
            pending += ledger.handle(env)
        elif env.recipient == agg.ctx.name:
            pending += restarted.handle(env)
        else:
            others.append(env)
    asked = {e.job_id for e in sent if e.type == "escrow_query"}
    signed = [(e.job_id, e.payload.function) for e in sent if e.type == "tx_request"]
    assert asked == {job, "made-up"} and signed == [(job, "abandon"), (job, "settle")]
    told = {e.recipient for e in others if e.type == "job_finished"}
    assert told == {owners[0].ctx.name}  # once each: the trainer's two jobs (one made up) are two answers
    buyer.deliver(others)
    events = [e.payload.event for e in buyer.events if e.job_id == job]
    assert events[-2:] == ["Abandoned", "Settled"]
    assert ledger.chain.credit(buyer.address) == 130  # the whole deposit: no verified progress yet
    assert restarted.lost.asked == {} and restarted.wallet.sent == {}  # every answer and receipt taken
    # the ledger says the same of every job it has not seen, and of one settled already
    for job_id, state in [("made-up", "None"), (job, "Settled")]:
        query = m.Envelope(message_id=f"q-{job_id}", job_id=job_id, sender="anyone", recipient=LEDGER,
                           payload=m.EscrowQuery())
        (answer,) = ledger.handle(query)
        assert (answer.recipient, answer.correlation_id, answer.payload.state) == ("anyone", query.message_id, state)


# ---- a ledger daemon killed mid-job and restarted (real broker, real anvil) ------------------

def _ledger_daemon(tmp_path, *args, level="warning"):
    """``deltaml ledger`` as its own process; its stderr in ledger.log."""
    log = open(tmp_path / "ledger.log", "ab")  # the child keeps its own descriptor
    try:
        return subprocess.Popen([sys.executable, "-m", "deltaml.cli", "ledger", "--log-level", level, *args],
                                cwd=ROOT, stderr=log, stdout=log)
    finally:
        log.close()


@pytest.mark.parametrize("restart", ["state-dir", "contract"])
async def test_a_ledger_killed_mid_job_goes_on_with_the_same_escrow(anvil, keypair, tmp_path, restart):
    """A restarted ledger knew none of the parties that had greeted it ("has not greeted the
    ledger": every later transaction dead-lettered, the job stuck in settlement) and deployed a
    new escrow besides. With ``--state-dir`` it goes on with the same escrow and the same parties;
    given only the escrow (``--contract``), it takes each party from the address that signs its
    requests, reads the job's parties from the contract and tells them its events by address."""
    url, w3 = anvil
    pub, priv = keypair
    config = DemoConfig(rounds=4, eval_every=1)
    data, parts = prepare_parts(config)
    tag = uuid.uuid4().hex[:6]
    agg_name, buyer_name = f"aggregator-{tag}", f"buyer-{tag}"
    if restart == "state-dir":  # the README's way: the ledger keeps its key in its state directory
        (tmp_path / "ledger-state").mkdir(mode=0o700)
        ledger_address = load_wallet(tmp_path / "ledger-state" / "ledger.key").address
        state = ["--chain", url, "--state-dir", str(tmp_path / "ledger-state")]
    else:
        ledger_address = load_wallet(tmp_path / "ledger.key").address
        state = ["--chain", url, "--key", str(tmp_path / "ledger.key")]
    daemon = _ledger_daemon(tmp_path, *state)
    bus = await AmqpBus(AMQP_URL).connect()
    agents = []
    try:
        while not await bus.consumers("ledger", LEDGER):
            assert daemon.poll() is None, (tmp_path / "ledger.log").read_text()
            await asyncio.sleep(0.1)
        pinned = {LEDGER: ledger_address}
        aggregator = Agent("aggregator", agg_name, aggregator_core(agg_name, wallet=load_wallet(None)), bus,
                           pinned=pinned, tick_seconds=0.1)
        pinned = {**pinned, agg_name: aggregator.address}
        agents.append(aggregator)
        for i, part in enumerate(parts, 1):
            name = f"owner-{i}-{tag}"
            core = OwnerCore(context(name, wallet=load_wallet(None)), OwnerData(part.columns, part.table()))
            agents.append(Agent("owner", name, core, bus, pinned=pinned))
        buyer = Agent("buyer", buyer_name, buyer_core(buyer_name, priv, wallet=load_wallet(None)), bus, pinned=pinned)
        agents.append(buyer)
        for agent in agents:
            await agent.start()
        job_id = uuid.uuid4().hex
        task = asyncio.create_task(run_buyer_job(buyer, make_spec(config, data, pub.to_hex(), buyer_name),
                                                 aggregator=agg_name, job_id=job_id))
        while job_id not in buyer.core.jobs or 1 not in buyer.core.jobs[job_id].published:
            assert not task.done(), task.result().reason  # (by round 1 the deposit and metrics are on chain)
            await asyncio.sleep(0.05)
        daemon.kill()
        daemon.wait(10)
        if restart == "contract":
            [first] = [line for line in (tmp_path / "ledger.log").read_text().splitlines()
                       if line.startswith("ledger: escrow contract")]
            state += ["--contract", first.split()[3]]
        daemon = _ledger_daemon(tmp_path, *state)
        job = await asyncio.wait_for(task, timeout=300)
        assert job.phase is BuyerPhase.FINISHED, job.reason
        assert job.settled and job.withdrawn
        assert sum(job.payments_wei.values()) + job.refund_wei == job.spec.deposit_wei
        expected = baselines(parts, config)["centralized_gd_mse"]
        assert abs(job.published[config.rounds]["all"] - expected) / expected < 1e-6
        started = [line for line in (tmp_path / "ledger.log").read_text().splitlines()
                   if line.startswith("ledger: escrow contract")]
        assert len(started) == 2 and started[0] == started[1]  # the same escrow, not a second one
        escrow = w3.eth.contract(address=started[0].split()[3], abi=artifact()["abi"])
        assert escrow.functions.credit(job.buyer_address).call() == 0  # the refund came back out
    finally:
        for agent in agents:
            await agent.stop()
        daemon.terminate()
        daemon.wait(10)
        await bus.close()


def test_a_ledger_signs_as_the_same_address_after_a_restart(anvil, tmp_path):
    """The parties take the ledger's word only from the address that first signed it. Without
    ``--key`` a restarted ledger signed with a new one, and every receipt and event it sent was
    refused as forged: the job stalled in settlement (found by hand). With ``--state-dir`` it keeps
    its key there; given only ``--contract`` it says in one line what a key of its own costs."""
    url, _ = anvil
    state = tmp_path / "ledger-state"
    signed_as = []
    for args in (["--state-dir", str(state)], ["--state-dir", str(state)], ["--contract", None]):
        if args[0] == "--contract":
            args[1] = next(line.split()[3] for line in (tmp_path / "ledger.log").read_text().splitlines()
                           if line.startswith("ledger: escrow contract"))
        (tmp_path / "ledger.log").unlink(missing_ok=True)
        daemon = _ledger_daemon(tmp_path, "--chain", url, *args, level="info")
        try:
            for _ in range(600):
                log = (tmp_path / "ledger.log").read_text()
                if "agent started" in log:
                    break
                assert daemon.poll() is None, log
                time.sleep(0.1)
        finally:
            daemon.terminate()
            daemon.wait(10)
        signed_as.append(log.split("signing as", 1)[1].split("address=", 1)[1].split()[0])
    assert signed_as[0] == signed_as[1] == load_wallet(state / "ledger.key").address != signed_as[2]
    assert (state / "ledger.key").stat().st_mode & 0o777 == 0o600
    assert log.splitlines()[0].startswith("deltaml: note: no --key: this ledger signs with a key of its own for "
                                          "this run;")


def test_a_ledger_state_dir_is_refused_where_it_could_not_resume(anvil, tmp_path):
    """The embedded chain ends with the process; a state directory belongs to one escrow."""
    proc = subprocess.run([sys.executable, "-m", "deltaml.cli", "ledger", "--state-dir", str(tmp_path / "s")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "deltaml: error: --state-dir needs --chain URL: the embedded chain lives in the ledger's process and "
        "ends with it, so there would be nothing to resume on"]
    url, _ = anvil
    chain = Chain(url)
    ledger = LedgerCore(context(LEDGER), chain)
    from deltaml.agents.checkpoint import Checkpoint
    checkpoint = Checkpoint(tmp_path / "s")
    checkpoint.save(ledger.snapshot(), {}, None, [])
    checkpoint.close()
    other = Chain(url).address
    proc = subprocess.run([sys.executable, "-m", "deltaml.cli", "ledger", "--chain", url, "--state-dir",
                           str(tmp_path / "s"), "--contract", other, "--key", str(tmp_path / "k")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"deltaml: error: --contract {other}: the state in {tmp_path / 's'} is of escrow {chain.address}"]
    with pytest.raises(ChainUnavailable, match=f"the saved state is of escrow {chain.address}"):
        LedgerCore(context(LEDGER), Chain(url, contract=other)).restore(ledger.snapshot())


class Outage:
    """A TCP relay to a node that can be taken down (connections refused, open ones cut) and up."""

    def __init__(self, port: int) -> None:
        self.target, self.port = port, free_port()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept: close alone would not
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            node = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, node]
            for a, b in ((client, node), (node, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_a_transaction_is_legacy_or_eip_1559_and_read_alike():
    """Wallets sign EIP-1559 transactions (a fee cap and a tip) where the chain has a base fee, and
    legacy ones where it has not; the ledger reads both, and refuses other types in one line."""
    from eth_account import Account

    key = Account.create()
    common = {"to": AN_ADDRESS, "value": 5, "gas": 50_000, "nonce": 3, "chainId": 31337, "data": b"\x01"}
    legacy = Account.sign_transaction({**common, "gasPrice": 7}, key.key).raw_transaction
    capped = Account.sign_transaction({**common, "type": 2, "maxFeePerGas": 9, "maxPriorityFeePerGas": 2},
                                      key.key).raw_transaction
    access = Account.sign_transaction({**common, "type": 1, "gasPrice": 7, "accessList": []}, key.key).raw_transaction
    for raw, (price, tip) in [(legacy, (7, 7)), (capped, (9, 2))]:
        tx = parse_tx(bytes(raw))
        assert (tx.sender, tx.nonce, tx.to, tx.value, tx.gas, tx.data) == (key.address, 3, AN_ADDRESS, 5, 50_000, b"\x01")
        assert (tx.gas_price, tx.tip) == (price, tip)
    with pytest.raises(ProtocolError, match="transaction type 1 is not taken"):
        parse_tx(bytes(access))


def test_the_base_fee_comes_from_the_last_block_on_a_node_without_a_pending_one(monkeypatch):
    """Some nodes answer no pending block; the ledger's price check and advice must not fail every
    transaction there."""
    from web3.exceptions import BlockNotFound

    chain = Chain("embedded")
    latest = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    real = chain.w3.eth.get_block

    def no_pending(which, *args, **kwargs):
        if which == "pending":
            raise BlockNotFound("Block with id: 'pending' not found.")
        return real(which, *args, **kwargs)

    monkeypatch.setattr(chain.w3.eth, "get_block", no_pending)
    assert chain.base_fee() == latest > 0 and chain.prices() == (2 * latest + 10**9, 10**9)


def test_a_top_up_the_node_will_not_take_in_place_of_the_first_leaves_the_first_waited_for(monkeypatch):
    """The node may refuse a top-up's replacement (the first mined meanwhile: its nonce used; a
    pool's own rules): the ledger goes on waiting for the first rather than failing its tick."""
    from web3.exceptions import Web3RPCError

    chain = Chain("embedded")
    held = chain.held(chain.w3.eth.send_transaction({"from": chain.faucet, "to": chain.w3.eth.accounts[1], "value": 1}))
    assert held.sender == chain.faucet and held.value == 1

    def refused(transaction):
        raise Web3RPCError("nonce too low")

    monkeypatch.setattr(chain.w3.eth, "send_transaction", refused)
    assert chain.fund_again("0xfirst", held, 2 * held.gas_price, held.tip) == "0xfirst"
    def unreachable(transaction):
        raise ConnectionError("node away")

    monkeypatch.setattr(chain.w3.eth, "send_transaction", unreachable)
    with pytest.raises(OSError):  # the node away is a fault, retried at the next tick
        chain.fund_again("0xfirst", held, 2 * held.gas_price, held.tip)


def test_the_ledger_raises_a_node_it_cannot_reach_as_a_fault_not_as_a_refusal(monkeypatch):
    """A transaction the node did not answer for was relayed back as refused, with the connection
    error as its revert reason: the party's call failed for good. It is a fault, retried later;
    a redelivered request finds the transaction if it was mined after all (``Chain.mined``)."""
    import requests

    chain = Chain("embedded")
    party = Party("p", LedgerCore(Context(LEDGER), chain))
    [request] = party.ctx.wallet.call(party.ctx, "j", 0, "withdraw", [])
    raw = bytes.fromhex(request.payload.raw[2:])

    def unreachable(raw):
        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(chain.w3.eth, "send_raw_transaction", unreachable)
    with pytest.raises(OSError, match="Connection refused"):
        chain.send(raw, parse_tx(raw))


def test_a_transaction_ahead_of_its_senders_earlier_one_waits_for_it_instead_of_blocking_the_ledger(anvil):
    """A party's next transaction reaches the ledger while its previous one waits for a retry (the
    node was away). A node holds a transaction with a nonce gap until the gap is filled: the ledger
    sent it and waited a minute for its receipt, holding every other party's request, before the
    earlier one could be sent (found by hand: a 5 s outage made a 40-round demo take 263 s instead
    of 40). It is now a fault retried later, sent nowhere; the earlier one goes first."""
    url, w3 = anvil
    core = LedgerCore(context(LEDGER), Chain(url))
    party = Party(f"buyer-{uuid.uuid4().hex[:6]}", core)
    first, second = (party.ctx.wallet.call(party.ctx, "j", 0, "withdraw", [])[0] for _ in range(2))
    with pytest.raises(NonceAhead, match="nonce 1, the chain expects 0"):
        core.handle(sign(second, party.ctx.wallet.private_key))
    assert w3.eth.get_transaction_count(party.address, "pending") == 0  # the node never saw it
    for request in (first, second):
        party.deliver(core.handle(sign(request, party.ctx.wallet.private_key)))
    assert [(r.mined, r.reason, r.next_nonce) for r in party.receipts] == [(True, "NothingToWithdraw", 1),
                                                                          (True, "NothingToWithdraw", 2)]


async def relay_through_outage(anvil, outage: float, **ledger_kwargs) -> m.TxReceipt:
    """A party's transaction sent to a ledger agent on the broker while the node behind it is down
    for ``outage`` seconds; the receipt the party hears."""
    url, w3 = anvil
    relay = Outage(int(url.rsplit(":", 1)[1]))
    tag = uuid.uuid4().hex[:6]
    ledger_name, party_name = f"ledger-{tag}", f"buyer-{tag}"
    core = LedgerCore(context(LEDGER), Chain(relay.url), **ledger_kwargs)
    party = Party(party_name, core)
    [request] = party.ctx.wallet.call(party.ctx, f"job-{tag}", 0, "withdraw", [])
    bus = await AmqpBus(AMQP_URL).connect()
    agent = Agent("ledger", ledger_name, core, bus)
    receipts = []

    async def hear(delivery):
        receipts.append(m.decode(delivery.body).payload)
        return Outcome(Verdict.ACK)

    try:
        await agent.start()
        await bus.consume("buyer", party_name, hear)
        relay.down()
        await bus.publish(ledger_name, sign_encoded(request, party.ctx.wallet.private_key), request.message_id)
        await asyncio.sleep(outage)
        relay.up()
        for _ in range(600):
            if receipts:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        [receipt] = receipts
        return receipt
    finally:
        await agent.stop()
        await bus.close()
        relay.down()


async def test_a_ledger_rides_out_a_node_outage_of_longer_than_its_retries(anvil):
    """The node behind the ledger stops answering for 12 s as a party's transaction arrives (a node
    restarting, an RPC provider's outage or rate limit). The request was retried by the bus after
    2 s and 8 s more, then given up: an outage over about 10 s failed the party's transaction, and
    its job with it. (Before that, retried at once, the three attempts were spent in milliseconds.)
    The ledger now keeps the request and sends it at the first tick the node answers."""
    receipt = await relay_through_outage(anvil, 12)
    assert receipt.mined and receipt.function == "withdraw", receipt.reason
    assert receipt.reason == "NothingToWithdraw"  # the contract's answer: it did reach the chain


async def test_a_ledger_that_cannot_reach_its_node_tells_the_signer_instead_of_going_silent(anvil):
    """The outage outlasts the ledger's patience (10 minutes; 1 s here): the party hears its
    transaction was not mined, and why, instead of waiting out its round timeout for a receipt that
    never comes."""
    receipt = await relay_through_outage(anvil, 3, node_patience=1.0)
    assert not receipt.mined and not receipt.ok and receipt.next_nonce is None  # the node still away
    assert "gave it up: the chain node did not answer for" in receipt.reason


def test_requests_kept_while_the_node_is_away_go_in_order_and_outlive_a_restart(anvil):
    """A party's two transactions come while the node is away: both are kept, in order (a node
    would hold the second until the first came), with the ledger's state, so a ledger restarted
    from it sends them once its node answers, and each signer hears of each."""
    url, w3 = anvil
    relay = Outage(int(url.rsplit(":", 1)[1]))
    try:
        core = LedgerCore(context(LEDGER), Chain(relay.url))
        party = Party(f"buyer-{uuid.uuid4().hex[:6]}", core)
        requests = [party.ctx.wallet.call(party.ctx, "j", 0, "withdraw", [])[0] for _ in range(2)]
        relay.down()
        for request in requests:
            assert core.handle(sign(request, party.ctx.wallet.private_key)) == []
        assert core.tick(1.0) == [] and [env.message_id for env, _ in core.kept] == [r.message_id for r in requests]
        restarted = LedgerCore(context(LEDGER), Chain(url, contract=core.chain.address))
        restarted.restore(core.snapshot())
        party.deliver(restarted.tick(1.0))
        assert [(r.mined, r.reason, r.next_nonce) for r in party.receipts] == [(True, "NothingToWithdraw", 1),
                                                                              (True, "NothingToWithdraw", 2)]
        assert not restarted.kept and restarted.tick(1.0) == []
    finally:
        relay.down()
