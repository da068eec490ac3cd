"""Silence on the memory bus: a trainer or the buyer stops answering and the aggregator's deadline acts.

The real-broker versions, with killed processes, are in test_faults.py; these are the fast unit-level
proofs of the same rules.
"""

import asyncio

import pytest

from deltaml.marketplace import DemoConfig, baselines, make_spec, memory_job, prepare_parts
from deltaml.agents.bus import MAX_ATTEMPTS
from deltaml.agents.runtime import GAVE_UP
from deltaml.protocol.buyer import BuyerPhase


class Silent:
    """A core that stops answering some messages (a closed laptop): each rule is ``(message type,
    from round[, which payloads])``."""

    def __init__(self, core, *rules: tuple) -> None:
        if not rules or not all(isinstance(r, tuple) and len(r) >= 2 for r in rules):
            raise TypeError(f"rules are (message type, from round[, which payloads]) tuples, got {rules!r}")
        self.core = core
        self.rules = [rule if len(rule) == 3 else (*rule, lambda payload: True) for rule in rules]
        self.swallowed = 0

    def __getattr__(self, name):  # everything else (ctx, jobs, open_job, tick) is the real core's
        return getattr(self.core, name)

    def _unheard(self, env) -> bool:
        return any(env.type == kind and env.round >= from_round and what(env.payload)
                   for kind, from_round, what in self.rules)

    def handle(self, env):
        if self._unheard(env):
            self.swallowed += 1
            return []
        return self.core.handle(env)


class Broken(Silent):
    """A core whose handler fails on some messages (a bug, memory running out) at every try."""

    def handle(self, env):
        if self._unheard(env):
            self.swallowed += 1
            raise MemoryError("the trainer's machine ran out of memory")
        return self.core.handle(env)


async def run(config, keypair, silent: dict, kind=Silent):
    data, parts = prepare_parts(config)
    pub, priv = keypair
    spec = make_spec(config, data, pub.to_hex(), "buyer")
    wrapped = {}

    def wrap(name, core):
        if name in silent:
            rules = silent[name]
            wrapped[name] = kind(core, *(rules if isinstance(rules, list) else [rules]))
            return wrapped[name]
        return core

    job, job_id, dead, ledger, _ = await memory_job(config, parts, spec, priv, wrap=wrap, tick_seconds=0.05)
    return job, ledger, parts, wrapped


def chain_totals(ledger, job):
    """Deposit, what was credited by the escrow, and what the contract still holds."""
    c = ledger.chain
    return job.spec.deposit_wei, sum(job.payments_wei.values()) + job.refund_wei, c.balance(c.address)


async def test_a_silent_trainer_is_dropped_when_the_quorum_holds_and_the_rest_is_exact(keypair, capsys):
    # A deadline is every party's, also the validator's and buyer's during an evaluation (all agents
    # share one process and its GIL here): 2 s proved too short on a loaded CI machine.
    config = DemoConfig(rounds=6, eval_every=3, round_timeout=5.0, quorum=3)
    job, ledger, parts, wrapped = await run(config, keypair, {"owner-2": ("gradient_request", 3)})
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.dropped == ["owner-2"] and job.trainers == ["owner-1", "owner-3", "owner-4"]
    # the model trained without owner-2 from the start became the full model: centralised GD on the rest
    stayed = [p for i, p in enumerate(parts) if i != 1]
    expected = baselines(stayed, DemoConfig(owners=4, validators=1, rounds=6, eval_every=3))["centralized_gd_mse"]
    assert abs(job.published[6]["all"] - expected) / expected < 1e-6
    gone = job.addresses["owner-2"]
    assert gone not in job.payments_wei  # it did not finish its work
    assert job.settlement.payments == {n: job.payments_wei[job.addresses[n]] for n in job.settlement.payments}
    deposit, credited, balance = chain_totals(ledger, job)
    assert credited == deposit and balance == 0
    assert wrapped["owner-2"].swallowed >= 1
    # the buyer's report and table name it (they used to leave it out without a word)
    from deltaml.agents.runtime import buyer_report
    from deltaml.commands.common import _print_earnings
    from deltaml.protocol.buyer import BuyerCore

    report = buyer_report(job, "j", 2048, 0.0)
    assert report["dropped"] == ["owner-2"] and report["participants"]["owner-2"] == gone
    _print_earnings(report)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["owner-2", gone, "dropped", "0"] in rows
    assert BuyerCore.status(job)["dropped"] == ["owner-2"]  # what the buyer's log line says


