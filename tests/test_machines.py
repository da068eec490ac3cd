"""State machines: defined transitions work, undefined ones are errors, refusals change nothing."""

import copy
import hashlib

import numpy as np
import pytest
from eth_account import Account

from deltaml.protocol import messages as m
from deltaml.protocol.auth import sign
from deltaml.protocol.aggregator import AggPhase, AggregatorCore
from deltaml.protocol.buyer import BuyerCore, BuyerPhase
from deltaml.protocol.chain import LEDGER
from deltaml.protocol.errors import DecryptionRefused, InvalidTransition, JobOver, NotACiphertext, ProtocolError
from deltaml.protocol.machine import Context, table
from deltaml.protocol.owner import OwnerCore, OwnerData, OwnerPhase

FEATURES = ["a", "b"]


def spec(pub, **kw):
    base = dict(buyer="buyer", features=FEATURES, target="y", ranges=[(-10, 10), (-10, 10)], owners=3,
                validators=1, rounds=4, lr=0.5, eval_every=2, key_bits=2048, public_key=pub.to_hex())
    return m.JobSpec(**{**base, **kw})


def key_of(name: str) -> bytes:
    return hashlib.sha256(f"test-machines-{name}".encode()).digest()


def address_of(name: str) -> str:
    return Account.from_key(key_of(name)).address


def env(payload, sender="aggregator", recipient="x", round_=0, job="j", signed_by=None):
    """An envelope signed by ``sender``'s test key (or ``signed_by``'s)."""
    unsigned = m.Envelope(message_id="id", job_id=job, round=round_, sender=sender, recipient=recipient,
                          payload=payload)
    return sign(unsigned, key_of(signed_by or sender))


def participants(trainers, validators):
    return m.Participants(trainers=trainers, validators=validators,
                          addresses={n: address_of(n) for n in trainers + validators})


def owner(columns=("a", "b", "y"), seed=0, rng=None):
    X = np.random.default_rng(seed).uniform(-1, 1, size=(10, len(columns)))
    ctx = Context("owner-1") if rng is None else Context("owner-1", rng=rng)
    return OwnerCore(ctx, OwnerData(tuple(columns), X))


def owner_as(pub, role):
    """An owner that joined a job and was given ``role`` in it (with the full model, for a trainer)."""
    core = owner()
    core.handle(env(m.JobOffer(spec=spec(pub))))
    core.handle(env(m.RoleAssignment(role=role, models=["all"])))
    return core


def test_table_refuses_duplicate_transitions():
    with pytest.raises(ValueError):
        table((OwnerPhase.WAITING, "job_offer", None, ()), (OwnerPhase.WAITING, "job_offer", None, ()))


def test_owner_walks_its_phases(keypair):
    pub, _ = keypair
    core = owner()
    out = core.handle(env(m.JobOffer(spec=spec(pub))))
    assert core.jobs["j"].phase is OwnerPhase.READY and out[0].payload.rows == 10
    out = core.handle(env(m.RoleAssignment(role="trainer", models=["all"])))
    assert core.jobs["j"].phase is OwnerPhase.INITIATED and out[0].type == "role_accepted"
    zero = [pub.encrypt(0) for _ in range(3)]
    out = core.handle(env(m.GradientRequest(scale_bits=32, models={"all": zero}), round_=1))
    assert core.jobs["j"].phase is OwnerPhase.IN_PROGRESS and out[0].type == "gradient_reply"
    core.handle(env(m.JobFinished(ok=True)))
    assert core.jobs["j"].phase is OwnerPhase.FINISHED
    # what was in flight when the job ended is refused as such, not as a protocol breach
    with pytest.raises(JobOver, match="'gradient_request' arrived after the job ended"):
        core.handle(env(m.GradientRequest(scale_bits=32, models={"all": zero}), round_=2))
    assert core.jobs["j"].phase is OwnerPhase.FINISHED


@pytest.mark.parametrize("columns", [("a", "y"), ("a", "b", "z")])
def test_owner_with_data_that_does_not_match_stays_waiting(keypair, columns):
    core = owner(columns)
    assert core.handle(env(m.JobOffer(spec=spec(keypair[0])))) == []
    assert core.jobs["j"].phase is OwnerPhase.WAITING


def test_owner_with_values_outside_the_ranges_stays_waiting(keypair):
    core = owner()
    assert core.handle(env(m.JobOffer(spec=spec(keypair[0], ranges=[(0, 1), (0, 1)])))) == []
    assert core.jobs["j"].phase is OwnerPhase.WAITING


def test_an_owner_whose_sums_outgrow_the_jobs_bound_declines_it_before_joining(keypair):
    """Its X^T X, X^T y or y^T y cannot be encrypted in the room the job planned: it would fail at its
    role (a trainer) or at the first evaluation, after the others had trained (a validator)."""
    offer = env(m.JobOffer(spec=spec(keypair[0], ranges=None, magnitude_bits=16)))
    core = owner()  # ten rows in [-1, 1]: every sum is at most 10
    assert core.handle(offer)[0].type == "join_request"
    big = OwnerCore(Context("owner-1"), OwnerData(("a", "b", "y"), np.full((10, 3), 100.0)))
    assert big.handle(offer) == []
    assert big.jobs["j"].phase is OwnerPhase.WAITING
    assert big.status(big.jobs["j"]) == {"phase": "declined", "reason": (
        "its X^T X reaches 1e+05, beyond the job's bound 2**16 (6.55e+04): the columns need scaling")}


def test_owner_undefined_transitions_are_errors(keypair):
    pub, _ = keypair
    core = owner()
    core.handle(env(m.JobOffer(spec=spec(pub))))
    with pytest.raises(InvalidTransition) as refused:
        core.handle(env(m.GradientRequest(scale_bits=32, models={}), round_=1))
    assert not isinstance(refused.value, JobOver)  # a job that runs: a message out of turn is a breach
    assert core.jobs["j"].phase is OwnerPhase.READY
    with pytest.raises(ProtocolError, match="unknown job"):
        core.handle(env(m.RoleAssignment(role="trainer", models=[]), job="other"))


