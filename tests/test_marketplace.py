"""Whole marketplace on the in-process router: encrypted training equals centralised training."""

import argparse
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from deltaml.cli import build_parser, main
from deltaml.data import load_diabetes, write_csv
from deltaml.marketplace import DemoConfig, make_spec, prepare_parts, run_memory
from deltaml.protocol.fixedpoint import SLACK_BITS
from deltaml.protocol.paillier import PrivateKey


class SpyKey(PrivateKey):
    """The buyer's key, recording every plaintext it sees outside a publication."""

    def __init__(self, base: PrivateKey) -> None:
        self.__dict__.update(base.__dict__)
        self.masked_views: list[int] = []
        self.published = 0
        self._publishing = False

    def decrypt(self, c):
        self._publishing = True
        try:
            self.published += 1
            return super().decrypt(c)
        finally:
            self._publishing = False

    def decrypt_raw(self, c):
        value = super().decrypt_raw(c)
        if not self._publishing:
            self.masked_views.append(int(value))
        return value


def assert_matches_centralised(report):
    assert report["key_bits"] >= 2048
    rel = abs(report["final_mse"] - report["centralized_gd_mse"]) / report["centralized_gd_mse"]
    assert rel < 1e-6
    assert np.allclose(report["model"], report["centralized_gd_model"], rtol=1e-6, atol=1e-6)
    names = {a: n for n, a in report["participants"].items()}
    for address, c in report["contributions"].items():
        assert c == pytest.approx(report["centralized_contributions"][names[address]], rel=1e-4, abs=1e-4)
    assert_settled_on_chain(report)
    assert report["messages_refused"] == []


def assert_settled_on_chain(report):
    """The contract paid what the buyer predicted, everyone withdrew it, the escrow is empty."""
    assert sum(report["payments_wei"].values()) + report["refund_wei"] == report["deposit_wei"]
    assert report["settlement_as_predicted"]
    chain = report["chain"]
    assert chain["contract_balance_wei"] == 0 and not any(chain["credit_left_wei"].values())
    withdrawn = dict(chain["withdrawn_wei"])
    assert withdrawn.pop(report["buyer_address"], 0) == report["refund_wei"]
    assert withdrawn == {a: v for a, v in report["payments_wei"].items()}


def test_diabetes_job_equals_centralised_gd_and_the_buyer_sees_only_masks(keypair):
    pub, priv = keypair
    spy = SpyKey(priv)
    config = DemoConfig(rounds=6, eval_every=5, frac_bits=64, magnitude_bits=256)  # forces refreshes
    report = run_memory(config, keypair=(pub, spy))
    assert_matches_centralised(report)
    assert [r for r, _ in report["mse_history"]] == [0, 5, 6]
    # The buyer decrypted nothing but masked values, apart from what it publishes:
    # one metric per model evaluated (1 + 1 + 5) and the final model (11 coordinates).
    assert spy.published == 3 + 4 + 11
    floor = 2 ** (config.magnitude_bits + config.frac_bits - 1)
    assert spy.masked_views and all(floor < v < 2 ** (pub.bits - 3) for v in spy.masked_views)
    assert len({v >> (config.magnitude_bits + SLACK_BITS) for v in spy.masked_views}) > 0.9 * len(spy.masked_views)


def test_any_csv_gives_the_same_equality(tmp_path, keypair):
    data = load_diabetes()
    path = tmp_path / "rows.csv"
    write_csv(data.take(np.arange(200)), path)
    report = run_memory(DemoConfig(owners=4, validators=1, rounds=3, eval_every=3, dataset=str(path)),
                        keypair=keypair)
    assert_matches_centralised(report)


def test_poisoned_owner_gets_no_variable_share(keypair):
    report = run_memory(DemoConfig(rounds=10, eval_every=10, poison_owner=1), keypair=keypair)
    assert_matches_centralised(report)
    address = report["participants"]
    c = {n: report["contributions"].get(a) for n, a in address.items()}
    paid = {n: report["payments_wei"][a] for n, a in address.items()}
    fixed = 10**16
    assert c["owner-1"] < 0 and paid["owner-1"] == fixed
    assert all(c[o] > 0 and paid[o] > fixed for o in ("owner-2", "owner-3", "owner-4"))
    assert paid["owner-5"] == fixed  # the validator


