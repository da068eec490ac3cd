"""A party's wallet signs on its own terms, whatever the ledger says: for its escrow, on its
chain, and at no more per gas than it agreed to.

The ledger relays transactions and tells a wallet what to sign: the chain's id and the escrow's
address when it greets it, and the prices to sign at (the chain's: twice the base fee and a tip,
raised for a transaction left waiting). A wallet took both without a check, so a ledger, or a node
lying to it, could have a buyer deposit into another contract, or a party give its ether to a block
producer in fees. A paying party may now pin its escrow and chain (``--escrow``, ``--chain-id``),
and has ceilings on prices (``--max-fee-gwei``, ``--max-tip-gwei``): a wallet signs at the advice up
to them, and a transaction the chain takes only above them, or a call to another escrow, fails with
its reason instead of being signed.
"""

import pytest

from deltaml.agents.agent import Agent
from deltaml.agents.ledger import Chain, LedgerCore
from deltaml.agents.parties import context
from deltaml.cli import main
from deltaml.marketplace import DemoConfig, make_spec, memory, memory_job, prepare_parts
from deltaml.protocol import messages as m
from deltaml.protocol.buyer import BuyerPhase
from deltaml.protocol.chain import GWEI, LEDGER, MAX_FEE, MAX_TIP, Wallet, parse_tx
from deltaml.protocol.fees import gwei
from deltaml.protocol.machine import Context

from test_ledger import base_fee_from_next_block, ledger_on_a_chain_without_mining


ESCROW = "0x" + "11" * 20


def info(price, tip):
    return m.ChainInfo(chain_id=1, contract=ESCROW, nonce=0, gas_price=price, tip=tip)


def signed_prices(wallet, ctx):
    [request] = wallet.call(ctx, "job", 0, "withdraw", [])
    tx = parse_tx(bytes.fromhex(request.payload.raw[2:]))
    return tx.gas_price, tx.tip


@pytest.mark.parametrize("tip", [500 * GWEI, None], ids=["eip-1559", "legacy"])
def test_a_wallet_signs_at_the_ledgers_prices_only_up_to_its_ceilings(tip):
    ctx = Context("owner-1", wallet=Wallet(private_key=b"\x01" * 32, max_fee=10 * GWEI, max_tip=2 * GWEI))
    ctx.wallet.on_info(ctx, info(1000 * GWEI, tip))
    # (a legacy transaction's price is all tip: --max-fee-gwei bounds it)
    assert signed_prices(ctx.wallet, ctx) == (10 * GWEI, 10 * GWEI if tip is None else 2 * GWEI)
    # below the ceilings, the chain's prices as they come
    ctx.wallet.on_receipt(m.TxReceipt(function="withdraw", mined=True, ok=True, next_nonce=1,
                                      gas_price=3 * GWEI, tip=None if tip is None else GWEI))
    assert signed_prices(ctx.wallet, ctx) == (3 * GWEI, 3 * GWEI if tip is None else GWEI)