def test_trainer_refuses_a_model_it_is_not_in_and_a_stranger(keypair):
    pub, _ = keypair
    core = owner_as(pub, "trainer")
    w = [pub.encrypt(0) for _ in range(3)]
    with pytest.raises(ProtocolError, match="not in"):
        core.handle(env(m.GradientRequest(scale_bits=32, models={"without:owner-1": w}), round_=1))
    with pytest.raises(ProtocolError, match="non-trainer"):
        core.handle(env(m.GradientRequest(scale_bits=32, models={"all": w}), sender="mallory", round_=1))
    assert core.jobs["j"].phase is OwnerPhase.INITIATED


def started_aggregator(keypair, core=None, job="j", **spec_fields):
    pub, priv = keypair
    core = core or AggregatorCore(Context("aggregator"))
    zero = [pub.encrypt(0) for _ in range(3)]
    core.handle(env(m.JobRequest(spec=spec(pub, **spec_fields), initial_model=zero), sender="buyer", job=job))
    for name in ("owner-1", "owner-2", "owner-3"):
        core.handle(env(m.JoinRequest(rows=10), sender=name, job=job))
    for name, role in (("owner-1", "trainer"), ("owner-2", "trainer"), ("owner-3", "validator")):
        core.handle(env(m.RoleAccepted(role=role, rows=10), sender=name, job=job))
    return core


def test_aggregator_tells_the_buyer_the_address_each_owner_joined_with(keypair):
    pub, _ = keypair
    core = AggregatorCore(Context("aggregator"))
    core.handle(env(m.JobRequest(spec=spec(pub), initial_model=[pub.encrypt(0)] * 3), sender="buyer"))
    with pytest.raises(ProtocolError, match="unsigned"):
        core.handle(env(m.JoinRequest(rows=10), sender="owner-1").model_copy(update={"signature": None}))
    assert core.jobs["j"].joined == {}
    out = [o for name in ("owner-1", "owner-2", "owner-3")
           for o in core.handle(env(m.JoinRequest(rows=10), sender=name))]
    (told,) = [o.payload for o in out if o.type == "participants"]
    assert told.addresses == {n: address_of(n) for n in ("owner-1", "owner-2", "owner-3")}


def test_aggregator_rejects_undefined_and_duplicate_messages(keypair):
    pub, _ = keypair
    core = AggregatorCore(Context("aggregator"))
    with pytest.raises(ProtocolError, match="unknown job"):
        core.handle(env(m.Failure(reason="?"), sender="owner-1"))
    # a join to a job it does not know (an offer from before a restart without its state) is answered
    (told,) = core.handle(env(m.JoinRequest(rows=1), sender="owner-1"))
    assert (told.type, told.payload.ok) == ("job_finished", False) and core.jobs == {}
    core = started_aggregator(keypair)
    job = core.jobs["j"]
    # round 0 is being evaluated while round 1 trains
    assert job.phase is AggPhase.TRAINING and list(job.evals) == [0] and job.validators == ["owner-3"]
    with pytest.raises(InvalidTransition):
        core.handle(env(m.RefreshReply(models={}), sender="buyer"))
    with pytest.raises(ProtocolError, match="wrong models"):
        core.handle(env(m.GradientReply(rows=10, gradients={}), sender="owner-1", round_=1))
    with pytest.raises(ProtocolError, match="not expected"):
        core.handle(env(m.EvalReply(rows=10, sse_scale_bits=96, sse={"all": 1}), sender="owner-1"))
    with pytest.raises(ProtocolError, match="no evaluation of round 5"):
        core.handle(env(m.EvalReply(rows=10, sse_scale_bits=96, sse={"all": 1}), sender="owner-3", round_=5))
    # the row count sets the step and divides the squared error: it is the one the role was accepted with
    mine = {mid: [pub.encrypt(0)] * 3 for mid in job.models_of("owner-1")}
    with pytest.raises(ProtocolError, match="11 rows, but owner-1 accepted its role with 10"):
        core.handle(env(m.GradientReply(rows=11, gradients=mine), sender="owner-1", round_=1))
    with pytest.raises(ProtocolError, match="1000 rows, but owner-3 accepted its role with 10"):
        core.handle(env(m.EvalReply(rows=1000, sse_scale_bits=96, sse={"all": pub.encrypt(1)}), sender="owner-3"))
    # so is the scale that divides the decrypted SSE: round 0's model is at 32 bits, its [SSE] at 2 * 32 + 32
    with pytest.raises(ProtocolError, match="scale 64, the evaluation's is 96"):
        core.handle(env(m.EvalReply(rows=10, sse_scale_bits=64, sse={"all": pub.encrypt(1)}), sender="owner-3"))
    assert core.jobs["j"] is job  # a refused message leaves the state untouched


def test_a_buyer_that_gives_a_job_up_tells_its_aggregator_who_releases_the_owners(keypair):
    """A buyer that left (Ctrl-C) used to say nothing: its job went on recruiting and computing
    until it next needed the buyer, up to ``round_timeout`` later, owners and escrow held meanwhile."""
    pub, priv = keypair
    buyer = BuyerCore(Context("buyer"), priv)
    (request,) = buyer.open_job("j", spec(pub))
    (told,) = buyer.give_up("j", "the buyer gave the job up (interrupted)")
    assert told.type == "failure" and told.recipient == "aggregator" and told.job_id == "j"
    assert buyer.jobs["j"].phase is BuyerPhase.FAILED
    assert buyer.give_up("j", "again") == [] and buyer.give_up("other", "unknown") == []
    aggregator = AggregatorCore(Context("aggregator"))
    aggregator.handle(sign(request, key_of("buyer")))
    aggregator.handle(env(m.JoinRequest(rows=10), sender="owner-2"))
    out = aggregator.handle(sign(told, key_of("buyer")))
    assert aggregator.jobs["j"].phase is AggPhase.FAILED
    assert {(o.recipient, o.type, o.payload.ok) for o in out} == {("buyer", "job_finished", False),
                                                               ("owner-2", "job_finished", False)}
    assert out[1].payload.reason == "buyer: the buyer gave the job up (interrupted)"
    # an owner whose offer crossed the failure is told, not left waiting for a role (and not refused)
    (late,) = aggregator.handle(env(m.JoinRequest(rows=10), sender="owner-3"))
    assert (late.recipient, late.type, late.payload.ok) == ("owner-3", "job_finished", False)
    assert late.payload.reason == "the job failed: buyer: the buyer gave the job up (interrupted)"


