"""The escrow contract: real EVM bytecode compiled from contracts/*.sol, run on py-evm (eth-tester).

Roles are checked against the signer, money moves only by the DESIGN formula, each job's escrow is
its own, nothing is payable twice, a re-entrant payee cannot take more than its credit, and the
deadline paths let a stalled job be settled or refunded without the buyer.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from eth_tester.exceptions import TransactionFailed
from hypothesis import HealthCheck, given, settings, strategies as st
from web3 import EthereumTesterProvider, Web3
from web3.exceptions import ContractCustomError, ContractLogicError

from deltaml.protocol.chain import artifact, expected_settlement, int_bytes, job_key, mse_micro

ROOT = Path(__file__).resolve().parents[1]
REVERT = (TransactionFailed, ContractCustomError, ContractLogicError)
FIXED, POOL = 10**16, 10**18


@pytest.fixture(scope="module")
def w3():
    return Web3(EthereumTesterProvider())


def deploy(w3, name, *args):
    art = artifact(name)
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    receipt = w3.eth.wait_for_transaction_receipt(factory.constructor(*args).transact({"from": w3.eth.accounts[0]}))
    return w3.eth.contract(address=receipt.contractAddress, abi=art["abi"])


@pytest.fixture(scope="module")
def escrow(w3):
    return deploy(w3, "DeltaEscrow")


class Parties:
    def __init__(self, w3):
        a = w3.eth.accounts
        self.buyer, self.aggregator, self.stranger = a[1], a[2], a[3]
        self.trainers, self.validators = list(a[4:7]), [a[7]]

    @property
    def owners(self):
        return self.trainers + self.validators


@pytest.fixture(scope="module")
def p(w3):
    return Parties(w3)


_counter = iter(range(10**9))


def now(w3):
    return w3.eth.get_block("latest")["timestamp"]


def create(w3, escrow, p, fixed=FIXED, pool=POOL, rounds=10, deadline=None):
    job = job_key(f"job-{next(_counter)}")
    deadline = deadline or now(w3) + 3600
    value = fixed * len(p.owners) + pool
    escrow.functions.createJob(job, p.aggregator, len(p.owners), rounds, fixed, pool, deadline,
                               b"\x11" * 32).transact({"from": p.buyer, "value": value})
    return job


def staff(escrow, p, job):
    escrow.functions.setParticipants(job, p.trainers, p.validators).transact({"from": p.aggregator})


def confirm_all(escrow, p, job):
    for o in p.owners:
        escrow.functions.confirm(job).transact({"from": o})


def metric(round_, model, sse, scale=64, rows=1):
    return (round_, model, b"\x22" * 32, int_bytes(sse), scale, rows, b"\x33" * 8)


def record(escrow, p, job, round_, model, sse):
    escrow.functions.recordMetric(job, metric(round_, model, sse)).transact({"from": p.aggregator})


def training_job(w3, escrow, p, **kw):
    job = create(w3, escrow, p, **kw)
    staff(escrow, p, job)
    confirm_all(escrow, p, job)
    return job


def micro(v):  # an SSE that the contract reads back as exactly v micro-units (scale 64, one row)
    return -(-v * 2**64 // 10**6)


def complete_job(w3, escrow, p, mse0=4000_000000, full=3000_000000, loo=(3100_000000, 2900_000000, 3050_000000),
                 **kw):
    job = training_job(w3, escrow, p, rounds=kw.pop("rounds", 10), **kw)
    record(escrow, p, job, 0, 0, micro(mse0))
    record(escrow, p, job, 10, 0, micro(full))
    for i, v in enumerate(loo):
        record(escrow, p, job, 10, i + 1, micro(v))
    return job


def credits(escrow, addresses):
    return {a: escrow.functions.credit(a).call() for a in addresses}


def reverts(fn, **tx):
    with pytest.raises(REVERT):
        fn.transact(tx)


# ---- the artefact is what the source compiles to --------------------------------------------

def test_committed_abi_and_bytecode_are_what_the_source_compiles_to(tmp_path):
    node = shutil.which("node")
    assert node and (ROOT / "contracts/node_modules/solc").is_dir(), "make test installs the pinned solc first"
    subprocess.run([node, "compile.js", str(tmp_path)], cwd=ROOT / "contracts", check=True, capture_output=True)
    for built in tmp_path.glob("*.json"):
        fresh, committed = json.loads(built.read_text()), artifact(built.stem)
        assert fresh["source_sha256"] == committed["source_sha256"], f"{built.stem}: run `make contracts`"
        assert fresh["bytecode"] == committed["bytecode"] and fresh["abi"] == committed["abi"]
    assert {b.stem for b in tmp_path.glob("*.json")} == {"DeltaEscrow", "ReentrantPayee"}


def test_the_job_states_named_in_python_are_the_contracts_enum():
    import re

    from deltaml.protocol.chain import JOB_STATES

    source = (Path(__file__).parent.parent / "contracts" / "DeltaEscrow.sol").read_text()
    declared = re.search(r"enum State \{([^}]*)\}", source).group(1)
    assert tuple(name.strip() for name in declared.split(",")) == JOB_STATES


def test_mse_micro_in_python_is_the_contracts(escrow):
    for sse, scale, rows in [(12345678901234567890123, 64, 3), (2**300 + 12345, 290, 89), (999, 16, 1),
                             (7 * 2**200, 200, 7), (0, 100, 5)]:
        assert escrow.functions.mseMicro(int_bytes(sse), scale, rows).call() == mse_micro(sse, scale, rows)


# ---- every function refuses the wrong signer ----------------------------------------------

def test_create_job_needs_the_exact_deposit_and_a_fresh_id(w3, escrow, p):
    job = job_key("fresh")
    args = (job, p.aggregator, 4, 10, FIXED, POOL, now(w3) + 3600, b"\x11" * 32)
    reverts(escrow.functions.createJob(*args), **{"from": p.buyer, "value": 4 * FIXED + POOL - 1})
    reverts(escrow.functions.createJob(job, p.buyer, *args[2:]), **{"from": p.buyer, "value": 4 * FIXED + POOL})
    reverts(escrow.functions.createJob(*args[:6], now(w3) - 1, args[7]), **{"from": p.buyer, "value": 4 * FIXED + POOL})
    escrow.functions.createJob(*args).transact({"from": p.buyer, "value": 4 * FIXED + POOL})
    reverts(escrow.functions.createJob(*args), **{"from": p.stranger, "value": 4 * FIXED + POOL})


def test_only_the_aggregator_posts_participants_and_metrics(w3, escrow, p):
    job = create(w3, escrow, p)
    for who in (p.buyer, p.stranger, p.trainers[0]):
        reverts(escrow.functions.setParticipants(job, p.trainers, p.validators), **{"from": who})
    reverts(escrow.functions.setParticipants(job, p.trainers + [p.buyer], []), **{"from": p.aggregator})
    reverts(escrow.functions.setParticipants(job, p.trainers[:2] + [p.trainers[0]], p.validators),
            **{"from": p.aggregator})
    staff(escrow, p, job)
    reverts(escrow.functions.recordMetric(job, metric(0, 0, 1)), **{"from": p.aggregator})  # not training yet
    confirm_all(escrow, p, job)
    for who in (p.buyer, p.stranger, p.trainers[0], p.validators[0]):
        reverts(escrow.functions.recordMetric(job, metric(0, 0, 1)), **{"from": who})
    reverts(escrow.functions.recordMetric(job, metric(5, 1, 1)), **{"from": p.aggregator})  # LOO only at the end
    record(escrow, p, job, 0, 0, 1)
    reverts(escrow.functions.recordMetric(job, metric(0, 0, 2)), **{"from": p.aggregator})  # no overwrite


def test_the_last_evaluations_metrics_are_recorded_together_all_or_none(w3, escrow, p):
    job = training_job(w3, escrow, p)
    record(escrow, p, job, 0, 0, micro(4000_000000))
    final = [metric(10, m, micro(v)) for m, v in enumerate([3000_000000, 3100_000000, 2900_000000, 3050_000000])]
    for who in (p.buyer, p.stranger, p.trainers[0], p.validators[0]):
        reverts(escrow.functions.recordMetrics(job, final), **{"from": who})
    reverts(escrow.functions.recordMetrics(job, []), **{"from": p.aggregator})
    # one bad entry (a model index past the trainers, then a repeated model) and nothing is recorded
    for bad in (metric(10, 9, 1), final[1]):
        reverts(escrow.functions.recordMetrics(job, [*final, bad]), **{"from": p.aggregator})
        assert not escrow.functions.metricOf(job, 10, 0).call()[-1]
    escrow.functions.recordMetrics(job, final).transact({"from": p.aggregator})
    assert [escrow.functions.metricOf(job, 10, m).call()[2] for m in range(4)] == [3000_000000, 3100_000000,
                                                                                 2900_000000, 3050_000000]
    reverts(escrow.functions.recordMetrics(job, final[:1]), **{"from": p.aggregator})  # no overwrite
    before = credits(escrow, p.owners)
    escrow.functions.settle(job).transact({"from": p.stranger})  # the final metrics are all in
    assert sum(credits(escrow, p.owners).values()) > sum(before.values())


def test_only_named_participants_confirm_and_only_once(w3, escrow, p):
    job = create(w3, escrow, p)
    staff(escrow, p, job)
    for who in (p.buyer, p.aggregator, p.stranger):
        reverts(escrow.functions.confirm(job), **{"from": who})
    escrow.functions.confirm(job).transact({"from": p.trainers[0]})
    reverts(escrow.functions.confirm(job), **{"from": p.trainers[0]})


def test_only_the_buyer_cancels_and_only_before_training(w3, escrow, p):
    job = create(w3, escrow, p)
    staff(escrow, p, job)
    for who in (p.aggregator, p.stranger, p.trainers[0]):
        reverts(escrow.functions.cancel(job), **{"from": who})
    before = escrow.functions.credit(p.buyer).call()
    escrow.functions.cancel(job).transact({"from": p.buyer})
    assert escrow.functions.credit(p.buyer).call() - before == FIXED * 4 + POOL
    reverts(escrow.functions.cancel(job), **{"from": p.buyer})
    reverts(escrow.functions.confirm(job), **{"from": p.trainers[0]})
    started = training_job(w3, escrow, p)
    reverts(escrow.functions.cancel(started), **{"from": p.buyer})


def test_nobody_settles_early_and_nothing_is_paid_twice(w3, escrow, p):
    job = training_job(w3, escrow, p)
    reverts(escrow.functions.settle(job), **{"from": p.buyer})  # before the final metrics or the deadline
    job = complete_job(w3, escrow, p)
    before = credits(escrow, [p.buyer, *p.owners])
    escrow.functions.settle(job).transact({"from": p.stranger})  # complete: anyone may trigger it
    after = credits(escrow, [p.buyer, *p.owners])
    reverts(escrow.functions.settle(job), **{"from": p.aggregator})
    assert credits(escrow, [p.buyer, *p.owners]) == after
    paid = {a: after[a] - before[a] for a in after}
    assert sum(paid.values()) == 4 * FIXED + POOL
    # mse 4000 -> 3000: a quarter of the pool; contributions 100, -100, 50 -> 2/3 and 1/3 of it
    variable = POOL // 4
    assert paid[p.trainers[0]] == FIXED + variable * 100 // 150
    assert paid[p.trainers[1]] == FIXED
    assert paid[p.trainers[2]] == FIXED + variable * 50 // 150
    assert paid[p.validators[0]] == FIXED
    # withdraw pays once
    trainer = p.trainers[0]
    owed = escrow.functions.credit(trainer).call()
    balance = w3.eth.get_balance(trainer)
    receipt = w3.eth.wait_for_transaction_receipt(escrow.functions.withdraw().transact({"from": trainer}))
    assert w3.eth.get_balance(trainer) == balance + owed - receipt.gasUsed * receipt.effectiveGasPrice
    reverts(escrow.functions.withdraw(), **{"from": trainer})


def test_two_jobs_cannot_touch_each_others_escrow(w3, p):
    escrow = deploy(w3, "DeltaEscrow")  # a contract of its own, so the balances are these two jobs'
    a = complete_job(w3, escrow, p)
    b = create(w3, escrow, p, fixed=3 * FIXED, pool=2 * POOL)
    deposit_b = 3 * FIXED * 4 + 2 * POOL
    escrow.functions.settle(a).transact({"from": p.aggregator})
    reverts(escrow.functions.recordMetric(b, metric(0, 0, 1)), **{"from": p.aggregator})
    for who in [p.buyer, *p.owners]:
        if escrow.functions.credit(who).call():
            escrow.functions.withdraw().transact({"from": who})
    assert w3.eth.get_balance(escrow.address) == deposit_b
    escrow.functions.cancel(b).transact({"from": p.buyer})
    assert escrow.functions.credit(p.buyer).call() == deposit_b
    escrow.functions.withdraw().transact({"from": p.buyer})
    assert w3.eth.get_balance(escrow.address) == 0


def test_a_reentrant_payee_gets_its_credit_and_nothing_more(w3, escrow, p):
    attacker = deploy(w3, "ReentrantPayee", escrow.address)
    parties = Parties(w3)
    parties.trainers = [attacker.address, *p.trainers[1:]]
    job = create(w3, escrow, parties)
    staff(escrow, parties, job)
    for o in parties.owners:
        if o == attacker.address:
            attacker.functions.confirm(job).transact({"from": p.stranger})
        else:
            escrow.functions.confirm(job).transact({"from": o})
    record(escrow, parties, job, 0, 0, micro(4000_000000))
    record(escrow, parties, job, 10, 0, micro(3000_000000))
    for i, v in enumerate((3100_000000, 2900_000000, 3050_000000)):
        record(escrow, parties, job, 10, i + 1, micro(v))
    escrow.functions.settle(job).transact({"from": p.stranger})
    owed = escrow.functions.credit(attacker.address).call()
    held = w3.eth.get_balance(escrow.address)
    attacker.functions.pull().transact({"from": p.stranger})
    assert attacker.functions.attempts().call() == 1 and attacker.functions.reentered().call() == 0
    assert w3.eth.get_balance(attacker.address) == owed
    assert w3.eth.get_balance(escrow.address) == held - owed
    reverts(attacker.functions.pull(), **{"from": p.stranger})


# ---- deadline paths ------------------------------------------------------------------------

def test_after_the_deadline_a_stalled_job_settles_on_its_last_verified_metric(w3, escrow, p):
    job = training_job(w3, escrow, p, deadline=now(w3) + 100)
    record(escrow, p, job, 0, 0, micro(4000_000000))
    record(escrow, p, job, 5, 0, micro(3500_000000))
    reverts(escrow.functions.settle(job), **{"from": p.stranger})
    w3.provider.ethereum_tester.time_travel(now(w3) + 200)
    w3.provider.ethereum_tester.mine_blocks()
    before = credits(escrow, [p.buyer, *p.owners])
    escrow.functions.settle(job).transact({"from": p.stranger})  # without the buyer
    paid = {a: v - before[a] for a, v in credits(escrow, [p.buyer, *p.owners]).items()}
    # no leave-one-out metrics yet: fixed rewards, the variable pool back to the buyer
    assert all(paid[o] == FIXED for o in p.owners)
    assert paid[p.buyer] == POOL


def test_after_the_deadline_a_job_without_metrics_is_refunded(w3, escrow, p):
    for stage in ("open", "staffed", "training"):
        job = create(w3, escrow, p, deadline=now(w3) + 100)
        if stage != "open":
            staff(escrow, p, job)
        if stage == "training":
            confirm_all(escrow, p, job)
            record(escrow, p, job, 0, 0, micro(4000_000000))  # a baseline only: no work verified
        w3.provider.ethereum_tester.time_travel(now(w3) + 200)
        w3.provider.ethereum_tester.mine_blocks()
        before = escrow.functions.credit(p.buyer).call()
        escrow.functions.settle(job).transact({"from": p.trainers[0]})
        assert escrow.functions.credit(p.buyer).call() - before == 4 * FIXED + POOL, stage


# ---- payments plus refund equal the deposit, for any numbers ---------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fixed=st.integers(0, 10**19), pool=st.integers(0, 10**21),  # the buyer account holds 10**24
       mse0=st.integers(1, 10**13), full=st.integers(0, 2 * 10**13),
       loo=st.lists(st.integers(0, 2 * 10**13), min_size=3, max_size=3))
def test_payments_plus_refund_equal_the_deposit_to_the_wei(w3, escrow, p, fixed, pool, mse0, full, loo):
    job = complete_job(w3, escrow, p, mse0=mse0, full=full, loo=tuple(loo), fixed=fixed, pool=pool)
    everyone = [p.buyer, *p.owners]
    before = credits(escrow, everyone)
    escrow.functions.settle(job).transact({"from": p.stranger})
    paid = {a: v - before[a] for a, v in credits(escrow, everyone).items()}
    assert sum(paid.values()) == fixed * 4 + pool
    want = expected_settlement(fixed_reward=fixed, variable_pool=pool, trainers=p.trainers,
                               validators=p.validators, mse0=mse0, final={0: full, 1: loo[0], 2: loo[1], 3: loo[2]})
    assert {a: paid[a] for a in p.owners} == want.payments
    assert paid[p.buyer] == want.refund
    for i, c in enumerate(loo):
        if c <= full:  # no positive contribution, no variable share
            assert paid[p.trainers[i]] == fixed


def test_a_dropped_trainer_is_paid_nothing_and_owes_no_final_metric(w3, escrow, p):
    job = training_job(w3, escrow, p)
    gone = p.trainers[1]
    reverts(escrow.functions.drop(job, gone, 3), **{"from": p.stranger})
    reverts(escrow.functions.drop(job, p.validators[0], 3), **{"from": p.aggregator})
    escrow.functions.drop(job, gone, 3).transact({"from": p.aggregator})
    reverts(escrow.functions.drop(job, gone, 4), **{"from": p.aggregator})  # not twice
    record(escrow, p, job, 0, 0, micro(4000_000000))
    record(escrow, p, job, 10, 0, micro(3000_000000))
    reverts(escrow.functions.recordMetric(job, metric(10, 2, micro(1))), **{"from": p.aggregator})
    record(escrow, p, job, 10, 1, micro(3100_000000))
    reverts(escrow.functions.settle(job), **{"from": p.stranger})  # trainer 3's final metric is owed
    record(escrow, p, job, 10, 3, micro(3050_000000))
    reverts(escrow.functions.drop(job, p.trainers[0], 10), **{"from": p.aggregator})  # final metrics begun
    before = credits(escrow, [*p.owners, p.buyer])
    escrow.functions.settle(job).transact({"from": p.stranger})  # complete without the dropped trainer
    after = credits(escrow, [*p.owners, p.buyer])
    paid = {a: after[a] - before[a] for a in after}
    expected = expected_settlement(fixed_reward=FIXED, variable_pool=POOL, trainers=p.trainers,
                                   validators=p.validators, mse0=4000_000000,
                                   final={0: 3000_000000, 1: 3100_000000, 3: 3050_000000}, dropped=[gone])
    assert paid[gone] == 0
    assert {a: paid[a] for a in expected.payments} == expected.payments
    assert sum(paid.values()) == FIXED * len(p.owners) + POOL


def test_the_last_trainers_cannot_all_be_dropped(w3, escrow, p):
    job = training_job(w3, escrow, p)
    escrow.functions.drop(job, p.trainers[0], 1).transact({"from": p.aggregator})
    escrow.functions.drop(job, p.trainers[1], 1).transact({"from": p.aggregator})
    reverts(escrow.functions.drop(job, p.trainers[2], 1), **{"from": p.aggregator})


@pytest.mark.parametrize("progress", [False, True])
def test_an_abandoned_job_settles_at_once_and_refunds_the_buyer(w3, escrow, p, progress):
    job = training_job(w3, escrow, p)
    record(escrow, p, job, 0, 0, micro(4000_000000))
    if progress:
        record(escrow, p, job, 5, 0, micro(3500_000000))
    reverts(escrow.functions.settle(job), **{"from": p.stranger})  # still running: too early
    reverts(escrow.functions.abandon(job, 5), **{"from": p.buyer})  # only the aggregator gives up
    escrow.functions.abandon(job, 5).transact({"from": p.aggregator})
    before = credits(escrow, [*p.owners, p.buyer])
    escrow.functions.settle(job).transact({"from": p.stranger})
    after = credits(escrow, [*p.owners, p.buyer])
    paid = {a: after[a] - before[a] for a in after}
    deposit = FIXED * len(p.owners) + POOL
    if progress:  # work was verified: fixed rewards, the variable pool back
        assert all(paid[o] == FIXED for o in p.owners) and paid[p.buyer] == POOL
    else:
        assert paid[p.buyer] == deposit
    assert sum(paid.values()) == deposit
    reverts(escrow.functions.abandon(job, 6), **{"from": p.aggregator})  # settled: nothing to give up