async def test_a_trainer_whose_handler_fails_says_so_and_is_dropped_at_once_under_the_quorum(keypair):
    """STYLE §4: a failing owner replies with a failure instead of going silent. Its handler raised
    at every try, the message was dead-lettered and the owner said nothing: the job waited its
    round timeout (600 s here) for a gradient that could never come."""
    config = DemoConfig(rounds=6, eval_every=3, quorum=3)
    job, ledger, parts, wrapped = await asyncio.wait_for(
        run(config, keypair, {"owner-2": ("gradient_request", 3)}, kind=Broken), 120)
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.dropped == ["owner-2"] and wrapped["owner-2"].swallowed == MAX_ATTEMPTS
    stayed = [p for i, p in enumerate(parts) if i != 1]
    expected = baselines(stayed, DemoConfig(owners=4, validators=1, rounds=6, eval_every=3))["centralized_gd_mse"]
    assert abs(job.published[6]["all"] - expected) / expected < 1e-6
    assert wrapped["owner-2"].jobs[job_id_of(job, wrapped)].reason == "could not handle gradient_request of round 3"
    deposit, credited, balance = chain_totals(ledger, job)
    assert credited == deposit and balance == 0 and job.addresses["owner-2"] not in job.payments_wei


def job_id_of(job, wrapped) -> str:
    """The id of the one job the wrapped cores took part in."""
    (job_id,) = {j for core in wrapped.values() for j in core.jobs}
    return job_id


async def test_a_trainer_left_alone_by_the_quorum_trains_on_and_its_model_without_it_stands_still(keypair):
    config = DemoConfig(owners=3, validators=1, rounds=4, eval_every=2, round_timeout=5.0, quorum=1)
    # (the bound: this job takes seconds; it used to fail at every tick, dividing by zero rows, for ever)
    job, ledger, parts, _ = await asyncio.wait_for(run(config, keypair, {"owner-2": ("gradient_request", 2)}), 120)
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.dropped == ["owner-2"] and job.trainers == ["owner-1"]
    alone = baselines([parts[0], parts[2]], DemoConfig(owners=2, validators=1, rounds=4, eval_every=2))
    assert abs(job.published[4]["all"] - alone["centralized_gd_mse"]) / alone["centralized_gd_mse"] < 1e-6
    deposit, credited, balance = chain_totals(ledger, job)
    assert credited == deposit and balance == 0


async def test_a_silent_trainer_without_a_quorum_fails_the_job_and_refunds_the_deposit(keypair):
    config = DemoConfig(rounds=6, eval_every=3, round_timeout=5.0)
    job, ledger, _, _ = await run(config, keypair, {"owner-2": ("gradient_request", 2)})
    assert job.phase is BuyerPhase.FAILED
    assert "round 2: no gradient from owner-2" in job.reason
    deposit, credited, balance = chain_totals(ledger, job)
    assert job.settled and job.refund_wei == deposit and credited == deposit and balance == 0


async def test_a_silent_buyer_fails_the_job_after_the_deadline_with_the_escrow_refunded(keypair):
    # after round 3's verified metric the fixed rewards are earned; the pool goes back to the buyer
    config = DemoConfig(rounds=40, eval_every=3, round_timeout=5.0)
    job, ledger, _, wrapped = await run(config, keypair, {"buyer": ("refresh_request", 0)})
    assert job.phase is BuyerPhase.FAILED and "the buyer's refresh" in job.reason
    assert wrapped["buyer"].swallowed == 1
    deposit, credited, balance = chain_totals(ledger, job)
    assert job.settled and credited == deposit and balance == 0
    assert job.refund_wei == config.variable_pool_wei
    assert sorted(job.payments_wei.values()) == [config.fixed_reward_wei] * config.owners


def settled_event(payload):
    return payload.event == "Settled"


def settle_receipt(payload):
    return payload.function == "settle"


@pytest.mark.parametrize("unheard", [[("chain_event", 0, settled_event)], [("tx_receipt", 0, settle_receipt)]])
async def test_the_result_goes_on_the_first_word_that_the_escrow_is_settled(keypair, unheard):
    config = DemoConfig(rounds=3, eval_every=3, round_timeout=5.0)
    job, _, _, wrapped = await run(config, keypair, {"aggregator": unheard})
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.model is not None and wrapped["aggregator"].swallowed == 1


def once(what):
    """A payload rule that matches the first payload ``what`` matches, and no other."""
    hits = []

    def first(payload):
        if what(payload) and not hits:
            hits.append(payload)
            return True
        return False
    return first