def test_a_job_with_one_trainer_pays_it_for_the_whole_improvement(keypair):
    # its leave-one-out model is trained on no one: it stays the initial model (it used to divide by
    # zero rows in the aggregator's step, which then waited out its round timeout)
    report = run_memory(DemoConfig(owners=2, validators=1, rounds=4, eval_every=2, round_timeout=30.0),
                        keypair=keypair)
    assert_matches_centralised(report)
    mse0 = report["mse_history"][0][1]
    trainer = report["participants"]["owner-1"]
    assert report["contributions"] == {trainer: pytest.approx(mse0 - report["final_mse"], rel=1e-6)}
    assert report["payments_wei"][trainer] > 10**16


def test_cli_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["demo", "--bus", "memory", "--rounds", "2", "--eval-every", "1", "--report", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("rounds", "owners", "key_bits", "mse_history", "final_mse", "centralized_gd_mse",
                "closed_form_mse", "contributions", "payments_wei", "deposit_wei", "refund_wei", "wall_seconds"):
        assert key in report
    assert_matches_centralised(report)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("round")]
    assert [int(l.split()[1]) for l in lines] == [0, 1, 2]


def test_a_split_into_a_file_or_under_one_is_one_line_naming_it(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("kept\n")
    assert main(["dataset", "split", "diabetes", "--parts", "2", "--out", str(taken)]) == 2
    assert capsys.readouterr().err == f"deltaml: error: --out {taken}: not a directory (it names the directory for the parts)\n"
    assert main(["dataset", "split", "diabetes", "--parts", "2", "--out", str(taken / "parts")]) == 2
    assert capsys.readouterr().err == f"deltaml: error: {taken / 'parts'}: Not a directory\n"  # not "[Errno 20] …"
    assert taken.read_text() == "kept\n"
    assert main(["dataset", "split", "diabetes", "--parts", "2", "--out", str(tmp_path / "parts")]) == 0
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["owner-1.csv", "owner-2.csv"]


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "--rounds must be between 1 and 100000, got 0"),
    (["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--lr", "inf"], "--lr must be a positive number, got inf"),
    (["--owners", "1"], "need at least one validator and one trainer"),
    (["--poison-owner", "5"], "--poison-owner must name a trainer (1..4)"),
    (["--quorum", "5"], "--quorum must be between 0 and the 4 trainers, got 5"),
    (["--round-timeout", "0"], "--round-timeout must be a positive number of seconds, got 0.0"),
])
def test_demo_flags_a_job_cannot_run_with_are_one_line_errors(flags, message, capsys):
    assert main(["demo", "--bus", "memory", *flags]) == 2
    assert capsys.readouterr().err == f"deltaml: error: {message}\n"