def test_a_finished_job_is_not_given_up(buyer, keypair):
    buyer.jobs["j"].phase = BuyerPhase.FINISHED
    assert buyer.give_up("j", "late Ctrl-C") == [] and buyer.jobs["j"].phase is BuyerPhase.FINISHED


def test_an_aggregator_that_lost_a_job_tells_each_party_once(keypair):
    """Restarted without its --state-dir, it refused every message of the job as for an unknown one:
    owners and buyer waited for ever. It signs nothing on anyone's word (anyone may sign a message
    for a job id of their choosing, and a refused abandon per made-up id would drain its gas and
    leave gaps in its nonces): it asks the ledger, once per job, where the escrow stands."""
    from deltaml.agents.parties import load_wallet

    pub, _ = keypair
    core = AggregatorCore(Context("aggregator", wallet=load_wallet(None)))
    reply = m.GradientReply(rows=10, gradients={"all": [pub.encrypt(0)] * 3})
    told, query = core.handle(env(reply, sender="owner-1", round_=7))
    assert (told.recipient, told.type, told.payload.ok, told.round) == ("owner-1", "job_finished", False, 7)
    assert told.payload.reason == ("aggregator aggregator does not know job j (restarted without the --state-dir "
                                   "it ran the job with?): the job cannot go on")
    assert (query.recipient, query.type, query.job_id) == (LEDGER, "escrow_query", "j")
    with pytest.raises(JobOver, match="which this aggregator lost"):  # said once to each, quietly after
        core.handle(env(reply, sender="owner-1", round_=7).model_copy(update={"message_id": "again"}))
    with pytest.raises(JobOver, match="which this aggregator lost"):  # chain events come from the ledger
        core.handle(env(m.ChainEvent(event="Settled", args={}, tx_hash="0x00", block=1), sender="owner-1"))
    (to_owner_2,) = core.handle(env(reply, sender="owner-2", round_=7))  # the ledger asked once per job
    (to_buyer,) = core.handle(env(m.JobQuery(), sender="buyer"))
    assert (to_owner_2.recipient, to_buyer.recipient) == ("owner-2", "buyer")
    assert core.jobs == {} and core.wallet.queue == [] and not core.wallet.greeted  # no transaction


@pytest.mark.parametrize("standing, signs", [
    (dict(state="Training", abandoned=False), ["abandon", "settle"]),
    (dict(state="Open", abandoned=True), ["settle"]),  # given up before the restart, never settled
    (dict(state="Settled", abandoned=True), []),
    (dict(state="None", abandoned=False, aggregator="0x" + "00" * 20), []),  # a made-up job id
    (dict(state="Training", abandoned=False, aggregator=address_of("mallory")), []),  # another's escrow
])
def test_a_lost_jobs_escrow_is_given_up_only_as_the_ledger_reads_it(keypair, standing, signs):
    from deltaml.agents.parties import load_wallet

    pub, _ = keypair
    core = AggregatorCore(Context("aggregator", wallet=load_wallet(None)))
    reply = m.GradientReply(rows=10, gradients={"all": [pub.encrypt(0)] * 3})
    _, query = core.handle(env(reply, sender="owner-1"))
    core.wallet.on_info(core.ctx, m.ChainInfo(chain_id=1, contract=address_of("escrow"), nonce=0, gas_price=1))
    answer = m.EscrowStanding(**{"aggregator": core.wallet.address, "enrolled": 3, **standing})
    stranger = env(answer, sender="owner-1").model_copy(update={"correlation_id": query.message_id})
    with pytest.raises(ProtocolError, match="from the ledger"):
        core.handle(stranger)
    with pytest.raises(ProtocolError, match="nobody asked for"):
        core.handle(env(answer, sender=LEDGER))
    out = core.handle(env(answer, sender=LEDGER).model_copy(update={"correlation_id": query.message_id}))
    assert [e.payload.function for e in out] == signs and all(e.recipient == LEDGER for e in out)
    with pytest.raises(ProtocolError, match="nobody asked for"):  # acted on once
        core.handle(env(answer, sender=LEDGER).model_copy(update={"correlation_id": query.message_id,
                                                                   "message_id": "again"}))


def test_a_lost_jobs_memory_survives_a_restart_from_the_aggregators_state(keypair):
    """Its memory of lost jobs was not checkpointed: an aggregator that crashed (with its state)
    while its question to the ledger was in flight refused the answer as one nobody asked for, and
    the escrow waited for its deadline; each party was told twice."""
    from deltaml.agents.parties import context, load_wallet

    pub, _ = keypair
    wallet = load_wallet(None)
    core = AggregatorCore(context("aggregator", wallet=wallet))  # as a daemon's: a random source with a state
    reply = m.GradientReply(rows=10, gradients={"all": [pub.encrypt(0)] * 3})
    _, query = core.handle(env(reply, sender="owner-1"))
    restarted = AggregatorCore(context("aggregator", wallet=wallet))
    restarted.restore(core.snapshot())
    with pytest.raises(JobOver, match="which this aggregator lost"):  # owner-1 was told before the crash
        restarted.handle(env(reply, sender="owner-1").model_copy(update={"message_id": "again"}))
    restarted.wallet.on_info(restarted.ctx, m.ChainInfo(chain_id=1, contract=address_of("escrow"), nonce=0,
                                                        gas_price=1))
    answer = m.EscrowStanding(aggregator=wallet.address, enrolled=3, state="Training", abandoned=False)
    out = restarted.handle(env(answer, sender=LEDGER).model_copy(update={"correlation_id": query.message_id}))
    assert [e.payload.function for e in out] == ["abandon", "settle"]


def test_a_party_asking_after_a_job_that_goes_on_gets_no_answer_and_an_owner_one_over_its_end(keypair):
    core = started_aggregator(keypair)
    job = core.jobs["j"]
    assert core.handle(env(m.JobQuery(), sender="buyer")) == []
    assert core.handle(env(m.JobQuery(), sender="owner-3")) == []  # the validator, between evaluations
    with pytest.raises(ProtocolError, match="only the buyer or an owner"):
        core.handle(env(m.JobQuery(), sender="mallory"))
    assert core.jobs["j"].phase is job.phase
    core.handle(env(m.Failure(reason="out of memory"), sender="owner-2"))
    (told,) = core.handle(env(m.JobQuery(), sender="owner-3"))
    assert (told.recipient, told.type, told.payload.ok) == ("owner-3", "job_finished", False)
    assert told.payload.reason == "owner-2: out of memory"
    assert core.handle(env(m.JobQuery(), sender="buyer")) == []  # the buyer was told, and asks only under way