async def test_an_aggregator_that_missed_both_settle_signals_asks_the_ledger_again(keypair):
    """The settle's receipt and the Settled event both went astray (the chain did settle): at the
    deadline the aggregator sends the same signed settle to the ledger once more, which answers
    from the chain with the mined receipt and events, and the buyer gets its model."""
    config = DemoConfig(rounds=3, eval_every=3, round_timeout=5.0)
    # no Settled event ever reaches it: the answer to the second request (a receipt the wallet must
    # recognise as its own) is what lets the result go
    unheard = [("chain_event", 0, settled_event), ("tx_receipt", 0, once(settle_receipt))]
    job, ledger, _, wrapped = await run(config, keypair, {"aggregator": unheard})
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.model is not None and wrapped["aggregator"].swallowed == 3  # event, receipt, event again
    assert ledger.gas["settle"]["calls"] == 2  # relayed twice; the second answer came from the chain
    deposit, credited, balance = chain_totals(ledger, job)
    assert job.settled and credited == deposit and balance == 0


async def test_a_settle_signed_again_is_the_one_the_aggregator_asks_the_ledger_about_again(keypair, monkeypatch):
    """The aggregator keeps its signed settle, to send it again if neither the receipt nor the
    Settled event comes. When the ledger had it signed again (a gas price below the base fee), it
    sent the first once more: a nonce the chain had used, refused, and the job failed although
    the escrow was settled. It now sends the one signed again, and the chain's answer lets the
    result go."""
    from web3 import Web3

    from deltaml.agents.ledger.node import Chain, Underpriced
    from deltaml.protocol.chain import decode_call

    real, spiked = Chain.send, []

    def send(self, raw, tx):  # the first settle meets a base fee above its price
        if decode_call(tx.data)[0] == "settle" and not spiked:
            spiked.append("0x" + Web3.keccak(raw).hex())
            raise Underpriced("its gas price is below the chain's base fee (a test's spike)", spiked[0])
        return real(self, raw, tx)

    monkeypatch.setattr(Chain, "send", send)
    config = DemoConfig(rounds=3, eval_every=3, round_timeout=5.0)
    unheard = [("chain_event", 0, settled_event), ("tx_receipt", 0, once(lambda p: settle_receipt(p) and p.mined))]
    job, ledger, _, wrapped = await run(config, keypair, {"aggregator": unheard})
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert len(spiked) == 1 and ledger.gas["settle"]["calls"] == 2  # mined once, then answered from the chain
    assert ledger.chain.mined(spiked[0]) is None  # the settle mined is the one signed again, not a retry of the first
    deposit, credited, balance = chain_totals(ledger, job)
    assert job.settled and credited == deposit and balance == 0


async def test_an_aggregator_that_never_hears_the_escrow_settled_fails_the_job_without_a_result(keypair):
    """The final model goes out only on the chain's word that the escrow is settled (its Settled
    event or the settle's receipt); without either, even after asking the ledger again, the job
    ends at the deadline with the reason, and the buyer holds no result."""
    config = DemoConfig(rounds=3, eval_every=3, round_timeout=5.0)
    unheard = [("chain_event", 0, settled_event), ("tx_receipt", 0, settle_receipt)]
    job, ledger, _, wrapped = await run(config, keypair, {"aggregator": unheard})
    assert job.phase is BuyerPhase.FAILED, job.reason
    assert "round 3: waited 5 s for the chain to report the escrow settled" in job.reason
    assert job.model is None and wrapped["aggregator"].swallowed >= 4  # both signals, twice
    deposit, credited, balance = chain_totals(ledger, job)  # the chain did settle: what it paid stands
    assert job.settled and credited == deposit and balance == 0


async def test_a_buyer_that_never_closes_its_job_keeps_no_owner_waiting(keypair):
    """The buyer has its result (the escrow is settled by then) but never says so: at the deadline
    the aggregator finishes the job and tells the owners it ended well."""
    import asyncio

    from deltaml.protocol.aggregator import AggPhase
    from deltaml.protocol.owner import OwnerPhase

    class Mute:  # takes the result, never sends the close
        def __init__(self, core):
            self.core = core

        def __getattr__(self, name):
            return getattr(self.core, name)

        def handle(self, env):
            out = self.core.handle(env)
            return [] if env.type == "job_result" else out

    config = DemoConfig(rounds=3, eval_every=3, round_timeout=5.0)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    cores = {}

    def wrap(name, core):
        cores[name] = Mute(core) if name == "buyer" else core
        return cores[name]

    async def hold():
        for _ in range(600):  # a guard, not a measure: the deadline is 5 s
            if all(j.phase is OwnerPhase.FINISHED for n, c in cores.items() if n.startswith("owner")
                   for j in c.jobs.values()):
                return
            await asyncio.sleep(0.05)

    job, job_id, dead, _, _ = await memory_job(config, parts, spec, keypair[1], wrap=wrap, tick_seconds=0.05,
                                               hold=hold)
    assert job.phase is BuyerPhase.FINISHED and job.model is not None and dead == []
    assert cores["aggregator"].jobs[job_id].phase is AggPhase.FINISHED
    assert {cores[f"owner-{i}"].jobs[job_id].phase for i in range(1, 6)} == {OwnerPhase.FINISHED}