def test_a_demo_flag_is_checked_before_the_agents_the_broker_client_and_the_chain_load():
    """In a fresh interpreter: the one-line answer to a mistyped flag comes before a second of
    imports it does not need (eth_account alone is half of it)."""
    heavy = ("aio_pika", "web3", "eth_account", "eth_tester", "structlog", "deltaml.agents", "deltaml.marketplace.demo")
    code = ("import sys\nfrom deltaml.cli import main\n"
            "rc = main(['demo', '--owners', '1'])\n"
            f"print(rc, [m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stderr == "deltaml: error: need at least one validator and one trainer\n"
    assert done.stdout == "2 []\n"


def test_an_output_file_that_cannot_be_written_is_refused_before_the_job(tmp_path, capsys):
    """Not after it: the job's money moves and its model arrives once, and the report or model
    would be lost to a typo in a path."""
    missing = tmp_path / "no-such-dir" / "r.json"
    assert main(["demo", "--bus", "memory", "--report", str(missing)]) == 2
    assert capsys.readouterr() == ("", f"deltaml: error: --report {missing}: no directory {missing.parent}\n")
    assert main(["demo", "--bus", "memory", "--report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"deltaml: error: --report {tmp_path}: is a directory\n"


BUYER = ["buyer", "train", "--features", "a,b", "--target", "y", "--owners", "3", "--validators", "1",
         "--rounds", "5", "--lr", "1", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"]


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "--rounds 0: input should be greater than or equal to 1"),
    (["--lr", "inf"], "--lr inf: input should be a finite number"),
    (["--validators", "3"], "need at least one trainer: 3 owners, 3 validators"),
    (["--fixed-reward-wei", "-1"], "--fixed-reward-wei -1: input should be greater than or equal to 0"),
    (["--features", "a,y"], "features and target must be distinct columns, got a, y, y"),
    (["--model-out", "/no-such-dir/m.json"], "--model-out /no-such-dir/m.json: no directory /no-such-dir"),
    # the contract refuses a deadline already past, but only once every owner has been recruited
    (["--deadline-hours", "0"], "--deadline-hours 0: must be at least 1"),
    (["--quorum", "3"], "--quorum 3: more than the job's 2 trainers"),
    (["--round-timeout", "-5"], "--round-timeout -5.0: input should be greater than 0"),
])
def test_buyer_flags_a_job_cannot_run_with_are_one_line_errors(flags, message, capsys):
    """Refused before the buyer looks for a broker (the URL here has none)."""
    assert main([*BUYER, "--key", "/no-such-dir/buyer.key", *flags]) == 2  # never read: refused before
    assert capsys.readouterr().err == f"deltaml: error: {message}\n"


def test_a_buyer_without_a_key_file_is_refused(capsys):
    """A throwaway key would take with it the refund of a job cut short (Ctrl-C, a crash)."""
    assert main(BUYER) == 2
    assert capsys.readouterr().err.startswith("deltaml: error: --key FILE is needed: the deposit is paid from")


@pytest.mark.parametrize("role, flags", [
    ("owner", ["--data", "/no-such-dir/owner.csv"]), ("aggregator", []),
])
@pytest.mark.parametrize("tick", ["0", "-1", "nan"])
def test_a_daemon_refuses_a_tick_that_would_spin_before_the_broker(role, flags, tick, capsys):
    """Before the broker (the URL has none) and before the owner's data (the path is missing)."""
    assert main([role, *flags, "--tick-seconds", tick, "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"]) == 2
    assert capsys.readouterr().err == f"deltaml: error: --tick-seconds {float(tick)}: must be a positive number of seconds\n"


@pytest.mark.parametrize("variable, value, message", [
    ("DELTAML_LOG_LEVEL", "loud", "input should be 'debug', 'info', 'warning' or 'error'"),
    ("DELTAML_KEY_BITS", "big", "input should be a valid integer"),
    ("DELTAML_BUS", "carrier-pigeon", "input should be 'amqp' or 'memory'"),
])
def test_a_setting_from_the_environment_that_cannot_be_used_is_one_line(variable, value, message, monkeypatch, capsys):
    """It was a pydantic traceback before any command ran (and an unknown log level became info)."""
    monkeypatch.setenv(variable, value)
    assert main(["demo", "--bus", "memory"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltaml: error: {variable}={value}: {message}") and err.count("\n") == 1


def test_a_log_level_is_one_of_four_in_any_case(monkeypatch):
    monkeypatch.setenv("DELTAML_LOG_LEVEL", "WARNING")
    assert build_parser().parse_args(["aggregator"]).log_level == "warning"
    assert build_parser().parse_args(["owner", "--data", "d.csv", "--log-level", "Debug"]).log_level == "debug"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["aggregator", "--log-level", "verbose"])


def test_every_flag_says_what_it_is_for():
    """``deltaml X --help`` explains each flag (the shared ones and the job's shape included)."""
    parser = build_parser()
    pending = [parser]
    while pending:
        p = pending.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += action.choices.values()
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{p.prog} {'/'.join(action.option_strings) or action.dest} has no help"


def test_a_diverging_job_fails_with_the_reason_and_a_hint(keypair):
    """The final metrics of a model that diverged are too large for the contract; the buyer has
    closed the job by then, and the refused transaction used to leave it waiting for the escrow's
    deadline. It must end, refunded, with the chain's reason and a hint."""
    ended = []

    def job():
        try:
            run_memory(DemoConfig(rounds=20, eval_every=10, lr=40.0), keypair=keypair)
        except RuntimeError as exc:
            ended.append(str(exc))

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    thread.join(timeout=600)  # a guard against the hang this is about, not a measure of speed
    assert ended, "the job did not end"
    assert "recordMetrics failed on chain: Invalid(metric value)" in ended[0]
    assert "gradient descent diverged; try a smaller --lr" in ended[0]


def test_the_result_waits_for_the_chain_and_a_refused_metric_ends_the_job_once(keypair, monkeypatch):
    """The final model goes to the buyer only after the chain took the metrics and settled the
    escrow: a metric the contract refuses fails the job before the buyer holds a result it did not
    pay for, the owners are told once that it failed (not first that it ended well), and the
    deposit comes back but for the fixed rewards of the work the owners did (no variable share)."""
    import asyncio

    from deltaml.marketplace import make_spec, memory_job, prepare_parts

    from deltaml.marketplace import memory
    from deltaml.agents.runtime import escrow_outcome

    left = {}

    async def as_the_buyer_leaves(ledger, buyer, job_id, **kw):
        # the demo waits on the ledger itself; `deltaml buyer train` has only the buyer's word, and
        # left as soon as it heard of the failure: its refund stayed credited in the contract
        job = buyer.jobs[job_id]
        left.update(withdrawn=job.withdrawn, open=job.escrow_open, credit=ledger.chain.credit(job.buyer_address),
                    said=escrow_outcome(job))
        return job

    monkeypatch.setattr(memory, "withdrawals", as_the_buyer_leaves)
    config = DemoConfig(rounds=20, eval_every=10, lr=40.0)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    job, _, refused, ledger, _ = asyncio.run(memory_job(config, parts, spec, keypair[1]))
    assert left == {"withdrawn": True, "open": False, "credit": 0,
                    "said": f"{job.refund_wei} wei of the {spec.deposit_wei} wei deposit refunded to {job.buyer_address}"}
    assert job.phase.name == "FAILED" and job.reason.startswith("recordMetrics failed on chain")
    assert job.model is None  # no final model was sent
    assert refused == []  # no owner was told twice how the job ended
    assert job.settled and set(job.payments_wei.values()) == {spec.fixed_reward_wei}
    assert job.refund_wei + sum(job.payments_wei.values()) == spec.deposit_wei
    assert ledger.chain.credit(job.buyer_address) == 0  # and the buyer took it back


def test_a_job_without_leave_one_out_trains_the_full_model_only(keypair):
    import asyncio

    from deltaml.marketplace import baselines, make_spec, memory_job, prepare_parts

    config = DemoConfig(owners=4, rounds=4, eval_every=2)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer", escrow=False).model_copy(
        update={"leave_one_out": False})
    job, _, refused, _, timings = asyncio.run(memory_job(config, parts, spec, keypair[1]))
    assert refused == [] and job.contributions == {}
    assert set(job.published[4]) == {"all"}  # no leave-one-out model was trained or scored
    expected = baselines(parts, config)["centralized_gd_mse"]
    assert abs(job.published[4]["all"] - expected) / expected < 1e-6
    assert job.settlement.payments and set(job.settlement.payments.values()) == {config.fixed_reward_wei}


def test_a_paid_job_needs_leave_one_out(keypair):
    from deltaml.marketplace import make_spec, prepare_parts
    from deltaml.protocol import messages as m
    from deltaml.protocol.aggregator import AggregatorCore
    from deltaml.protocol.chain import Wallet
    from deltaml.protocol.errors import ProtocolError
    from deltaml.protocol.machine import Context

    config = DemoConfig(owners=3, rounds=2)
    data, _ = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer").model_copy(update={"leave_one_out": False})
    core = AggregatorCore(Context("aggregator", wallet=Wallet(private_key=b"\x01" * 32)))
    request = m.JobRequest(spec=spec, initial_model=[keypair[0].encrypt(0)] * (len(spec.features) + 1))
    with pytest.raises(ProtocolError, match="leave-one-out"):
        core.handle(m.Envelope(message_id="i", job_id="j", round=0, sender="buyer", recipient="aggregator",
                               payload=request))


async def test_a_buyer_says_when_a_party_it_waits_on_stops_and_when_it_is_back(capsys):
    """An aggregator killed mid-job (and not restarted) left the buyer waiting without a word."""
    import asyncio

    from deltaml.agents.bus import MemoryBus
    from deltaml.commands.buyer import _watch_served

    bus = MemoryBus()
    queue = bus.declare("aggregator", "agg")
    bus.consumed.update([queue, bus.declare("ledger", "ledger")])
    back = []

    async def on_back(role, name):  # the buyer then asks whether its job goes on there
        back.append((role, name))

    watch = asyncio.create_task(_watch_served(bus, {("aggregator", "agg"): True, ("ledger", "ledger"): True},
                                              every=0.01, on_back=on_back))
    said = []

    async def until_said(count):
        for _ in range(500):
            said.extend(capsys.readouterr().err.splitlines())
            if len(said) >= count:
                return
            await asyncio.sleep(0.01)

    try:
        bus.consumed.discard(queue)  # the aggregator died; the ledger runs on
        await until_said(1)
        bus.consumed.add(queue)
        await until_said(2)
    finally:
        watch.cancel()
    assert len(said) == 2 and said[0].startswith("deltaml: note: aggregator 'agg' stopped serving its queue (")
    assert said[0].endswith("); the job waits for it: one restarted with its --state-dir resumes it, "
                            "Ctrl-C gives the job up")
    assert said[1].startswith("deltaml: note: aggregator 'agg' is serving its queue again (")
    assert said[1].endswith("); a job it ran goes on if it kept its --state-dir")
    assert back == [("aggregator", "agg")]


def test_a_buyer_interrupted_says_where_its_deposit_goes_whether_or_not_its_aggregator_runs(keypair):
    """Told a stopped aggregator "gives the escrow up" and the deposit comes back at once: it only
    hears the word when it starts again, so the last line now says so and how to settle later."""
    from pathlib import Path

    from deltaml.agents.runtime import GAVE_UP
    from deltaml.commands.buyer import _left
    from deltaml.protocol.buyer import BuyerJob, BuyerPhase

    data, _ = prepare_parts(DemoConfig())
    job = BuyerJob(phase=BuyerPhase.FAILED, spec=make_spec(DemoConfig(), data, keypair[0].to_hex(), "buyer"),
                   aggregator="aggregator", deposit="made", reason=GAVE_UP, addresses={"buyer": "0xB"})
    running = _left(job, "j", Path("b.key"), aggregator_running=True)
    assert running == ("job j is given up and its aggregator told: it gives the escrow up and the deposit is "
                       "refunded to 0xB (at the latest at the escrow's deadline); `deltaml buyer withdraw --key "
                       "b.key` takes it back")
    stopped = _left(job, "j", Path("b.key"), aggregator_running=False)
    assert stopped.startswith("job j is given up; its aggregator is not running and hears it when it starts")
    assert stopped.endswith("`deltaml buyer withdraw --key b.key --settle j --owners 5` then refunds the deposit "
                            "to 0xB")
    job.deposit = ""
    assert _left(job, "j", Path("b.key")) == "job j is given up before any deposit and costs nothing"


async def test_a_buyer_interrupted_once_it_holds_the_model_keeps_the_report_and_the_model(tmp_path, keypair):
    """Ctrl-C while the escrow settled (the model decrypted, the refund on its way) used to leave
    without writing them: a model paid for, lost to a keystroke."""
    from pathlib import Path

    from deltaml.commands.buyer import _keep_result, _left
    from deltaml.marketplace import memory_job

    config = DemoConfig(rounds=2, eval_every=1)
    data, parts = prepare_parts(config)
    job, job_id, _, _, _ = await memory_job(config, parts, make_spec(config, data, keypair[0].to_hex(), "buyer"),
                                            keypair[1])
    args = argparse.Namespace(key_bits=2048, report=tmp_path / "r.json", model_out=tmp_path / "m.json")
    _keep_result(job, job_id, args, 1.0)
    assert json.loads((tmp_path / "r.json").read_text())["final_mse"] == job.published[2]["all"]
    assert json.loads((tmp_path / "m.json").read_text())["intercept"] == job.model[0]
    line = _left(job, job_id, Path("b.key"))
    assert line.startswith(f"job {job_id} had finished (its model and report are kept); ")


def _staffed_first(monkeypatch, then):
    """Make the demo's ledger only once its buyer has heard that the job is staffed (the aggregator's
    participants message), then do ``then``: whether that came first is what it returns."""
    from deltaml.marketplace import demo
    from deltaml.protocol.buyer import BuyerCore

    staffed, seen = threading.Event(), []
    handle = BuyerCore.handle

    def handle_and_note(core, env):
        if env.type == "participants":
            staffed.set()
        return handle(core, env)

    def slow_ledger(url):
        seen.append(staffed.wait(timeout=30))
        return then(url)

    monkeypatch.setattr(BuyerCore, "handle", handle_and_note)
    monkeypatch.setattr(demo, "ledger_core", slow_ledger)
    return seen


def test_the_job_is_requested_and_staffed_while_the_chain_is_made(keypair, monkeypatch):
    """Over RabbitMQ the ledger's chain is made on a thread beside the job's start, which needs no
    chain: the owners are staffed (and start their obfuscator tables) meanwhile, and the job runs."""
    from deltaml.marketplace import demo, run_demo

    seen = _staffed_first(monkeypatch, demo.ledger_core)
    report = run_demo(DemoConfig(rounds=1, eval_every=1), "amqp", keypair=keypair)
    assert seen == [True]
    assert report["final_mse"] > 0 and sum(report["payments_wei"].values()) + report["refund_wei"] == report["deposit_wei"]


def test_a_chain_that_cannot_be_made_fails_the_demo_saying_why(keypair, monkeypatch):
    """The job went out before the chain: its failure still ends the demo with the chain's reason."""
    from deltaml.agents.ledger import ChainUnavailable
    from deltaml.marketplace import run_demo

    def unreachable(url):
        raise ChainUnavailable("no Ethereum node answers at nowhere")

    seen = _staffed_first(monkeypatch, unreachable)
    with pytest.raises(ChainUnavailable, match="no Ethereum node answers at nowhere"):
        run_demo(DemoConfig(rounds=1, eval_every=1), "amqp", keypair=keypair)
    assert seen == [True]


def test_ctrl_c_in_a_demo_over_rabbitmq_is_counted_and_taken_where_the_demo_can_stop():
    """Python's own handler raised KeyboardInterrupt wherever the demo's main thread was: at times in
    a weakref callback (Python ignored it and the demo ran on to its end) or inside the logging lock
    (the thread making the chain then waited for it for ever). The demo's handler counts; it cancels
    the job's task if one runs, and the demo raises where it checks; a third Ctrl-C leaves at once."""
    import asyncio
    import os
    import signal
    import time

    from deltaml.marketplace.demo import Interrupts

    interrupts, before = Interrupts(), signal.getsignal(signal.SIGINT)
    with interrupts.installed():
        assert signal.getsignal(signal.SIGINT) is interrupts
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # (a handler runs between two of the main thread's instructions)
        assert interrupts.count == 1  # counted, nothing raised
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()

        async def job():
            interrupts.watch()  # a Ctrl-C came before the job's task: it is cancelled at once
            await asyncio.sleep(30)

        with pytest.raises(asyncio.CancelledError):
            asyncio.run(job())
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert interrupts.count == 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