def test_a_trainer_that_fails_in_a_training_round_is_dropped_while_the_quorum_holds(keypair):
    """STYLE §4: a failing owner says so, and the aggregator applies its quorum rule and goes on (a
    failure used to end the job whatever the quorum, while the same trainer's silence did not)."""
    pub, _ = keypair
    core = started_aggregator(keypair, quorum=1)
    asked = {t: set(core.jobs["j"].models_of(t)) for t in ("owner-1", "owner-2")}
    grads = lambda t: {mid: [pub.encrypt(0)] * 3 for mid in asked[t]}  # noqa: E731 - as round 1 asked them
    core.handle(env(m.GradientReply(rows=10, gradients=grads("owner-2")), sender="owner-2", round_=1))
    assert core.handle(env(m.Failure(reason="out of memory"), sender="owner-2", round_=1)) == []
    job = core.jobs["j"]
    assert job.phase is AggPhase.TRAINING and job.failing == {"owner-2": "out of memory"} and job.replies == {}
    with pytest.raises(ProtocolError, match="reported a failure"):  # its gradient left with it, for good
        core.handle(env(m.GradientReply(rows=10, gradients=grads("owner-2")), sender="owner-2", round_=1,
                        job="j").model_copy(update={"message_id": "again"}))
    # owner-1 answers round 1 as it was asked: the round steps without owner-2
    out = core.handle(env(m.GradientReply(rows=10, gradients=grads("owner-1")), sender="owner-1", round_=1))
    job = core.jobs["j"]
    assert job.dropped == ["owner-2"] and job.trainers == ["owner-1"] and job.round == 1 and job.failing == {}
    told = {(o.recipient, o.type): o.payload for o in out}
    assert told[("owner-2", "job_finished")].reason == "dropped: it failed: out of memory"
    assert told[("buyer", "trainer_dropped")].trainer == "owner-2"
    ask = told[("owner-1", "gradient_request")]
    assert set(ask.models) == {"all"}  # the model without owner-2 became the full one
    (again,) = core.handle(env(m.JobQuery(), sender="owner-2"))
    assert again.payload.reason == "dropped: it fell silent or failed in a training round"
    # the last trainer's failure cannot be: below the quorum the job fails
    core.handle(env(m.Failure(reason="disk full"), sender="owner-1", round_=2))
    assert core.jobs["j"].phase is AggPhase.FAILED and core.jobs["j"].reason == "owner-1: disk full"


def test_a_failed_trainer_and_a_silent_one_are_dropped_together_at_the_deadline(keypair):
    pub, _ = keypair
    core = AggregatorCore(Context("aggregator"))
    zero = [pub.encrypt(0) for _ in range(3)]
    core.handle(env(m.JobRequest(spec=spec(pub, quorum=1, owners=4), initial_model=zero), sender="buyer"))
    names = ["owner-1", "owner-2", "owner-3", "owner-4"]  # three trainers and a validator
    for name in names:
        core.handle(env(m.JoinRequest(rows=10), sender=name))
    for name, role in zip(names, ["trainer"] * 3 + ["validator"]):
        core.handle(env(m.RoleAccepted(role=role, rows=10), sender=name))
    job = core.jobs["j"]
    assert job.phase is AggPhase.TRAINING and job.trainers == ["owner-1", "owner-2", "owner-3"]
    mine = {mid: [pub.encrypt(0)] * 3 for mid in job.models_of("owner-1")}
    core.handle(env(m.GradientReply(rows=10, gradients=mine), sender="owner-1", round_=1))
    assert core.handle(env(m.Failure(reason="out of memory"), sender="owner-2", round_=1)) == []
    out = core.tick(job.spec.round_timeout)  # owner-3 never answers
    job = core.jobs["j"]
    assert job.dropped == ["owner-3", "owner-2"] and job.trainers == ["owner-1"] and job.round == 1
    reasons = {o.recipient: o.payload.reason for o in out if o.type == "job_finished"}
    assert reasons == {"owner-2": "dropped: it failed: out of memory",
                       "owner-3": "dropped: no gradient for round 1 within 600 s"}


def test_a_failure_under_a_quorum_that_cannot_hold_fails_the_job(keypair):
    core = started_aggregator(keypair, quorum=2)
    core.handle(env(m.Failure(reason="out of memory"), sender="owner-1", round_=1))
    assert core.jobs["j"].phase is AggPhase.FAILED and core.jobs["j"].reason == "owner-1: out of memory"


def test_a_message_the_aggregator_gives_up_on_drops_its_trainer_or_fails_the_job(keypair):
    """Its handler failed at every try: nobody sends that message again, so the job cannot wait for it."""
    pub, _ = keypair
    core = started_aggregator(keypair, quorum=1)
    reply = env(m.GradientReply(rows=10, gradients={"all": [pub.encrypt(0)] * 3}), sender="owner-1", round_=1)
    assert core.fault(reply) == [] and core.jobs["j"].failing == {
        "owner-1": "the aggregator could not handle owner-1's gradient_reply of round 1"}
    core = started_aggregator(keypair)  # no quorum: the job fails at once, everyone told why
    stranger = env(m.GradientReply(rows=10, gradients={"all": [pub.encrypt(0)] * 3}), sender="mallory", round_=1)
    assert core.fault(stranger) == [] and core.jobs["j"].phase is AggPhase.TRAINING  # nobody's to end it
    out = core.fault(reply)
    assert core.jobs["j"].phase is AggPhase.FAILED
    assert {o.recipient for o in out if o.type == "job_finished"} == {"buyer", "owner-1", "owner-2", "owner-3"}
    assert core.jobs["j"].reason == "the aggregator could not handle owner-1's gradient_reply of round 1"
    assert core.fault(reply) == []  # a job over has nothing more to say
    assert core.fault(env(m.JobQuery(), sender="owner-1", job="unknown")) == []


