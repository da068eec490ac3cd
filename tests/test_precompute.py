"""Obfuscators computed ahead in idle time are the ones the protocol would have computed itself."""

import hashlib
import threading
import time

import numpy as np

from deltaml.agents.precompute import Precomputer
from deltaml.protocol import messages as m
from deltaml.protocol.aggregator import AggregatorCore
from deltaml.protocol.auth import sign
from deltaml.protocol.budget import plan
from deltaml.protocol.drbg import Drbg
from deltaml.protocol.machine import Context
from deltaml.protocol.owner import OwnerCore, OwnerData
from deltaml.protocol.powers import DEFAULT_WINDOW, window_for
from deltaml.protocol.randomness import djn_exponent_bits, expect_obfuscators


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_stream_items_depend_only_on_seed_and_number(keypair):
    pub, priv = keypair
    a, b = Drbg(b"s" * 32), Drbg(b"s" * 32)
    first = [pub.encrypt(7, a) for _ in range(3)]
    stream = b.obfuscators(pub)
    for k in (2, 1):  # computed ahead, out of order
        stream.offer(k, stream.compute(k))
    assert [pub.encrypt(7, b) for _ in range(3)] == first
    assert stream.served_ahead == 2
    assert all(priv.decrypt(c) == 7 for c in first)
    assert pub.encrypt(7, Drbg(b"t" * 32)) != first[0]


def test_an_item_offered_after_it_was_taken_is_dropped(keypair):
    pub, _ = keypair
    stream = Drbg(b"s" * 32).obfuscators(pub)
    k = stream.claim()
    stream.take()
    stream.offer(k, 12345)
    assert stream.ready == {} and stream.take() == stream.compute(1)


def test_claims_stop_once_enough_wait(keypair):
    pub, _ = keypair
    rng = Drbg(b"s" * 32)
    expect_obfuscators(pub, rng, per_step=4)
    stream = rng.obfuscators(pub)
    stream.ahead = 12
    claims = [stream.claim() for _ in range(14)]
    assert claims[:12] == list(range(12)) and claims[12:] == [None, None]
    stream.take()
    assert stream.claim() == 12


def test_helper_works_only_while_the_agent_is_idle(keypair):
    pub, _ = keypair
    rng, idle = Drbg(b"s" * 32), threading.Event()
    stream = rng.obfuscators(pub)
    stream.ahead = 8
    helper = Precomputer(rng, idle, poll=0.01)
    helper.start()
    try:
        time.sleep(0.2)
        assert helper.computed == 0  # the agent is busy
        idle.set()
        wait_until(lambda: len(stream.ready) == 8)
        assert helper.computed == 8  # and no more than asked for
        reference = Drbg(b"s" * 32).obfuscators(pub)
        assert [stream.take() for _ in range(8)] == [reference.compute(k) for k in range(8)]
        assert stream.served_ahead == 8
        wait_until(lambda: len(stream.ready) == 8)  # refilled after the protocol took them
    finally:
        helper.stop()
    assert not helper.thread.is_alive()


def test_checkpointed_stream_goes_on_where_it_stopped(keypair):
    pub, _ = keypair
    rng = Drbg(b"s" * 32)
    for _ in range(3):
        pub.encrypt(1, rng)
    restored = Drbg()
    restored.setstate(rng.getstate())
    assert pub.encrypt(1, restored) == pub.encrypt(1, rng)