@pytest.mark.parametrize("quorum", [5, 9])
def test_a_quorum_above_the_trainers_is_refused_where_the_job_is_read(quorum, keypair):
    """By the spec itself: the buyer's command refuses it in one line, and a request carrying one
    is dead-lettered as undecodable, before any aggregator opens a job for it."""
    import json

    from pydantic import ValidationError

    from deltaml.protocol import messages as m
    from deltaml.protocol.errors import DecodeError

    data, _ = prepare_parts(DemoConfig())
    with pytest.raises(ValidationError, match="more than the job's 4 trainers"):
        make_spec(DemoConfig(quorum=quorum), data, keypair[0].to_hex(), "buyer")
    spec = make_spec(DemoConfig(), data, keypair[0].to_hex(), "buyer")
    request = m.Envelope(message_id="r", job_id="j", sender="buyer", recipient="aggregator",
                         payload=m.JobRequest(spec=spec, initial_model=[keypair[0].encrypt(0)] * 11))
    raw = json.loads(m.encode(request))
    raw["payload"]["spec"]["quorum"] = quorum
    with pytest.raises(DecodeError, match="quorum"):
        m.decode(json.dumps(raw))
    raw["payload"]["spec"].update(quorum=2, leave_one_out=False)
    with pytest.raises(DecodeError, match="needs the leave-one-out models"):
        m.decode(json.dumps(raw))


class After:
    """A core that does one thing more after each message of type ``kind``: ``then(core, env)``,
    whose outputs follow the message's own."""

    def __init__(self, core, kind: str, then) -> None:
        self.core, self.kind, self.then = core, kind, then

    def __getattr__(self, name):
        return getattr(self.core, name)

    def handle(self, env):
        out = self.core.handle(env)
        if env.type == self.kind:
            out += self.then(self.core, env)
        return out


def hears_chain_events_twice(core) -> After:
    """Every chain event a second time, under a new message id: what a party sees when the ledger
    publishes a transaction's events again (a redelivered request)."""
    return After(core, "chain_event",
                 lambda c, env: c.handle(env.model_copy(update={"message_id": env.message_id + "-again"})))


async def test_chain_events_heard_twice_change_nothing(keypair):
    """Each party takes a chain event once: no second setParticipants (which the contract refuses,
    failing the job), no payment counted twice, no second withdraw."""
    config = DemoConfig(rounds=3, eval_every=3)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    cores = {}

    def wrap(name, core):
        cores[name] = core
        return hears_chain_events_twice(core)

    job, job_id, dead, ledger, _ = await memory_job(config, parts, spec, keypair[1], wrap=wrap)
    assert job.phase is BuyerPhase.FINISHED, job.reason
    assert job.model is not None and not dead, dead
    deposit, credited, balance = chain_totals(ledger, job)
    assert credited == deposit and balance == 0
    for name, core in cores.items():
        if name.startswith("owner"):
            owner = core.jobs[job_id]
            assert owner.paid_wei == job.payments_wei[core.ctx.wallet.address]
    assert ledger.gas["setParticipants"]["calls"] == 1 and ledger.gas["withdraw"]["calls"] == config.owners + 1


async def test_a_deposit_that_lands_after_the_buyer_gave_up_is_refunded_at_once(keypair):
    """The escrow was created after its job had failed: nobody gave it up, and the deposit sat in
    it until the deadline (hours). The aggregator now abandons and settles it when it appears."""
    config = DemoConfig(rounds=3, eval_every=3)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")

    def wrap(name, core):  # the buyer gives the job up just after sending its deposit (Ctrl-C then)
        return After(core, "participants", lambda c, env: c.give_up(env.job_id, GAVE_UP)) if name == "buyer" else core

    job, job_id, dead, ledger, _ = await memory_job(config, parts, spec, keypair[1], wrap=wrap)
    assert job.phase is BuyerPhase.FAILED and job.reason == GAVE_UP
    assert job.deposit == "made" and job.settled and job.withdrawn
    deposit, credited, balance = chain_totals(ledger, job)
    assert job.refund_wei == deposit == credited and job.payments_wei == {} and balance == 0
    assert ledger.gas["abandon"]["calls"] == 1 and "setParticipants" not in ledger.gas  # nothing staffed