def test_a_message_the_buyer_gives_up_on_gives_its_job_up(buyer):
    assert buyer.fault(env(m.JobQuery(), sender="owner-1", round_=1)) == []  # a trainer's is not the buyer's to heed
    assert buyer.jobs["j"].phase is BuyerPhase.TRAINING
    (told,) = buyer.fault(env(m.RefreshRequest(value_bits=124, drop_bits=32, models={}), round_=1))
    assert (told.recipient, told.type) == ("aggregator", "failure")
    assert told.payload.reason == "the buyer could not handle aggregator's refresh_request of round 1"
    assert buyer.jobs["j"].phase is BuyerPhase.FAILED and buyer.fault(told) == []


def test_an_owner_gives_up_only_its_own_jobs_messages_from_their_parties(keypair):
    pub, _ = keypair
    core = owner_as(pub, "trainer")
    ask = m.GradientRequest(scale_bits=32, models={"all": [pub.encrypt(0)] * 3})
    assert core.fault(env(ask, sender="mallory", round_=1)) == [] and core.fault(env(ask, job="k", round_=1)) == []
    assert core.jobs["j"].phase is OwnerPhase.INITIATED
    (said,) = core.fault(env(ask, round_=1))
    assert (said.recipient, said.type, said.payload.reason) == ("aggregator", "failure",
                                                               "could not handle gradient_request of round 1")
    assert core.jobs["j"].phase is OwnerPhase.FINISHED and core.fault(env(ask, round_=1)) == []


def test_a_question_does_not_keep_a_silent_job_alive(keypair):
    """The buyer asks once a minute and owners after each silence: when a question counted as a
    sign of life, a silent trainer (or buyer) in a job whose round_timeout exceeded that was never
    acted on and the job waited for ever."""
    core = started_aggregator(keypair)
    timeout = core.jobs["j"].spec.round_timeout
    for _ in range(3):
        core.tick(timeout * 0.6)
        assert core.handle(env(m.JobQuery(), sender="buyer")) == []
        assert core.handle(env(m.JobQuery(), sender="owner-3")) == [] or core.jobs["j"].phase is AggPhase.FAILED
    assert core.jobs["j"].phase is AggPhase.FAILED and "no gradient from owner-1, owner-2" in core.jobs["j"].reason


def test_a_fault_acting_on_one_jobs_silence_fails_that_job_and_leaves_the_others_deadlines(keypair, monkeypatch):
    """A bug in acting on a silence (a division by zero rows did it) raised out of the tick: every
    job's deadline stopped, and the same fault came back at every tick for ever."""
    import deltaml.protocol.aggregator as aggregator

    core = started_aggregator(keypair, job="k", core=started_aggregator(keypair, job="j"))
    real = aggregator.on_silence

    def faulty(job, ctx, job_id):
        if job_id == "j":
            raise ZeroDivisionError("float division by zero")
        return real(job, ctx, job_id)

    monkeypatch.setattr(aggregator, "on_silence", faulty)
    out = core.tick(core.jobs["j"].spec.round_timeout)
    told = {(o.job_id, o.recipient): o.payload.reason for o in out if o.type == "job_finished"}
    assert told[("j", "buyer")] == "acting on the silence failed: ZeroDivisionError('float division by zero')"
    assert "no gradient from owner-1, owner-2" in told[("k", "buyer")]
    assert {o for o, _ in told} == {"j", "k"} and len(told) == 8  # the buyer and three owners of each
    assert core.jobs["j"].phase is core.jobs["k"].phase is AggPhase.FAILED
    assert core.tick(3600.0) == []


def test_an_owner_that_hears_nothing_of_its_job_for_a_round_timeout_asks_its_aggregator(keypair):
    """A validator between evaluations of a job its aggregator lost (restarted without its state)
    heard nothing and kept the job for ever: owners did not keep time."""
    pub, _ = keypair
    core = owner()
    core.handle(env(m.JobOffer(spec=spec(pub, round_timeout=30.0))))
    core.handle(env(m.RoleAssignment(role="validator", models=["all"])))
    assert core.tick(29.0) == []
    (query,) = core.tick(1.0)
    assert (query.recipient, query.type, query.job_id) == ("aggregator", "job_query", "j")
    assert core.tick(29.0) == [] and len(core.tick(1.0)) == 1  # again after each such silence
    core.tick(29.0)
    core.handle(env(m.ChainEvent(event="Confirmed", args={}, tx_hash="0x", block=1), sender=LEDGER))
    assert core.tick(1.0) == []  # any message of the job starts the silence again
    core.handle(env(m.JobFinished(ok=False, reason="aggregator aggregator does not know job j")))
    assert core.jobs["j"].phase is OwnerPhase.FINISHED and core.tick(3600.0) == []  # a job over is not asked


def test_a_buyer_told_its_job_is_lost_stops_waiting_for_the_escrow(buyer):
    """Only the answer to its own question marks the job lost (its escrow is given up at once or
    only at its deadline: the buyer waits for a refund less long); an ordinary end does not."""
    buyer.handle(env(m.JobFinished(ok=False, reason="round 3: no gradient")))
    assert buyer.jobs["j"].phase is BuyerPhase.FAILED and not buyer.jobs["j"].lost
    assert buyer.ask("j") == []  # a job over is not asked after


def abandoned(sender=LEDGER):
    return env(m.ChainEvent(event="Abandoned", args={"job": "0x00", "round": 0}, tx_hash="0x", block=9), sender=sender)


def test_a_job_given_up_on_chain_is_over_for_its_buyer_and_owners(buyer, keypair):
    """The aggregator that lost a job gives its escrow up at the first word of it, but the buyer heard
    only at its next question (a minute) and a validator between evaluations at its next silence.
    Only the job's aggregator can abandon its escrow, and only when the job cannot go on."""
    from deltaml.protocol.chain import ABANDONED

    buyer.handle(abandoned())
    assert buyer.jobs["j"].phase is BuyerPhase.FAILED and buyer.jobs["j"].reason == ABANDONED
    buyer.handle(env(m.JobFinished(ok=False, reason="round 3: no gradient")))  # the aggregator's word says more
    assert buyer.jobs["j"].reason == "round 3: no gradient"
    buyer.handle(abandoned().model_copy(update={"message_id": "again"}))
    assert buyer.jobs["j"].reason == "round 3: no gradient"
    pub, _ = keypair
    validator = owner_as(pub, "validator")
    validator.handle(abandoned())
    assert validator.jobs["j"].phase is OwnerPhase.FINISHED and "gave the job's escrow up" in validator.jobs["j"].reason
    with pytest.raises(ProtocolError, match="from the ledger"):
        owner_as(pub, "trainer").handle(abandoned(sender="aggregator"))