def test_a_keys_table_is_built_once_whoever_asks_first(keypair, monkeypatch):
    from deltaml.protocol import randomness

    pub, _ = keypair
    built = []
    real = randomness.FixedBase

    def counting(*args):
        built.append(threading.get_ident())
        time.sleep(0.2)  # a slow build: the other thread asks meanwhile
        return real(*args)

    monkeypatch.setattr(randomness, "FixedBase", counting)
    monkeypatch.setattr(randomness, "_TABLES", {})
    tables = []
    threads = [threading.Thread(target=lambda: tables.append(randomness.fixed_base(pub.n))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(tables) == 3 and tables[0] is tables[1] is tables[2]
    assert tables[0].pow(12345) == randomness.fixed_base(pub.n).pow(12345)


def test_a_known_end_stops_the_claims(keypair):
    pub, _ = keypair
    rng = Drbg(b"e" * 32)
    expect_obfuscators(pub, rng, per_step=4)  # a job starts: three steps' worth may wait
    stream = rng.obfuscators(pub)
    assert stream.ahead == 128
    expect_obfuscators(pub, rng, per_step=4, remaining=6)  # its last steps: six more at most
    claims = [stream.claim() for _ in range(8)]
    assert claims[:6] == list(range(6)) and claims[6:] == [None, None]
    expect_obfuscators(pub, rng, per_step=4, remaining=0)
    stream.take()
    assert stream.claim() is None


def job_spec(pub, rounds, eval_every):
    return m.JobSpec(buyer="buyer", features=["a", "b"], target="y", ranges=[(-10, 10), (-10, 10)], owners=3,
                     validators=1, rounds=rounds, lr=0.5, eval_every=eval_every, key_bits=2048,
                     public_key=pub.to_hex())


def owner_in_a_job(pub, name, role, models, rounds, seed):
    """An owner core with a seeded random source, offered a job and given its role."""
    rng = Drbg(seed * 32)
    X = np.random.default_rng(0).uniform(-1, 1, size=(10, 3))
    core = OwnerCore(Context(name, rng=rng), OwnerData(("a", "b", "y"), X))
    core.handle(from_aggregator(m.JobOffer(spec=job_spec(pub, rounds, eval_every=2)), name))
    core.handle(from_aggregator(m.RoleAssignment(role=role, models=models), name))
    return core, rng.obfuscators(pub)


def from_aggregator(payload, recipient, round_=0):
    return m.Envelope(message_id=f"id{round_}", job_id="j", round=round_, sender="aggregator",
                      recipient=recipient, payload=payload)


def test_a_trainer_stops_asking_for_obfuscators_after_its_last_round(keypair):
    pub, priv = keypair
    core, stream = owner_in_a_job(pub, "owner-1", "trainer", ["all", "without:owner-2"], rounds=5, seed=b"t")
    w = [priv.encrypt(0) for _ in range(3)]
    aheads = []
    for r in range(1, 6):
        core.handle(from_aggregator(m.GradientRequest(scale_bits=32, models={"all": w, "without:owner-2": w}),
                                    "owner-1", round_=r))
        aheads.append(stream.ahead)
    assert aheads == [18, 18, 12, 6, 0]  # 2 models x 3 values a round: three rounds' worth, then what is left


def test_a_validator_prepares_only_the_sse_encryptions_after_the_last_evaluation(keypair):
    pub, priv = keypair
    core, stream = owner_in_a_job(pub, "owner-3", "validator", [], rounds=4, seed=b"v")
    w = [priv.encrypt(0) for _ in range(3)]
    core.handle(from_aggregator(m.EvalRequest(scale_bits=32, models={"all": w}), "owner-3", round_=2))
    assert stream.ahead == 128  # more evaluations to come
    core.handle(from_aggregator(m.EvalRequest(scale_bits=32, models={"all": w, "without:owner-1": w}), "owner-3",
                                round_=4))
    assert stream.ahead == 3  # round 2's model and the two of round 4 wait for one SSE encryption each


def test_the_aggregator_prepares_refresh_masks_only_for_refreshes_to_come(keypair):
    pub, _ = keypair

    def aheads(rounds):
        rng = Drbg(b"a" * 32)
        core = AggregatorCore(Context("aggregator", rng=rng))

        def signed(payload, sender):
            key = hashlib.sha256(sender.encode()).digest()
            return sign(m.Envelope(message_id=sender, job_id="j", sender=sender, recipient="aggregator",
                                   payload=payload), key)

        spec = job_spec(pub, rounds, eval_every=10)
        core.handle(signed(m.JobRequest(spec=spec, initial_model=[pub.encrypt(0)] * 3), "buyer"))
        for name in ("owner-1", "owner-2", "owner-3"):
            core.handle(signed(m.JoinRequest(rows=10), name))
        return len(plan(32, 0, rounds, 10, 32, 60, 2048)[0]), rng.obfuscators(pub).ahead

    per_refresh = 3 * 3  # the full model and two leave-one-out models, three values each
    assert aheads(4) == (0, 0)  # a short job never refreshes: nothing to prepare
    assert aheads(30) == (1, per_refresh)
    assert aheads(100) == (5, 3 * per_refresh)  # three refreshes' worth at most wait


def test_a_processs_trainers_announce_their_obfuscators_and_its_table_suits_their_sum(keypair, monkeypatch):
    from deltaml.protocol import randomness

    pub, _ = keypair
    monkeypatch.setattr(randomness, "_TABLES", {})
    monkeypatch.setattr(randomness, "_EXPECTED", {})
    # 50 rounds, 2 models, 3 values (two features and the intercept): 300 obfuscators each
    trainers = [owner_in_a_job(pub, f"owner-{i}", "trainer", ["all", f"without:owner-{3 - i}"], rounds=50,
                               seed=bytes([i]))[1] for i in (1, 2)]
    owner_in_a_job(pub, "owner-3", "validator", [], rounds=50, seed=b"v")  # a validator announces nothing
    assert randomness._EXPECTED == {pub.n: 600}
    first = trainers[0].take()  # the first draw builds the table, for both trainers' draws
    table = randomness.fixed_base(pub.n)
    assert table.window == window_for(600, djn_exponent_bits(pub.n)) == 7 != window_for(300, 1024)
    assert first == table.pow(trainers[0].exponent(0)) and randomness._EXPECTED == {}
    randomness.expect_uses(pub.n, 10**6)  # the table stays as it was built
    assert randomness.fixed_base(pub.n) is table and randomness._EXPECTED == {}


def test_a_restarted_trainer_announces_the_obfuscators_of_its_rounds_to_come(keypair, monkeypatch):
    from deltaml.protocol import randomness

    pub, priv = keypair
    monkeypatch.setattr(randomness, "_TABLES", {})
    monkeypatch.setattr(randomness, "_EXPECTED", {})
    core, _ = owner_in_a_job(pub, "owner-1", "trainer", ["all", "without:owner-2"], rounds=50, seed=b"r")
    assert randomness._EXPECTED == {pub.n: 300}  # 50 rounds, 2 models, 3 values
    w = [priv.encrypt(0) for _ in range(3)]
    for r in range(1, 11):
        core.handle(from_aggregator(m.GradientRequest(scale_bits=32, models={"all": w, "without:owner-2": w}),
                                    "owner-1", round_=r))
    saved = core.snapshot()
    # the daemon restarts: a new process, no table, nothing announced
    monkeypatch.setattr(randomness, "_TABLES", {})
    monkeypatch.setattr(randomness, "_EXPECTED", {})
    rng = Drbg(b"x" * 32)
    successor = OwnerCore(Context("owner-1", rng=rng), core.data)
    successor.restore(saved)
    assert randomness._EXPECTED == {pub.n: 240}  # the 40 rounds left
    assert rng.obfuscators(pub).ahead == 18  # three rounds' worth wait, as before the restart
    successor.handle(from_aggregator(m.GradientRequest(scale_bits=32, models={"all": w, "without:owner-2": w}),
                                     "owner-1", round_=11))
    bits = djn_exponent_bits(pub.n)
    assert randomness.fixed_base(pub.n).window == window_for(240, bits) != DEFAULT_WINDOW  # 6 bits, not 8


def test_the_helper_builds_a_keys_table_for_the_uses_its_job_expects(keypair, monkeypatch):
    from deltaml.protocol import randomness

    pub, _ = keypair
    monkeypatch.setattr(randomness, "_TABLES", {})
    monkeypatch.setattr(randomness, "_EXPECTED", {})
    rng, idle = Drbg(b"w" * 32), threading.Event()
    expect_obfuscators(pub, rng, per_step=4, uses=100)  # a short job: a narrow table is cheaper to build
    helper = Precomputer(rng, idle, poll=0.01)
    idle.set()
    helper.start()
    try:
        wait_until(lambda: helper.computed >= 1)
    finally:
        helper.stop()
    assert randomness.fixed_base(pub.n).window == window_for(100, djn_exponent_bits(pub.n)) == 5
    stream = rng.obfuscators(pub)
    assert [stream.take() for _ in range(3)] == [Drbg(b"w" * 32).obfuscators(pub).compute(k) for k in range(3)]


def test_announced_keys_whose_table_is_never_built_are_not_kept_for_ever(monkeypatch):
    from deltaml.protocol import randomness

    monkeypatch.setattr(randomness, "_EXPECTED", {})
    for n in range(1000, 1000 + randomness.KEPT_EXPECTATIONS + 5):
        randomness.expect_uses(n, 10)
    randomness.expect_uses(1005, 10)  # announced again: now the newest
    assert len(randomness._EXPECTED) == randomness.KEPT_EXPECTATIONS
    assert 1004 not in randomness._EXPECTED and randomness._EXPECTED[1005] == 20