def test_an_amount_in_gwei_is_written_exactly():
    written = ["0.000000001", "20", "1.5", "1.277483345"]
    assert [gwei(w) for w in (1, 20 * GWEI, 3 * GWEI // 2, 1_277_483_345)] == written


def test_the_default_ceilings_leave_room_for_every_tip_the_ledger_raises_to():
    from deltaml.agents.ledger.node import MAX_TIP as LEDGERS

    wallet = Wallet(private_key=b"\x01" * 32)
    assert (wallet.max_fee, wallet.max_tip) == (MAX_FEE, MAX_TIP) and LEDGERS == MAX_TIP <= MAX_FEE


def test_a_partys_ceilings_are_what_it_was_started_with_not_what_its_checkpoint_says():
    before = Wallet(private_key=b"\x01" * 32, max_fee=10 * GWEI, max_tip=GWEI)
    after = Wallet(private_key=b"\x01" * 32, max_fee=20 * GWEI, max_tip=2 * GWEI)
    after.restore(before.snapshot())
    assert (after.max_fee, after.max_tip) == (20 * GWEI, 2 * GWEI)


def test_a_transaction_the_chain_takes_only_above_the_ceiling_fails_with_its_reason_not_signed_again_for_ever():
    """On anvil: the base fee rises to 20 times the price the party signed at, and its ceiling is 5
    times that. The wallet signs once more, at its ceiling (the chain might take it); told again
    that the chain will not, it does not sign again: its withdraw fails with the chain's reason and
    its own, and the nonce stays free."""
    with ledger_on_a_chain_without_mining() as (w3, mine, core, party, signed):
        old = party.wallet.gas_price
        party.wallet.max_fee = 5 * old
        base_fee_from_next_block(w3, 20 * old)
        [request] = party.collect()
        [receipt] = core.handle(signed(request))
        assert receipt.payload.sign_again and receipt.payload.gas_price > 40 * old
        [again] = party.handle(receipt)
        assert parse_tx(bytes.fromhex(again.payload.raw[2:])).gas_price == 5 * old  # at its ceiling
        [receipt] = core.handle(signed(again))
        assert receipt.payload.sign_again  # still below the base fee
        assert party.handle(receipt) == []  # not signed again
        r = party.receipts["withdraw"]
        assert not r.mined and not r.ok and not r.sign_again
        assert "below the chain's base fee" in r.reason
        assert f"above this party's ceiling of {gwei(5 * old)} gwei (--max-fee-gwei)" in r.reason
        assert party.wallet.sent == {} and party.wallet.nonce == 0
        assert w3.eth.get_transaction_count(party.wallet.address, "pending") == 0


class Greedy:
    """A ledger that advises a thousand times the chain's prices (a block producer it works with
    would keep the tips)."""

    def __init__(self, core):
        self.core = core

    def __getattr__(self, name):
        return getattr(self.core, name)

    def handle(self, env):
        return self._inflated(self.core.handle(env))

    def tick(self, seconds):
        return self._inflated(self.core.tick(seconds))

    @staticmethod
    def _inflated(out):
        def more(payload):
            return payload.model_copy(update={"gas_price": payload.gas_price * 1000,
                                              "tip": None if payload.tip is None else payload.tip * 1000})
        return [e.model_copy(update={"payload": more(e.payload)})
                if e.type in ("chain_info", "tx_receipt") and e.payload.gas_price else e for e in out]


async def test_a_ledger_that_advises_a_fortune_in_fees_gets_no_more_than_each_partys_ceilings(keypair, monkeypatch):
    """The whole job on the embedded chain with a greedy ledger: every party signs every
    transaction within its ceilings, and the job is paid as with an honest one."""
    def greedy_ledger(bus, chain_url, key=None):
        ledger = Greedy(LedgerCore(context(LEDGER), Chain(chain_url)))
        return ledger, Agent("ledger", LEDGER, ledger, bus, key=key)

    monkeypatch.setattr(memory, "make_ledger", greedy_ledger)
    ceilings = {"max_fee": 20 * GWEI, "max_tip": 2 * GWEI}
    wallets = {}

    def wrap(name, core):
        core.wallet.__dict__.update(ceilings)
        wallets[core.wallet.address.lower()] = name
        return core

    config = DemoConfig(rounds=2, eval_every=2)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    job, _, dead, ledger, _ = await memory_job(config, parts, spec, keypair[1], wrap=wrap)
    assert job.phase is BuyerPhase.FINISHED and job.settled and job.withdrawn and not dead, (job.reason, dead)
    assert job.refund_wei + sum(job.payments_wei.values()) == spec.deposit_wei
    w3, seen = ledger.chain.w3, set()
    for number in range(w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True).transactions:
            who = wallets.get(tx["from"].lower())
            if who is not None:
                seen.add(who)
                assert tx["type"] == 2, (who, tx)
                # (eth-tester's names for maxFeePerGas and maxPriorityFeePerGas)
                assert tx["max_fee_per_gas"] <= ceilings["max_fee"], (who, tx)
                assert tx["max_priority_fee_per_gas"] <= ceilings["max_tip"], (who, tx)
    assert len(seen) == len(wallets) == config.owners + 2  # the owners, the aggregator and the buyer all paid


async def test_a_party_whose_ceiling_is_below_the_chains_price_fails_its_part_with_the_reason(keypair):
    """An owner that will pay at most a wei per gas cannot confirm on a chain with a base fee: the
    aggregator hears why, and the job does not wait on it."""
    config = DemoConfig(rounds=2, eval_every=2, round_timeout=30.0)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    heard = []

    class Listening:
        def __init__(self, core):
            self.core = core

        def __getattr__(self, name):
            return getattr(self.core, name)

        def handle(self, env):
            if env.type == "failure":
                heard.append((env.sender, env.payload.reason))
            return self.core.handle(env)

    def wrap(name, core):
        if name == "owner-2":
            core.wallet.max_fee, core.wallet.max_tip = 1, 1
        return Listening(core) if name == "aggregator" else core

    job, _, dead, ledger, _ = await memory_job(config, parts, spec, keypair[1], wrap=wrap)
    [(sender, reason)] = heard
    assert sender == "owner-2" and reason.startswith("confirm failed: not sent: its gas price (1 wei) is below")
    assert "above this party's ceiling of 0.000000001 gwei (--max-fee-gwei)" in reason
    # as any owner that cannot confirm, while the job is staffed: it ends, saying why, and the deposit
    # comes back whole
    assert job.phase is BuyerPhase.FAILED and job.reason == f"owner-2: {reason}"
    assert job.settled and job.withdrawn and job.refund_wei == spec.deposit_wei and job.payments_wei == {}
    assert not dead, dead


@pytest.mark.parametrize("flags, said", [
    (["--escrow", "0x12"], "--escrow 0x12: not an Ethereum address"),
    (["--chain-id", "0"], "--chain-id 0: expected a chain id, 1 or more"),
    (["--max-fee-gwei", "0"], "--max-fee-gwei 0: expected at least one wei"),
    (["--max-fee-gwei", "-3"], "--max-fee-gwei -3: expected at least one wei"),
    (["--max-fee-gwei", "nan"], "--max-fee-gwei NaN: expected at least one wei"),
    (["--max-tip-gwei", "600"], "--max-tip-gwei 600: expected 0 to --max-fee-gwei (500)"),
    (["--max-fee-gwei", "0.5", "--max-tip-gwei", "1"], "--max-tip-gwei 1: expected 0 to --max-fee-gwei (0.5)"),
    (["--max-fee-gwei", "5", "--max-tip-gwei", "-1"], "--max-tip-gwei -1: expected 0 to --max-fee-gwei (5)"),
])
def test_a_ceiling_that_cannot_be_is_one_clear_error(flags, said, capsys, tmp_path):
    key = tmp_path / "aggregator.key"
    assert main(["aggregator", "--key", str(key), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaml: error: ") and said in err and err.count("\n") == 1
    assert not key.exists()  # refused before anything was made


@pytest.mark.parametrize("flags, env, ceilings", [
    ([], {}, (MAX_FEE, MAX_TIP, None, None)),
    (["--max-fee-gwei", "0.000000001"], {}, (1, 1, None, None)),  # the tip's ceiling follows a lower fee's
    (["--max-fee-gwei", "30", "--max-tip-gwei", "0", "--escrow", ESCROW.lower(), "--chain-id", "31337"], {},
     (30 * GWEI, 0, "0x1111111111111111111111111111111111111111", 31337)),
    ([], {"DELTAML_MAX_FEE_GWEI": "40", "DELTAML_MAX_TIP_GWEI": "2.5", "DELTAML_ESCROW": ESCROW,
          "DELTAML_CHAIN_ID": "5"}, (40 * GWEI, 5 * GWEI // 2, ESCROW, 5)),
])
def test_a_partys_ceilings_come_from_its_flags_or_environment(flags, env, ceilings, monkeypatch, tmp_path):
    from deltaml.cli import build_parser
    from deltaml.commands.common import _wallet

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["owner", "--data", "x.csv", "--key", str(tmp_path / "k"), *flags])
    wallet = _wallet(args, "owner")
    assert (wallet.max_fee, wallet.max_tip, wallet.escrow, wallet.escrow_chain) == ceilings


def test_a_ceiling_that_is_not_a_number_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["owner", "--data", "x.csv", "--max-fee-gwei", "lots"])
    assert exc.value.code == 2 and "not a number of gwei: 'lots'" in capsys.readouterr().err



def collector(**terms):
    from deltaml.protocol.chain import Collector

    return Collector(Context("c", wallet=Wallet(private_key=b"\x01" * 32, **terms)))


def chain_info(party, chain_id=1, contract=ESCROW):
    return party.ctx.reply(party.wallet.hello(party.ctx), info(GWEI, GWEI)).model_copy(
        update={"sender": LEDGER, "payload": info(GWEI, GWEI).model_copy(update={"chain_id": chain_id,
                                                                                 "contract": contract})})


@pytest.mark.parametrize("terms, chain_id, contract, said", [
    ({"escrow": "0x" + "22" * 20}, 1, ESCROW, f"the ledger names escrow {ESCROW}; this party signs only for "
                                              f"0x{'22' * 20} (--escrow): nothing signed"),
    ({"escrow_chain": 5}, 1, ESCROW, "the ledger's chain has id 1; this party signs only for chain 5 (--chain-id)"),
], ids=["another escrow", "another chain"])
def test_a_wallet_signs_nothing_for_an_escrow_or_chain_its_party_did_not_name(terms, chain_id, contract, said):
    """The calls that waited for the ledger's answer fail, each job told why; nothing is signed,
    and the next call greets the ledger again."""
    party = collector(**terms)
    assert [e.type for e in party.collect()] == ["chain_hello"]
    answer = chain_info(party, chain_id, contract)
    party.wallet.hello_id = answer.correlation_id
    assert party.handle(answer) == []
    r = party.receipts["withdraw"]
    assert not r.mined and not r.ok and said in r.reason
    assert party.wallet.chain_id is None and party.wallet.sent == {} and party.wallet.queue == []
    assert [e.type for e in party.collect()] == ["chain_hello"]  # greets again, signs nothing


@pytest.mark.parametrize("terms", [{"escrow": ESCROW.upper().replace("0X", "0x")}, {"escrow_chain": 1}, {}],
                         ids=["its escrow", "its chain", "no pins"])
def test_a_wallet_signs_for_the_escrow_and_chain_its_party_named(terms):
    party = collector(**terms)
    party.collect()
    answer = chain_info(party)
    party.wallet.hello_id = answer.correlation_id
    [request] = party.handle(answer)
    assert request.type == "tx_request" and parse_tx(bytes.fromhex(request.payload.raw[2:])).to.lower() == ESCROW


def test_a_wallet_restored_from_a_checkpoint_under_other_pins_greets_the_ledger_again():
    before = Wallet(private_key=b"\x01" * 32, chain_id=1, contract=ESCROW, greeted=True)
    after = Wallet(private_key=b"\x01" * 32, escrow="0x" + "22" * 20)
    after.restore(before.snapshot())
    assert (after.chain_id, after.contract, after.greeted) == (None, None, False)
    same = Wallet(private_key=b"\x01" * 32, escrow=ESCROW)
    same.restore(before.snapshot())
    assert (same.chain_id, same.contract, same.greeted) == (1, ESCROW, True)


@pytest.mark.parametrize("pinned", ["the ledger's", "another"])
async def test_a_buyer_pinned_to_an_escrow_deposits_only_there(pinned, keypair, monkeypatch):
    """The whole job on the embedded chain, every party pinned: to the ledger's escrow and chain it
    runs as ever; a buyer pinned to another escrow makes no deposit, and its job fails saying why."""
    made = memory.make_ledger
    ledgers = []
    monkeypatch.setattr(memory, "make_ledger", lambda *a, **kw: ledgers.append(made(*a, **kw)) or ledgers[-1])

    def wrap(name, core):
        chain = ledgers[0][0].chain
        core.wallet.escrow = chain.address if pinned == "the ledger's" or name != "buyer" else "0x" + "22" * 20
        core.wallet.escrow_chain = chain.w3.eth.chain_id
        return core

    config = DemoConfig(rounds=2, eval_every=2)
    data, parts = prepare_parts(config)
    spec = make_spec(config, data, keypair[0].to_hex(), "buyer")
    job, _, dead, ledger, _ = await memory_job(config, parts, spec, keypair[1], wrap=wrap)
    assert not dead, dead
    if pinned == "the ledger's":
        assert job.phase is BuyerPhase.FINISHED and job.withdrawn, job.reason
        assert job.refund_wei + sum(job.payments_wei.values()) == spec.deposit_wei
        return
    assert job.phase is BuyerPhase.FAILED and job.deposit == "refused", job.reason
    assert job.reason.startswith("deposit failed: the ledger names escrow ") and "(--escrow)" in job.reason
    assert "createJob" not in ledger.gas and ledger.chain.w3.eth.get_balance(ledger.chain.address) == 0


def test_the_command_lines_defaults_load_no_chain_library():
    """The ceilings' defaults are read when the parser is built, for every command: importing them
    from the chain package loaded eth-account and web3 first, and `deltaml --help` took 0.7 s
    instead of 0.23 s."""
    import subprocess
    import sys

    code = ("import sys; from deltaml.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('eth_account', 'web3', 'deltaml.protocol.chain') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