def test_a_buyer_asks_and_learns_its_job_was_lost(buyer):
    (query,) = buyer.ask("j")
    assert (query.type, query.recipient) == ("job_query", "aggregator")
    lost = "aggregator aggregator does not know job j: the job cannot go on"
    answer = env(m.JobFinished(ok=False, reason=lost)).model_copy(update={"correlation_id": query.message_id})
    buyer.handle(sign(answer.model_copy(update={"signature": None}), key_of("aggregator")))
    job = buyer.jobs["j"]
    assert job.phase is BuyerPhase.FAILED and job.reason == lost and job.lost


def test_aggregator_job_request_must_come_from_its_buyer(keypair):
    pub, _ = keypair
    core = AggregatorCore(Context("aggregator"))
    zero = [pub.encrypt(0) for _ in range(3)]
    with pytest.raises(ProtocolError, match="buyer"):
        core.handle(env(m.JobRequest(spec=spec(pub), initial_model=zero), sender="mallory"))


@pytest.fixture
def buyer(keypair):
    pub, priv = keypair
    core = BuyerCore(Context("buyer"), priv)
    core.open_job("j", spec(pub))
    with pytest.raises(InvalidTransition):
        core.handle(env(m.RefreshRequest(value_bits=124, drop_bits=32, models={}), round_=1))
    with pytest.raises(DecryptionRefused, match="without an address each"):
        core.handle(env(m.Participants(trainers=["owner-1", "owner-2"], validators=["owner-3"])))
    core.handle(env(participants(["owner-1", "owner-2"], ["owner-3"])))
    assert core.jobs["j"].phase is BuyerPhase.TRAINING
    return core


def signed_part(sse, validator="owner-3", round_=2, signed_by=None):
    """A validator's part as the aggregator forwards it: taken from its signed evaluation reply."""
    reply = env(m.EvalReply(rows=10, sse_scale_bits=96, sse=sse), sender=validator, recipient="aggregator",
                round_=round_, signed_by=signed_by)
    return m.ValidatorPart.of(reply)


def masked(pub, value_bits):
    from deltaml.protocol.refresh import draw_mask
    return [pub.encrypt(draw_mask(value_bits, __import__("random").Random(1))) for _ in range(3)]


def test_buyer_answers_one_refresh_per_round_and_only_the_aggregator(keypair, buyer):
    pub, _ = keypair
    req = m.RefreshRequest(value_bits=60 + 96, drop_bits=64, models={"all": masked(pub, 156)})
    with pytest.raises(DecryptionRefused, match="not the aggregator"):
        buyer.handle(env(req, sender="owner-1", round_=1))
    out = buyer.handle(env(req, round_=1))
    assert out[0].type == "refresh_reply"
    before = copy.deepcopy(buyer.jobs["j"])
    with pytest.raises(DecryptionRefused, match="not expected"):
        buyer.handle(env(req, round_=1))
    with pytest.raises(DecryptionRefused, match="base scale"):
        buyer.handle(env(m.RefreshRequest(value_bits=156, drop_bits=10, models=req.models), round_=2))
    assert buyer.jobs["j"].refreshed == before.refreshed == {1}


@pytest.mark.parametrize("request_", ["refresh", "product"])
def test_a_value_outside_its_mask_ends_the_job_so_refusals_cannot_be_a_range_oracle(keypair, buyer, request_):
    """Were such a request refused and the job left as it was, the requester could send
    ``[x + t]`` for t after t and learn from each answer whether ``x`` is below a bound:
    every plaintext, one bit per request. The first one ends the buyer's decryptions instead."""
    pub, _ = keypair
    outside = [pub.encrypt(2**400), *masked(pub, 92)[1:]]
    if request_ == "refresh":
        ask = env(m.RefreshRequest(value_bits=156, drop_bits=64, models={"all": outside}), round_=1)
    else:
        pair = m.MaskedPair(u=outside, v=masked(pub, 140), u_bits=92)
        ask = env(m.ProductRequest(models={"all": pair}), sender="owner-3", round_=2)
    (told,) = buyer.handle(ask)
    job = buyer.jobs["j"]
    assert told.type == "failure" and told.recipient == "aggregator"
    assert job.phase is BuyerPhase.FAILED and "out of range" in job.reason and "nothing more" in job.reason
    assert "bits" not in job.reason  # nothing about the decrypted value
    honest = m.RefreshRequest(value_bits=156, drop_bits=64, models={"all": masked(pub, 156)})
    with pytest.raises(InvalidTransition):
        buyer.handle(env(honest, round_=3))
    with pytest.raises(InvalidTransition):
        buyer.handle(env(m.ProductRequest(models={"all": m.MaskedPair(u=masked(pub, 92), v=masked(pub, 140),
                                                                      u_bits=92)}), sender="owner-3", round_=4))
    buyer.handle(env(m.JobFinished(ok=False, reason="aggregator: owner-3 failed"), round_=2))
    assert buyer.jobs["j"].reason == job.reason  # the buyer's own reason stands


def test_buyer_refuses_unexpected_products_and_metrics(keypair, buyer):
    pub, _ = keypair
    pair = m.MaskedPair(u=masked(pub, 92), v=masked(pub, 140), u_bits=92)
    ask = m.ProductRequest(models={"all": pair})
    with pytest.raises(DecryptionRefused, match="not a validator"):
        buyer.handle(env(ask, sender="owner-1", round_=2))
    with pytest.raises(DecryptionRefused, match="not evaluated"):
        buyer.handle(env(ask, sender="owner-3", round_=1))
    with pytest.raises(DecryptionRefused, match="not due"):
        buyer.handle(env(m.ProductRequest(models={"without:owner-1": pair}), sender="owner-3", round_=2))
    # a participant speaking first as the validator: the buyer knows the address the validator joined with
    with pytest.raises(DecryptionRefused, match="not signed by the address it joined with"):
        buyer.handle(env(ask, sender="owner-3", round_=2, signed_by="owner-1"))
    with pytest.raises(DecryptionRefused, match="unsigned"):
        buyer.handle(env(ask, sender="owner-3", round_=2).model_copy(update={"signature": None}))
    assert buyer.jobs["j"].served == {}
    assert buyer.handle(env(ask, sender="owner-3", round_=2))[0].type == "product_reply"
    with pytest.raises(DecryptionRefused, match="already served"):
        buyer.handle(env(ask, sender="owner-3", round_=2))
    part = pub.encrypt(5 * 2**96)
    forged = m.MetricRequest(sse_scale_bits=96, totals={"all": pub.encrypt(7)}, parts=[signed_part({"all": part})])
    with pytest.raises(DecryptionRefused, match="not the sum"):
        buyer.handle(env(forged, round_=2))
    # the aggregator cannot have any ciphertext of its choosing decrypted as a validator's part:
    # each part must be what the validator signed, for this job, evaluation and scale
    anything = pub.encrypt(123)
    for claimed, reason in [
        (m.ValidatorPart(validator="owner-3", rows=10, sse={"all": anything}), "unsigned"),
        (signed_part({"all": anything}, signed_by="aggregator"), "not signed by the address it joined with"),
        (signed_part({"all": part}).model_copy(update={"sse": {"all": anything}}), "not signed by the address"),
        (signed_part({"all": anything}, round_=1), "not signed by the address"),
    ]:
        with pytest.raises(DecryptionRefused, match=reason):
            buyer.handle(env(m.MetricRequest(sse_scale_bits=96, totals={"all": anything}, parts=[claimed]), round_=2))
    with pytest.raises(DecryptionRefused, match="not signed by the address"):
        buyer.handle(env(forged.model_copy(update={"sse_scale_bits": 64}), round_=2))
    with pytest.raises(DecryptionRefused, match="not every validator"):
        buyer.handle(env(forged, round_=4))
    honest = forged.model_copy(update={"totals": {"all": part}})
    reply = buyer.handle(env(honest, round_=2))[0].payload.metrics["all"]
    assert reply.mse == 0.5
    with pytest.raises(DecryptionRefused, match="already published"):
        buyer.handle(env(honest, round_=2))
    with pytest.raises(DecryptionRefused, match="last round"):
        buyer.handle(env(m.JobResult(scale_bits=32, model=[1, 2, 3], mse_history=[], final_mse={}), round_=2))


NOT_CIPHERTEXTS = {
    "zero": lambda pub: 0,
    "negative": lambda pub: -5,
    "the modulus": lambda pub: int(pub.n),
    "a multiple of the modulus": lambda pub: 12345 * int(pub.n),
    "n squared": lambda pub: int(pub.nsquare),
    "above n squared": lambda pub: int(pub.nsquare) + 7,
}


@pytest.mark.parametrize("bad", NOT_CIPHERTEXTS)
def test_no_party_computes_with_a_number_that_cannot_be_a_ciphertext(keypair, buyer, bad):
    """Each is refused where it arrives, naming the entry, and the state is the one before it;
    the honest message that follows is taken as if nothing had happened."""
    pub, _ = keypair
    x = NOT_CIPHERTEXTS[bad](pub)
    good = [pub.encrypt(0) for _ in range(3)]

    def poisoned(vector):
        return [vector[0], x, *vector[2:]]

    def refused(core, message, entry=1):
        before = core.jobs["j"]
        with pytest.raises(NotACiphertext, match=f"entry {entry}, is not a ciphertext under the job's key"):
            core.handle(message)
        assert core.jobs["j"] is before

    trainer = owner_as(pub, "trainer")
    refused(trainer, env(m.GradientRequest(scale_bits=32, models={"all": poisoned(good)}), round_=1))
    assert trainer.handle(env(m.GradientRequest(scale_bits=32, models={"all": good}), round_=1))[0].type == \
        "gradient_reply"

    validator = owner_as(pub, "validator")
    refused(validator, env(m.EvalRequest(scale_bits=32, models={"all": poisoned(good)}), round_=2))
    assert validator.handle(env(m.EvalRequest(scale_bits=32, models={"all": good}), round_=2))[0].type == \
        "product_request"

    fresh = AggregatorCore(Context("aggregator"))
    with pytest.raises(NotACiphertext, match="initial model, entry 1,"):
        fresh.handle(env(m.JobRequest(spec=spec(pub), initial_model=poisoned(good)), sender="buyer"))
    assert fresh.jobs == {}

    aggregator = started_aggregator(keypair)
    mine = aggregator.jobs["j"].models_of("owner-1")
    refused(aggregator, env(m.GradientReply(rows=10, gradients={mid: poisoned(good) for mid in mine}),
                            sender="owner-1", round_=1))
    aggregator.handle(env(m.GradientReply(rows=10, gradients={mid: good for mid in mine}), sender="owner-1",
                          round_=1))
    assert set(aggregator.jobs["j"].replies) == {"owner-1"}
    refused(aggregator, env(m.EvalReply(rows=10, sse_scale_bits=96, sse={"all": x}), sender="owner-3"), entry=0)

    masks = masked(pub, 156)
    refused(buyer, env(m.RefreshRequest(value_bits=156, drop_bits=64, models={"all": poisoned(masks)}), round_=1))
    buyer.handle(env(m.RefreshRequest(value_bits=156, drop_bits=64, models={"all": masks}), round_=1))
    u, v = masked(pub, 92), masked(pub, 140)
    for pair in (m.MaskedPair(u=poisoned(u), v=v, u_bits=92), m.MaskedPair(u=u, v=poisoned(v), u_bits=92)):
        refused(buyer, env(m.ProductRequest(models={"all": pair}), sender="owner-3", round_=2))
    buyer.handle(env(m.ProductRequest(models={"all": m.MaskedPair(u=u, v=v, u_bits=92)}), sender="owner-3",
                     round_=2))
    part = pub.encrypt(5 * 2**96)
    metric = m.MetricRequest(sse_scale_bits=96, totals={"all": part}, parts=[signed_part({"all": part})])
    refused(buyer, env(metric.model_copy(update={"totals": {"all": x}}), round_=2), entry=0)
    refused(buyer, env(metric.model_copy(update={"parts": [signed_part({"all": x})]}), round_=2))
    assert buyer.handle(env(metric, round_=2))[0].payload.metrics["all"].mse == 0.5


def test_validator_takes_only_the_reply_to_its_own_product_request(keypair):
    pub, priv = keypair
    core = owner_as(pub, "validator")
    w = [pub.encrypt(0) for _ in range(3)]
    (ask,) = core.handle(env(m.EvalRequest(scale_bits=32, models={"all": w}), round_=2))
    buyer = BuyerCore(Context("buyer"), priv)
    buyer.open_job("j", spec(pub))
    buyer.handle(env(participants(["owner-2", "owner-3"], ["owner-1"])))
    (answer,) = buyer.handle(sign(ask.model_copy(update={"recipient": "buyer"}), key_of("owner-1")))
    assert answer.correlation_id == ask.message_id
    # a stranger speaking as the buyer (its first word to this validator) without the request's id
    stray = answer.model_copy(update={"correlation_id": "guessed"})
    before = copy.deepcopy(core.jobs["j"])
    with pytest.raises(ProtocolError, match="answers no product request"):
        core.handle(stray)
    assert core.jobs["j"].pending.keys() == before.pending.keys() == {2}
    (reply,) = core.handle(answer)  # the buyer's own answer still counts
    assert reply.type == "eval_reply" and core.jobs["j"].pending == {}


def test_a_checkpoint_from_before_a_new_field_restores_with_its_default(keypair):
    import pickle
    import random
    core = owner(rng=random.Random(1))
    core.handle(env(m.JobOffer(spec=spec(keypair[0]))))
    state = pickle.loads(core.snapshot())
    del state["jobs"]["j"].__dict__["asked"]  # as pickled before OwnerJob.asked existed
    restarted = owner(rng=random.Random(2))
    restarted.restore(pickle.dumps(state))
    assert restarted.jobs["j"].asked == {} and restarted.jobs["j"].phase is OwnerPhase.READY


async def test_an_owner_daemon_logs_each_change_of_a_job_and_why_it_declined_one(keypair):
    """The pure core does not log; its agent says at the info level what became of each job: an
    offer this owner's data cannot serve (before, only a debug line said the offer was handled),
    the phases of one it takes, and how that one ended."""
    from structlog.testing import capture_logs

    from deltaml.agents.bus import Delivery
    from deltaml.agents.policy import AckPolicy
    from deltaml.agents.runtime import configure_logging

    pub, _ = keypair
    core = owner()

    async def publish(out):
        pass

    policy = AckPolicy(core.handle, publish, statuses=core.statuses)
    lacking = spec(pub, features=["a", "c"])
    configure_logging("console", "info")  # the suite runs at warning
    try:
        with capture_logs() as logs:
            for i, message in enumerate([env(m.JobOffer(spec=lacking), job="k"), env(m.JobOffer(spec=spec(pub))),
                                         env(m.RoleAssignment(role="trainer", models=["all"])),
                                         env(m.JobFinished(ok=False, reason="the buyer went quiet"))]):
                message = message.model_copy(update={"message_id": f"id-{i}"})
                await policy(Delivery(m.encode(sign(message, key_of("aggregator"))), {}))
    finally:
        configure_logging("console", "warning")
    said = [(e["event"], e["job"], e.get("reason")) for e in logs if e["log_level"] == "info"]
    assert said == [("job declined", "k", "the data lacks columns ['c']"), ("job ready", "j", None),
                    ("job initiated", "j", None), ("job finished", "j", "the buyer went quiet")]


def test_an_aggregator_keeps_its_newest_ended_jobs_and_remembers_how_the_others_ended(keypair, monkeypatch):
    """Every job it ever ran stayed whole in its state, checkpointed after every step: an ended job
    kept its models and last replies (about 130 kB), so after 100 jobs each message cost some
    120 ms of pickling and writing, and memory grew without end."""
    from deltaml.agents.parties import context

    monkeypatch.setattr("deltaml.protocol.ended.KEPT", 2)
    pub, _ = keypair
    core = AggregatorCore(context("aggregator"))  # as a daemon's: a random source with a state
    for job in ("j1", "j2", "j3"):
        started_aggregator(keypair, core, job=job)
        core.handle(env(m.Failure(reason=f"gave {job} up"), sender="buyer", job=job))
    assert list(core.jobs) == ["j2", "j3"]  # the newest KEPT ended jobs, their ciphertexts shed
    assert all(not any(j.models.values()) and not j.replies for j in core.jobs.values())
    restored = AggregatorCore(context("aggregator"))
    restored.restore(core.snapshot())
    for c in (core, restored):  # how j1 ended outlives a restart
        (told,) = c.handle(env(m.JobQuery(), sender="owner-1", job="j1"))
        assert (told.type, told.payload.ok, told.payload.reason) == ("job_finished", False, "buyer: gave j1 up")
        # a straggler is late, not the message of a job the aggregator lost (no question to the ledger)
        late = env(m.GradientReply(rows=10, gradients={"all": [pub.encrypt(0)] * 3}), sender="owner-2", job="j1")
        with pytest.raises(JobOver, match="'gradient_reply' for job j1, which ended long ago"):
            c.handle(late)


def test_an_owner_forgets_old_ended_jobs_and_declined_offers_and_sheds_its_statistics(keypair, monkeypatch):
    monkeypatch.setattr("deltaml.protocol.ended.KEPT", 1)
    core = owner()
    core.handle(env(m.JobOffer(spec=spec(keypair[0])), job="a"))
    core.handle(env(m.RoleAssignment(role="trainer", models=["all"]), job="a"))
    assert core.jobs["a"].stats is not None
    core.handle(env(m.JobFinished(ok=True), job="a"))
    assert core.jobs["a"].phase is OwnerPhase.FINISHED and core.jobs["a"].stats is None
    core.handle(env(m.JobOffer(spec=spec(keypair[0], features=["a", "c"])), job="b"))  # declined: no column c
    assert list(core.jobs) == ["b"]
    with pytest.raises(JobOver, match="'job_finished' for job a, which ended long ago"):
        core.handle(env(m.JobFinished(ok=True), job="a"))
